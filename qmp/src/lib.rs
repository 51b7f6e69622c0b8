//! An async client for QMP, the QEMU Machine Protocol, on tokio.
//!
//! One [`Qmp`] is one connection to a QEMU monitor socket. Commands are typed through the
//! generated types of the [`qapi`] crate ([`qapi::qmp`]) with [`Qmp::execute`], or sent by name
//! with JSON arguments with [`Qmp::execute_raw`] for what that schema does not know (QEMU 7.2 and
//! 10.0 both differ from it). Events arrive on a broadcast channel: [`Qmp::events`]. This crate
//! uses only `qapi`'s types, not its stream implementation.
//!
//! # The protocol
//!
//! Newline-delimited JSON objects in both directions:
//!
//! ```text
//!  client (this crate)                                   QEMU monitor
//!    | connect ---------------------------------------------> |  state: greeting
//!    | <------ {"QMP": {"version": {...}, "capabilities": ["oob"]}}
//!    | ------> {"execute": "qmp_capabilities", "id": 0} ----> |  state: negotiation
//!    | <------ {"return": {}, "id": 0}                        |  state: command mode
//!    | ------> {"execute": "stop", "id": 1}                   |
//!    | ------> {"execute": "query-status", "id": 2}           |  many calls in flight,
//!    | <------ {"event": "STOP", "data": {}, "timestamp": {...}}  from any task
//!    | <------ {"return": {}, "id": 1}                        |
//!    | <------ {"return": {"status": "paused", ...}, "id": 2} |
//!    | <------ {"error": {"class": "...", "desc": "..."}, "id": 3}  -> Error::Qmp
//!    |            ... events at any time ...                  |
//!    | <------ EOF (QEMU quit or was killed)                  |  state: closed
//! ```
//!
//! Each request carries an `id` unique on its connection; QEMU echoes it in the reply, and the
//! reply goes to the caller that sent it. Out-of-band execution is never enabled, so QEMU runs the
//! commands of one connection in order.
//!
//! # Inside
//!
//! A reader task owns the socket's read half and is the only one to read it; a writer task owns
//! the write half and writes whole lines. A line over 16 MiB ([`MAX_LINE`]) is refused while it
//! is read, not buffered. When the connection ends — QEMU closes it, or sends a line that is not
//! JSON or is too long — every pending call and every event subscriber gets
//! [`Error::Disconnected`], and [`Qmp::close_reason`] says why. Nothing the peer sends can panic
//! this crate or make a call wait forever on a closed connection.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), qmp::Error> {
//! use std::time::Duration;
//!
//! let qmp = qmp::Qmp::connect_unix("/run/vm1/qmp.sock").await?;
//! println!("QEMU {} (pid {:?})", qmp.version(), qmp.peer_pid());
//! let mut events = qmp.events();
//! qmp.execute(qapi::qmp::stop {}).await?;
//! events.wait_for(|e| e.name == "STOP", Duration::from_secs(5)).await?;
//! let status = qmp.execute(qapi::qmp::query_status {}).await?;
//! assert!(!status.running);
//! # Ok(()) }
//! ```

mod client;
mod error;
mod events;
mod framing;

pub use client::{Qmp, HANDSHAKE_TIMEOUT};
pub use error::{CloseReason, Error};
pub use events::{Event, Events, Timestamp};
pub use framing::MAX_LINE;

/// Re-exported so that users name the typed commands as `qmp::qapi::qmp::query_status` without
/// depending on a matching `qapi` version themselves.
pub use qapi;

/// QEMU's version as its greeting reports it; ordered, so `v >= QemuVersion::new(8, 2, 0)` works.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
pub struct QemuVersion {
    /// e.g. 10 for 10.0.2
    pub major: u32,
    /// e.g. 0 for 10.0.2
    pub minor: u32,
    /// e.g. 2 for 10.0.2
    pub micro: u32,
}

impl QemuVersion {
    /// A version to compare against.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}
