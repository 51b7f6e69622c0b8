//! The handshake phase: fixed newstyle negotiation, from the greeting to `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME`), on any byte stream, upgraded to TLS on the way when the server
//! requires it.
//!
//! ```text
//!  client                                   server
//!    │ ◄──────── NBDMAGIC IHAVEOPT flags ───── │  FIXED_NEWSTYLE | NO_ZEROES
//!    │ ── client flags ──────────────────────► │  unknown bits: hard disconnect
//!    ┊                                         ┊  with TLS configured (FORCEDTLS, tls.rs):
//!    ┊ ── any option but STARTTLS, ABORT ────► ┊  ERR_TLS_REQD (EXPORT_NAME: disconnect)
//!    ┊ ── STARTTLS ──────────────────────────► ┊
//!    ┊ ◄──────── ACK ───────────────────────── ┊
//!    ┊ ◄═══════ TLS handshake ═══════════════► ┊  everything below is encrypted; nothing
//!    ┊                                         ┊  negotiated before it survives it
//!    │ ── IHAVEOPT opt len data ─────────────► │  len > 64 KiB: data skipped unread
//!    │ ◄──────── reply(opt, type, data)* ───── │  unknown option: ERR_UNSUP, go on
//!    │              ... more options ...       │
//!    │ ── GO(name, info requests) ───────────► │
//!    │ ◄── INFO(export) INFO(block size) ACK ── │  → transmission phase
//! ```
//!
//! State carried between options: whether structured replies and/or extended headers were
//! negotiated (extended headers take precedence) and which export `base:allocation` was
//! selected for. Anything that breaks the framing (bad magic, unknown client flags, an
//! unknown `NBD_OPT_EXPORT_NAME`, a failed TLS handshake) ends this connection only; the caller
//! bounds the whole phase, TLS handshake included, with a timeout.

#[cfg(test)]
mod test_support;
mod tls;

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::export::{ExportState, Registry};
use super::transport::Transport;
use super::wire::{
    self, hflag, info, opt, rep, ClientFlags, ClientOption, InfoRequest, InvalidOption,
    MetaRequest, OptionHeader, ReplyStyle, WireError, BASE_ALLOCATION, MAX_PAYLOAD,
};

/// Handshake flags this server offers.
const HANDSHAKE_FLAGS: u16 = hflag::FIXED_NEWSTYLE | hflag::NO_ZEROES;
/// Option data larger than this is skipped without being read into memory. The largest
/// legitimate option (a meta-context request with a few 4 KiB strings) is far smaller.
const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Metadata context id of `base:allocation` in `NBD_OPT_SET_META_CONTEXT` replies.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// Advertised block sizes: any alignment works (buffered I/O), 4 KiB avoids read-modify-write
/// in the page cache, 32 MiB is the largest payload accepted.
const MIN_BLOCK: u32 = 1;
const PREFERRED_BLOCK: u32 = 4096;

/// What a client may do during the handshake.
#[derive(Clone, Copy)]
pub(crate) struct Policy<'a> {
    pub(crate) registry: &'a Registry,
    /// Whether `NBD_OPT_LIST` names the exports (otherwise it is answered
    /// `NBD_REP_ERR_POLICY`).
    pub(crate) list_exports: bool,
    /// With an acceptor, TLS is required: nothing but `NBD_OPT_STARTTLS` (or `NBD_OPT_ABORT`)
    /// is answered before it.
    pub(crate) tls: Option<&'a TlsAcceptor>,
}

/// What the handshake agreed on.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) export: Arc<ExportState>,
    pub(crate) style: ReplyStyle,
    pub(crate) flags: u16,
    /// Context id of `base:allocation`, if the client selected it for this export.
    pub(crate) base_allocation: Option<u32>,
}

/// How the handshake ended without an error.
#[derive(Debug)]
pub(crate) enum Outcome<S> {
    /// On to the transmission phase, on this transport.
    Transmission(Session, Transport<S>),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
}

/// Why a handshake ended the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("connection failed")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("NBD_OPT_EXPORT_NAME asked for export {0:?}, which is not served")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME is invalid: {0}")]
    InvalidExportName(InvalidOption),
    #[error("NBD_OPT_EXPORT_NAME with {0} bytes of data, more than an export name can be")]
    ExportNameTooLong(u32),
    #[error("NBD_OPT_EXPORT_NAME after extended headers were negotiated")]
    ExportNameWithExtendedHeaders,
    #[error("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS, and this server requires TLS")]
    ExportNameBeforeTls,
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
}

/// How option haggling on one channel ended.
enum Haggled {
    Transmission(Session),
    Aborted,
}

/// The channel options travel on, which decides what `NBD_OPT_STARTTLS` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    /// No TLS configured: STARTTLS is refused by policy.
    Plain,
    /// Already upgraded: a second STARTTLS is invalid.
    Encrypted,
}

/// Negotiation state carried from option to option.
#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    /// Export name `base:allocation` was selected for by the last `NBD_OPT_SET_META_CONTEXT`.
    meta_export: Option<String>,
}

impl State {
    fn style(&self) -> ReplyStyle {
        if self.extended {
            ReplyStyle::Extended
        } else if self.structured {
            ReplyStyle::Structured
        } else {
            ReplyStyle::Simple
        }
    }
}

/// The one answer to every question about an export that is not served (never served, or being
/// removed): it names nothing and does not echo the name, so a client learns no more than "no".
/// During a migration the export name is the only secret between the source and its disk.
const NO_SUCH_EXPORT: &str = "no such export";

/// The export called `name`, unless there is none or it is being removed.
fn lookup(registry: &Registry, name: &str) -> Option<Arc<ExportState>> {
    registry.get(name).filter(|e| !e.stop.is_cancelled())
}

/// Runs the handshake on `stream` under `policy`; on success the transmission phase continues
/// on the returned transport (the stream itself, or a TLS session over it).
pub(crate) async fn negotiate<S>(
    mut stream: S,
    policy: &Policy<'_>,
) -> Result<Outcome<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(32);
    wire::put_greeting(&mut out, HANDSHAKE_FLAGS);
    send(&mut stream, &mut out).await?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags).await?;
    let client = wire::parse_client_flags(flags, HANDSHAKE_FLAGS)?;
    let Some(acceptor) = policy.tls else {
        return Ok(
            match haggle(&mut stream, policy, client, Channel::Plain).await? {
                Haggled::Transmission(session) => {
                    Outcome::Transmission(session, Transport::Plain(stream))
                }
                Haggled::Aborted => Outcome::Aborted,
            },
        );
    };
    if tls::await_starttls(&mut stream).await? == tls::BeforeTls::Aborted {
        return Ok(Outcome::Aborted);
    }
    let mut stream = crate::tls::accept_buffered(acceptor, stream)
        .await
        .map_err(HandshakeError::Tls)?;
    let (_, session) = stream.get_ref();
    debug!(suite = ?session.negotiated_cipher_suite().map(|s| s.suite()), "TLS established");
    // No second greeting: haggling starts over on the encrypted channel with a fresh state.
    Ok(
        match haggle(&mut stream, policy, client, Channel::Encrypted).await? {
            Haggled::Transmission(session) => {
                Outcome::Transmission(session, Transport::Tls(Box::new(stream)))
            }
            Haggled::Aborted => Outcome::Aborted,
        },
    )
}

/// Option haggling from a fresh state until the transmission phase or an abort.
async fn haggle<S>(
    stream: &mut S,
    policy: &Policy<'_>,
    client: ClientFlags,
    channel: Channel,
) -> Result<Haggled, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let registry = policy.registry;
    let mut out = BytesMut::with_capacity(512);
    let mut state = State::default();
    loop {
        let header = read_option_header(stream).await?;
        if header.length > MAX_OPTION_DATA {
            if header.code == opt::EXPORT_NAME {
                return Err(HandshakeError::ExportNameTooLong(header.length));
            }
            skip(stream, header.length).await?;
            let reply = if is_known(header.code) {
                rep::ERR_TOO_BIG
            } else {
                rep::ERR_UNSUP
            };
            wire::put_option_error(&mut out, header.code, reply, "option data too large");
            send(stream, &mut out).await?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data).await?;
        let option = match wire::parse_option(header.code, &data) {
            Ok(option) => option,
            Err(e) if header.code == opt::EXPORT_NAME => {
                return Err(HandshakeError::InvalidExportName(e))
            }
            Err(e) => {
                wire::put_option_error(&mut out, header.code, rep::ERR_INVALID, e.0);
                send(stream, &mut out).await?;
                continue;
            }
        };
        let code = header.code;
        match option {
            ClientOption::ExportName(name) => {
                if state.extended {
                    return Err(HandshakeError::ExportNameWithExtendedHeaders);
                }
                let Some(export) = lookup(registry, &name) else {
                    // This option cannot carry an error: the spec says to disconnect.
                    return Err(HandshakeError::UnknownExport(name));
                };
                let flags = export.transmission_flags(state.style().chunked());
                wire::put_export_name_reply(
                    &mut out,
                    export.backend.size(),
                    flags,
                    client.no_zeroes,
                );
                send(stream, &mut out).await?;
                return Ok(Haggled::Transmission(session(&state, export, &name, flags)));
            }
            ClientOption::Abort => {
                wire::put_option_reply(&mut out, code, rep::ACK, &[]);
                // The client may already be gone; it was leaving anyway.
                let _ = send(stream, &mut out).await;
                return Ok(Haggled::Aborted);
            }
            ClientOption::List if !policy.list_exports => {
                let message = "listing exports is disabled on this server";
                wire::put_option_error(&mut out, code, rep::ERR_POLICY, message);
            }
            ClientOption::List => {
                for name in registry.names() {
                    wire::put_rep_server(&mut out, &name);
                }
                wire::put_option_reply(&mut out, code, rep::ACK, &[]);
            }
            ClientOption::StartTls => {
                // The spec's answers: POLICY where TLS is known but not offered, INVALID once
                // TLS is running (there is no TLS inside TLS).
                let (reply, message) = match channel {
                    Channel::Plain => (rep::ERR_POLICY, "TLS is not enabled on this server"),
                    Channel::Encrypted => (rep::ERR_INVALID, "TLS is already negotiated"),
                };
                wire::put_option_error(&mut out, code, reply, message);
            }
            ClientOption::Info(request) => {
                info_reply(&mut out, code, &state, registry, &request);
            }
            ClientOption::Go(request) => {
                if let Some(export) = info_reply(&mut out, code, &state, registry, &request) {
                    send(stream, &mut out).await?;
                    let flags = export.transmission_flags(state.style().chunked());
                    return Ok(Haggled::Transmission(session(
                        &state,
                        export,
                        &request.name,
                        flags,
                    )));
                }
            }
            ClientOption::StructuredReply => {
                if state.extended {
                    wire::put_option_error(
                        &mut out,
                        code,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    );
                } else {
                    state.structured = true;
                    wire::put_option_reply(&mut out, code, rep::ACK, &[]);
                }
            }
            ClientOption::ExtendedHeaders => {
                state.extended = true;
                wire::put_option_reply(&mut out, code, rep::ACK, &[]);
            }
            ClientOption::ListMetaContext(request) => {
                meta_reply(&mut out, code, &mut state, registry, &request, false);
            }
            ClientOption::SetMetaContext(request) => {
                meta_reply(&mut out, code, &mut state, registry, &request, true);
            }
            ClientOption::Unknown(_) => {
                wire::put_option_error(&mut out, code, rep::ERR_UNSUP, "option not supported");
            }
        }
        send(stream, &mut out).await?;
    }
}

async fn read_option_header<S>(stream: &mut S) -> Result<OptionHeader, HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let mut header = [0u8; 16];
    stream.read_exact(&mut header).await?;
    Ok(wire::parse_option_header(&header)?)
}

/// Reads and drops `len` bytes of option data without holding them.
async fn skip<S>(stream: &mut S, len: u32) -> Result<(), HandshakeError>
where
    S: AsyncRead + Unpin,
{
    let len = u64::from(len);
    let skipped = tokio::io::copy(&mut (&mut *stream).take(len), &mut tokio::io::sink()).await?;
    if skipped < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

fn is_known(code: u32) -> bool {
    matches!(
        code,
        opt::EXPORT_NAME
            | opt::ABORT
            | opt::LIST
            | opt::STARTTLS
            | opt::INFO
            | opt::GO
            | opt::STRUCTURED_REPLY
            | opt::LIST_META_CONTEXT
            | opt::SET_META_CONTEXT
            | opt::EXTENDED_HEADERS
    )
}

fn session(state: &State, export: Arc<ExportState>, name: &str, flags: u16) -> Session {
    // Block status is only allowed on the export the contexts were selected for.
    let base_allocation =
        (state.meta_export.as_deref() == Some(name)).then_some(BASE_ALLOCATION_ID);
    Session {
        export,
        style: state.style(),
        flags,
        base_allocation,
    }
}

/// Replies to `NBD_OPT_INFO`/`NBD_OPT_GO`; returns the export on success.
fn info_reply(
    out: &mut BytesMut,
    code: u32,
    state: &State,
    registry: &Registry,
    request: &InfoRequest,
) -> Option<Arc<ExportState>> {
    let Some(export) = lookup(registry, &request.name) else {
        wire::put_option_error(out, code, rep::ERR_UNKNOWN, NO_SUCH_EXPORT);
        return None;
    };
    let flags = export.transmission_flags(state.style().chunked());
    wire::put_info_export(out, code, export.backend.size(), flags);
    // Sent even when not asked for: clients ignore what they do not understand, and the values
    // are the protocol's defaults anyway.
    wire::put_info_block_size(out, code, MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD);
    if request.items.contains(&info::NAME) {
        wire::put_info_name(out, code, &export.name);
    }
    wire::put_option_reply(out, code, rep::ACK, &[]);
    Some(export)
}

/// Replies to `NBD_OPT_LIST_META_CONTEXT` (`set == false`) or `NBD_OPT_SET_META_CONTEXT`.
fn meta_reply(
    out: &mut BytesMut,
    code: u32,
    state: &mut State,
    registry: &Registry,
    request: &MetaRequest,
    set: bool,
) {
    if set {
        // A SET replaces the previous selection even when it fails.
        state.meta_export = None;
    }
    if !state.structured && !state.extended {
        let message = "negotiate structured replies or extended headers first";
        wire::put_option_error(out, code, rep::ERR_INVALID, message);
        return;
    }
    if lookup(registry, &request.export).is_none() {
        wire::put_option_error(out, code, rep::ERR_UNKNOWN, NO_SUCH_EXPORT);
        return;
    }
    // `base:` is a wildcard when listing and selects nothing when setting; an empty query list
    // lists everything and selects nothing. Unknown namespaces and leaves are ignored.
    let selected = if request.queries.is_empty() {
        !set
    } else {
        request
            .queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
    };
    if selected {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        wire::put_meta_context(out, code, id, BASE_ALLOCATION);
        if set {
            state.meta_export = Some(request.export.clone());
        }
    }
    wire::put_option_reply(out, code, rep::ACK, &[]);
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut BytesMut) -> io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::nbd::wire::tflag;
    use bytes::BufMut;

    #[tokio::test]
    async fn go_with_extended_headers_and_base_allocation() {
        let (registry, _f) = registry_with("disk", 1 << 20, false);
        let (mut client, server) = serve(registry, true, None);
        start(&mut client, 3).await;

        option(&mut client, 0x1234, b"junk").await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_UNSUP);

        option(&mut client, opt::EXTENDED_HEADERS, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        option(&mut client, opt::STRUCTURED_REPLY, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_EXT_HEADER_REQD);

        let mut set = name_data("disk");
        set.put_u32(2);
        for q in ["qemu:dirty-bitmap:x", BASE_ALLOCATION] {
            set.put_u32(q.len() as u32);
            set.put_slice(q.as_bytes());
        }
        option(&mut client, opt::SET_META_CONTEXT, &set).await;
        let (_, kind, data) = reply(&mut client).await;
        assert_eq!(kind, rep::META_CONTEXT);
        assert_eq!(&data[4..], BASE_ALLOCATION.as_bytes());
        assert_eq!(reply(&mut client).await.1, rep::ACK);

        let mut go = name_data("disk");
        go.put_u16(1);
        go.put_u16(info::BLOCK_SIZE);
        option(&mut client, opt::GO, &go).await;
        let (_, kind, data) = reply(&mut client).await;
        assert_eq!(kind, rep::INFO);
        assert_eq!(
            u64::from_be_bytes(data[2..10].try_into().expect("8")),
            1 << 20
        );
        let flags = u16::from_be_bytes(data[10..12].try_into().expect("2"));
        assert_ne!(flags & tflag::SEND_WRITE_ZEROES, 0);
        assert_ne!(flags & tflag::CAN_MULTI_CONN, 0);
        assert_eq!(flags & tflag::READ_ONLY, 0);
        let (_, kind, data) = reply(&mut client).await;
        assert_eq!(kind, rep::INFO);
        assert_eq!(&data[..2], &info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(&data[10..14], &MAX_PAYLOAD.to_be_bytes());
        assert_eq!(reply(&mut client).await.1, rep::ACK);

        let Ok(Ok(Outcome::Transmission(s, Transport::Plain(_)))) = server.await else {
            panic!("expected the transmission phase");
        };
        assert_eq!(s.style, ReplyStyle::Extended);
        assert_eq!(s.base_allocation, Some(BASE_ALLOCATION_ID));
    }

    #[tokio::test]
    async fn unknown_export_list_and_oversized_option() {
        let (registry, _f) = registry_with("a", 4096, true);
        let (mut client, server) = serve(registry, true, None);
        start(&mut client, 1).await;

        let mut go = name_data("missing");
        go.put_u16(0);
        option(&mut client, opt::GO, &go).await;
        let (_, kind, message) = reply(&mut client).await;
        assert_eq!(kind, rep::ERR_UNKNOWN);
        assert_eq!(
            &message[..],
            NO_SUCH_EXPORT.as_bytes(),
            "the name is not echoed"
        );

        // 1 MiB of option data is skipped, not buffered, and negotiation continues.
        option(&mut client, 0x77, &vec![0u8; 1 << 20]).await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_UNSUP);

        option(&mut client, opt::LIST, &[]).await;
        let (_, kind, data) = reply(&mut client).await;
        assert_eq!(kind, rep::SERVER);
        assert_eq!(&data[4..], b"a");
        assert_eq!(reply(&mut client).await.1, rep::ACK);

        // Meta contexts need structured replies first.
        let mut set = name_data("a");
        set.put_u32(0);
        option(&mut client, opt::SET_META_CONTEXT, &set).await;
        assert_eq!(reply(&mut client).await.1, rep::ERR_INVALID);

        option(&mut client, opt::ABORT, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        assert!(matches!(server.await, Ok(Ok(Outcome::Aborted))));
    }

    #[tokio::test]
    async fn export_name_with_no_zeroes_and_garbage() {
        let (registry, _f) = registry_with("x", 8192, true);
        let (mut client, server) = serve(registry.clone(), true, None);
        start(&mut client, 3).await;
        option(&mut client, opt::EXPORT_NAME, b"x").await;
        let mut answer = [0u8; 10];
        client
            .read_exact(&mut answer)
            .await
            .expect("export name reply");
        assert_eq!(u64::from_be_bytes(answer[..8].try_into().expect("8")), 8192);
        let flags = u16::from_be_bytes(answer[8..].try_into().expect("2"));
        assert_ne!(flags & tflag::READ_ONLY, 0);
        assert_eq!(flags & tflag::SEND_TRIM, 0);
        let Ok(Ok(Outcome::Transmission(s, Transport::Plain(_)))) = server.await else {
            panic!("expected the transmission phase");
        };
        assert_eq!(s.style, ReplyStyle::Simple);
        assert_eq!(s.base_allocation, None);

        // Garbage instead of an option: the handshake fails, nothing panics.
        let (mut client, server) = serve(registry.clone(), true, None);
        start(&mut client, 1).await;
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("garbage");
        assert!(matches!(
            server.await,
            Ok(Err(HandshakeError::Wire(WireError::BadOptionMagic(_))))
        ));

        // Unknown client flags: refused.
        let (mut client, server) = serve(registry, true, None);
        start(&mut client, 0x80).await;
        assert!(matches!(server.await, Ok(Err(HandshakeError::Wire(_)))));
    }

    #[tokio::test]
    async fn closed_doors_list_refused_and_a_stopping_export_looks_unknown() {
        let (registry, _f) = registry_with("secret-name", 4096, false);
        let stopping = registry.get("secret-name").expect("export");
        let (mut client, server) = serve(registry, false, None);
        start(&mut client, 1).await;

        option(&mut client, opt::LIST, &[]).await;
        let (_, kind, message) = reply(&mut client).await;
        assert_eq!(kind, rep::ERR_POLICY);
        assert!(!String::from_utf8_lossy(&message).contains("secret-name"));

        let mut unknown = name_data("other");
        unknown.put_u16(0);
        option(&mut client, opt::INFO, &unknown).await;
        let unknown_reply = reply(&mut client).await;
        stopping.stop.cancel();
        let mut known = name_data("secret-name");
        known.put_u16(0);
        option(&mut client, opt::INFO, &known).await;
        let known_reply = reply(&mut client).await;
        assert_eq!(unknown_reply.1, rep::ERR_UNKNOWN);
        assert_eq!(
            (unknown_reply.1, unknown_reply.2),
            (known_reply.1, known_reply.2),
            "unknown and unreachable get the same answer"
        );
        option(&mut client, opt::ABORT, &[]).await;
        assert_eq!(reply(&mut client).await.1, rep::ACK);
        assert!(matches!(server.await, Ok(Ok(Outcome::Aborted))));
    }
}
