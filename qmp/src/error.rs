//! The one error type of the crate, and the reason a connection ended.

use std::time::Duration;

/// Everything that can go wrong talking to a QMP monitor.
///
/// A connection that ends (QEMU exits, the socket closes, QEMU sends something that cannot be
/// QMP) shows up as [`Error::Disconnected`] in every pending call and every event subscriber;
/// [`Qmp::close_reason`](crate::Qmp::close_reason) says why it ended.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be opened: it does not exist, nobody listens, or no permission.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// The socket path or address that was tried.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed after the connection was made.
    #[error("I/O error on the QMP socket")]
    Io(#[source] std::io::Error),
    /// The peer does not speak QMP: its first line is not a QMP greeting.
    #[error("the peer is not a QMP socket: {detail}")]
    NotQmp {
        /// What was received instead of the greeting.
        detail: String,
    },
    /// QEMU answered the command with an error reply.
    #[error("{class}: {desc}")]
    Qmp {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// The connection is gone: QEMU closed the socket, exited, or sent a line that ended the
    /// connection. Every pending call and every event subscriber gets this.
    #[error("the QMP connection is closed (QEMU exited or closed the monitor)")]
    Disconnected,
    /// The peer sent a line longer than the cap; the connection was closed rather than buffer it.
    #[error("QMP peer sent a line longer than {limit} bytes; connection closed")]
    LineTooLong {
        /// The cap in bytes.
        limit: usize,
    },
    /// The peer sent a line that is not a JSON object.
    #[error("QMP peer sent a malformed message: {detail}")]
    Malformed {
        /// What was wrong with it.
        detail: String,
    },
    /// QEMU's reply did not have the shape the typed command expects (the QEMU version's schema
    /// differs from the `qapi-qmp` crate's): use [`Qmp::execute_raw`](crate::Qmp::execute_raw).
    #[error("cannot decode the reply to {command}: the QEMU version differs from the typed schema, use execute_raw")]
    Decode {
        /// The command whose reply did not decode.
        command: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// Something did not happen within the time allowed.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was waited for.
        what: String,
        /// How long was waited.
        after: Duration,
    },
    /// An event subscriber fell behind by more than the channel holds; `missed` events were
    /// dropped for it. The subscription keeps working from the oldest event still held.
    #[error("missed {missed} QMP events: the subscriber read too slowly")]
    EventsLagged {
        /// How many events this subscriber lost.
        missed: u64,
    },
    /// The command's arguments could not be turned into JSON.
    #[error("cannot encode the arguments of {command} as JSON")]
    Encode {
        /// The command whose arguments failed.
        command: String,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The arguments given to [`Qmp::execute_raw`](crate::Qmp::execute_raw) are neither `null`
    /// nor a JSON object; QMP only takes objects.
    #[error("arguments for {command} must be a JSON object (or null for none)")]
    BadArguments {
        /// The command the arguments were for.
        command: String,
    },
}

impl Error {
    /// QEMU's error class (`GenericError`, `CommandNotFound`, ...) when QEMU answered with an
    /// error reply; `None` for every other kind of error.
    pub fn class(&self) -> Option<&str> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Why a connection ended, kept after the fact for [`Qmp::close_reason`](crate::Qmp::close_reason).
///
/// Pending calls and subscribers only see [`Error::Disconnected`]; this says whether that was an
/// orderly close or the peer misbehaving.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CloseReason {
    /// The peer closed or reset the socket between messages (QEMU quit or was killed; a process
    /// that dies with unread input makes the kernel reset the connection instead of closing it).
    #[error("QEMU closed the QMP socket")]
    Eof,
    /// The socket closed in the middle of a line.
    #[error("QEMU closed the QMP socket in the middle of a message")]
    EofMidLine,
    /// A line exceeded the cap.
    #[error("QMP peer sent a line longer than {limit} bytes")]
    LineTooLong {
        /// The cap in bytes.
        limit: usize,
    },
    /// A line was not a JSON object.
    #[error("QMP peer sent a malformed message: {detail}")]
    Malformed {
        /// What was wrong with it.
        detail: String,
    },
    /// Reading or writing the socket failed.
    #[error("I/O error on the QMP socket: {message}")]
    Io {
        /// The operating system's error kind.
        kind: std::io::ErrorKind,
        /// The error's text.
        message: String,
    },
    /// Every [`Qmp`](crate::Qmp) handle was dropped.
    #[error("the QMP client was dropped")]
    Dropped,
}

impl CloseReason {
    /// Whether the connection ended the way QEMU normally ends it (closing between messages).
    pub fn is_clean(&self) -> bool {
        matches!(self, CloseReason::Eof | CloseReason::Dropped)
    }
}

impl From<&std::io::Error> for CloseReason {
    fn from(e: &std::io::Error) -> Self {
        match e.kind() {
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
                CloseReason::Eof
            }
            kind => CloseReason::Io {
                kind,
                message: e.to_string(),
            },
        }
    }
}
