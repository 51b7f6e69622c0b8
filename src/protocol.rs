//! The control protocol between `ferry migrate` (the source) and `ferry agent` (the destination).
//!
//! One TCP connection carries one migration, inside TLS 1.3 (see [`crate::tls`]): the agent
//! answers anything that does not start with a TLS record with a plaintext `Refused` saying the
//! source is too old. Every message is a frame: a 4-byte big-endian length followed by that many
//! bytes of JSON (one object, tagged by `"type"`). Frames over [`MAX_FRAME`] are refused before
//! anything is allocated.
//!
//! ```text
//!  source (ferry migrate)                               agent (ferry agent)
//!    │ ═══════════════ TLS 1.3 handshake ══════════════════ │ both compute X = the session's
//!    │ Hello{versions:[3], software}                        │ exporter value (RFC 8446 §7.5)
//!    │─────────────────────────────────────────────────────►│ picks the highest common version
//!    │            Challenge{version, nonce} | Refused{reason}│
//!    │◄─────────────────────────────────────────────────────│
//!    │ Auth{mac = HMAC(token, "source"‖X‖nonce), nonce'}    │
//!    │─────────────────────────────────────────────────────►│ constant-time compare
//!    │    Authenticated{mac = HMAC(token,"agent"‖X‖nonce')} │ (the source checks the agent, too)
//!    │◄─────────────────────────────────────────────────────│
//!    │ Prepare{vm: argv, disks, tls}                        │ preflight: space, argv; images,
//!    │─────────────────────────────────────────────────────►│ per-migration CA (tls), NBD server
//!    │      Prepared{migration_id, nbd_port, exports, tls}  │ on an ephemeral port; `tls`: the
//!    │◄─────────────────────────────────────────────────────│ source's client certificate
//!    │ StartDestination{parallel}                           │ destination QEMU -incoming defer -S,
//!    │─────────────────────────────────────────────────────►│ late-block-activate,
//!    │   ... source mirrors every disk into the exports     │ migrate-incoming (tls: unix socket
//!    │       (tls: through its relay, crate::tunnel)        │ fed by a TLS listener on IP:0;
//!    │                                                      │ --insecure: tcp:IP:0)
//!    │       while the destination QEMU starts ...          │
//!    │                     DestinationReady{migration_port} │ tls: the agent's RAM listener's
//!    │                                                      │ port (v4); --insecure: QEMU's
//!    │◄─────────────────────────────────────────────────────│
//!    │   ... BLOCK_JOB_READY on every disk ...              │
//!    │ Synced                                               │ background fdatasync of the images
//!    │─────────────────────────────────────────────────────►│
//!    │   ... RAM streams (return path on); at              │
//!    │       pre-switchover the source cancels the READY    │
//!    │       mirrors (final sync), migrate-continue, and    │
//!    │       waits for its QEMU's `completed` ...           │ (incoming completed)
//!    │ Commit                                               │ fdatasync the images, journal
//!    │─────────────────────────────────────────────────────►│ `resuming`, `cont`; reply; journal
//!    │                Running{pid, qmp, resumed_at} | Abandoned  `running`, drop the exports
//!    │◄─────────────────────────────────────────────────────│
//!
//!  `ferry xl migrate` (Xen, see crate::xl and docs/xen.md), after the handshake:
//!    │ PrepareXl{vm: disks only, tls}                       │ preflight: space; images,
//!    │─────────────────────────────────────────────────────►│ certificates, NBD server
//!    │        Prepared{...}, then XlPrepared{image paths}   │ (no destination QEMU: xl's job)
//!    │◄─────────────────────────────────────────────────────│
//!    │   ... mirrors to READY ...  Synced ─────────────────►│ background fdatasync
//!    │ XlReceive{options}                                   │ its own --xl-binary
//!    │─────────────────────────────────────────────────────►│ migrate-receive OPTIONS
//!    │                                      XlReceiving     │
//!    │◄─────────────────────────────────────────────────────│
//!    │ ══ stream mode (crate::xl::wire): chunks both ways ══ │ xl's stream ⇄ its stdin/stdout;
//!    │    Data…, Final (disks final), Data (END), Go, Data… │ Final: flush, close exports;
//!    │                                                      │ Go: journal `running`
//!
//!  a recovering source, on a new connection after the handshake:
//!    │ Resolve{migration_id, commit}                        │ commit: as `Commit` above;
//!    │─────────────────────────────────────────────────────►│ otherwise roll back
//!    │                                Running | Abandoned   │
//!    │◄─────────────────────────────────────────────────────│
//!
//!  `ferry status --agent`, on a new connection after the handshake (reads only):
//!    │ Status                                               │ lists the storage directory's
//!    │─────────────────────────────────────────────────────►│ migrations (journals, images)
//!    │                        StatusReport{migrations, more}│
//!    │◄─────────────────────────────────────────────────────│
//!  `ferry migrate --dry-run`, after the handshake:
//!    │ Check{vm, tls}                                       │ Prepare's checks only: TLS policy,
//!    │─────────────────────────────────────────────────────►│ space, binary, argv, host files;
//!    │          Checked{argv, storage, free_bytes} | Refused│ creates nothing
//!    │◄─────────────────────────────────────────────────────│ (then either side hangs up)
//! ```
//!
//! Ownership is decided by the source QEMU alone: with the return path on, its migration reaches
//! `completed` only after the destination loaded the whole state, and any failure before that
//! makes QEMU resume the source. So the agent never starts a guest on its own: only `Commit` (or
//! `Resolve{commit: true}`), sent after the source QEMU said `completed`, does that. When the
//! connection drops after `StartDestination` the agent keeps the paused destination for
//! `--recover-window` (forever once its incoming migration completed), so that the source, or
//! `ferry recover` run there, can settle it. `Abandoned` means the destination copy is gone and
//! never ran: only then may a source whose QEMU completed resume. See `docs/protocol.md` for
//! every crash point.
//!
//! Versioning: the source lists every version it speaks; the agent answers with the one it picked
//! or refuses naming both lists. A new version may change any message after `Hello`. Version 3
//! moved the link into TLS and bound the proofs to it; the plaintext version 2 is refused. The
//! xl messages were added to version 3 without a bump: nothing changed for `ferry migrate`, so
//! hosts of either generation still migrate QEMU VMs with each other, and an agent that predates
//! them only fails `ferry xl migrate` (it cannot decode `prepare_xl` and hangs up; the source
//! says to upgrade it). Version 4: with `tls`, `DestinationReady`'s port is the agent's RAM
//! listener (TLS with the migration's client certificate, forwarded to the destination QEMU's
//! unix socket; `crate::tunnel`), no longer the destination QEMU's own TLS port, so a version 3
//! source would speak QEMU's TLS to it: the two fail at `Hello`.
//!
//! Why the proofs cover the exporter value: the source may not be able to check the agent's
//! certificate (a self-signed one, no `--tls-ca`), so TLS alone does not stop a man in the middle
//! who terminates one TLS session towards the source and opens another towards the agent. Each
//! of those sessions has its own exporter value, so a proof made on one leg fails on the other:
//! without the token, nobody in the middle gets through the handshake.

use hmac::{Hmac, Mac};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tls::migration::ClientBundle;
use crate::vm::VmDescription;

/// The protocol versions this build speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u32] = &[4];

/// The largest frame either side accepts: a VM description with a long argv fits many times over.
pub const MAX_FRAME: usize = 1 << 20;

/// The most RAM stream connections a source may ask for (QEMU allows 255; each is a thread and
/// a socket on both hosts).
pub const MAX_PARALLEL: u32 = 16;

/// The name that stands for the migration's directory (not made yet) in a `Checked` command
/// line: `STORAGE/<migration-id>/disk-vda.raw`.
pub const CHECK_DIR: &str = "<migration-id>";

/// Length of the random challenge nonces, in bytes.
pub const NONCE_LEN: usize = 32;

/// What the source sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceMessage {
    /// First message: the versions the source speaks and what it is.
    Hello {
        /// Every protocol version the source speaks.
        versions: Vec<u32>,
        /// Free text for logs, e.g. `ferry 0.1.0`.
        software: String,
    },
    /// Answer to the agent's challenge, plus the source's own challenge for the agent.
    Auth {
        /// Hex HMAC-SHA256 of the agent's nonce under the shared token.
        mac: String,
        /// Hex nonce the agent must answer to prove it holds the token too.
        nonce: String,
    },
    /// The VM to receive.
    Prepare {
        /// The VM's argv and disks, as read from the source QEMU.
        vm: VmDescription,
        /// Whether the disks and the RAM travel encrypted (false: `ferry migrate --insecure`,
        /// which an agent with `--require-tls` refuses).
        tls: bool,
    },
    /// Start the destination QEMU and listen for the RAM. Sent once the mirror jobs run, so
    /// that the QEMU starts while the disks copy (paused, `-incoming defer`, images inactive: it does
    /// not touch them until the hand-over).
    StartDestination {
        /// RAM stream connections (QEMU's multifd channels); 1: one plain stream, no multifd.
        /// Both QEMUs must agree, so the source says it here. At most [`MAX_PARALLEL`].
        parallel: u32,
        /// Touch all of the guest's RAM on the destination while the disks copy (QEMU's
        /// `prealloc` on its memory backends), so that the RAM stream later writes into memory
        /// the kernel has already zeroed. Left out when false, so an agent that predates it
        /// reads the message as before (and just does not preallocate).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prealloc_ram: bool,
    },
    /// Every mirror is READY: the bulk of the disks is in, and the agent may flush it to stable
    /// storage in the background (the flush at the switchover then has little left to do).
    Synced,
    /// The source QEMU's migration completed (with the return path on: the destination loaded
    /// the whole state). The VM belongs to the destination now: start it there.
    Commit,
    /// Sent instead of `Prepare` by a source recovering an interrupted migration: the source
    /// QEMU's own migration status decided the outcome (`commit`: it completed), and the agent
    /// must act on it for migration `migration_id` and answer `Running` or `Abandoned`.
    Resolve {
        /// The migration, as the agent named it in `Prepared`.
        migration_id: String,
        /// Whether the source QEMU completed the migration.
        commit: bool,
    },
    /// Sent instead of `Prepare` by `ferry status`: list the migrations this agent holds.
    /// Changes nothing; the token is required all the same (see `docs/protocol.md`).
    Status,
    /// Sent instead of `Prepare` by `ferry migrate --dry-run`: run every check `Prepare` would
    /// (TLS policy, free space, binary, command line, host files) and answer `Checked` or
    /// `Refused`, creating nothing. An agent older than this message does not know it and hangs
    /// up, so a dry run can never become a real preparation.
    Check {
        /// The VM, as in `Prepare`.
        vm: VmDescription,
        /// As in `Prepare`.
        tls: bool,
    },
    /// Sent instead of `Prepare` by `ferry xl migrate`: storage for a Xen domain's qdisk disks.
    /// Only `vm.disks` and `vm.running` count: the destination's device model is started by
    /// `xl migrate-receive`, not by the agent, so there is no command line to check.
    PrepareXl {
        /// The disks (argv and machine are empty).
        vm: VmDescription,
        /// Whether the disks travel encrypted.
        tls: bool,
    },
    /// `xl migrate` started its transport: run `xl migrate-receive` with these options and
    /// carry its stream (the link switches to stream mode after `xl_receiving`, see
    /// [`crate::xl::wire`]).
    XlReceive {
        /// The options `xl migrate` put after `migrate-receive` (`-e`, `-d`, `-p`, ...); the agent
        /// accepts only those it knows.
        options: Vec<String>,
    },
    /// The source gives up: roll back everything.
    Abort {
        /// Why, for the agent's log.
        reason: String,
    },
}

/// What the agent sends.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// The version the agent picked and a fresh nonce to sign.
    Challenge {
        /// The chosen protocol version.
        version: u32,
        /// Hex nonce for the source to sign with the token.
        nonce: String,
    },
    /// The source proved it holds the token; here is the agent's proof.
    Authenticated {
        /// Hex HMAC-SHA256 of the source's nonce under the token.
        mac: String,
    },
    /// Storage is ready and served over NBD.
    Prepared {
        /// Identifies this migration in the agent's storage directory and logs.
        migration_id: String,
        /// The NBD server's port on the address the source reached the agent on.
        nbd_port: u16,
        /// One export per disk, in the order of the VM description's disks.
        exports: Vec<ExportInfo>,
        /// This migration's client certificate, key and CA for the source QEMU (NBD and RAM
        /// stream), when the source asked for TLS. Sent on the TLS control link only.
        tls: Option<Box<ClientBundle>>,
    },
    /// After `Prepared`, for `PrepareXl`: where each disk's image is on this host, for the
    /// domain config's `disk` lines.
    XlPrepared {
        /// One image per disk, in the order of the disks.
        images: Vec<ImageInfo>,
    },
    /// `xl migrate-receive` runs; from the next byte on, the link is in stream mode.
    XlReceiving,
    /// The destination waits for the RAM on this port of the agent's address: with TLS the
    /// agent's RAM listener (which forwards to the destination QEMU), with `--insecure` the
    /// destination QEMU's own.
    DestinationReady {
        /// The port.
        migration_port: u16,
    },
    /// The VM runs on the destination.
    Running {
        /// The destination QEMU's pid.
        pid: u32,
        /// Path of the destination QEMU's QMP socket (on the destination host).
        qmp: String,
        /// QEMU's timestamp of the destination's RESUME event, in microseconds since the epoch.
        resumed_at_us: Option<i64>,
        /// Bytes allocated by the destination images after the final flush.
        allocated_bytes: u64,
    },
    /// The destination copy is gone and never ran (or never existed): the source may resume.
    Abandoned {
        /// Why, one line for the operator.
        reason: String,
    },
    /// The answer to `Status`: the migrations in the storage directory, newest first.
    StatusReport {
        /// At most [`crate::agent::inventory::MAX_LISTED`] of them.
        migrations: Vec<crate::agent::inventory::MigrationSummary>,
        /// How many more there are.
        more: usize,
    },
    /// Answer to `Check`: the agent would accept the VM, and this is what it would run.
    Checked {
        /// The destination QEMU's command line, with [`CHECK_DIR`] standing for the migration
        /// directory the agent would create.
        argv: Vec<String>,
        /// The agent's storage directory.
        storage: String,
        /// Free bytes in it now.
        free_bytes: u64,
    },
    /// The agent refuses or failed; it has rolled back. One line meant for the operator.
    Refused {
        /// What went wrong and what to do.
        reason: String,
    },
}

impl SourceMessage {
    /// The message's name, for logs and "expected X, got Y" errors.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceMessage::Hello { .. } => "Hello",
            SourceMessage::Auth { .. } => "Auth",
            SourceMessage::Prepare { .. } => "Prepare",
            SourceMessage::StartDestination { .. } => "StartDestination",
            SourceMessage::Synced => "Synced",
            SourceMessage::Commit => "Commit",
            SourceMessage::Resolve { .. } => "Resolve",
            SourceMessage::Status => "Status",
            SourceMessage::Check { .. } => "Check",
            SourceMessage::PrepareXl { .. } => "PrepareXl",
            SourceMessage::XlReceive { .. } => "XlReceive",
            SourceMessage::Abort { .. } => "Abort",
        }
    }
}

impl AgentMessage {
    /// The message's name, for logs and "unexpected X" errors.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Challenge { .. } => "Challenge",
            AgentMessage::Authenticated { .. } => "Authenticated",
            AgentMessage::Prepared { .. } => "Prepared",
            AgentMessage::XlPrepared { .. } => "XlPrepared",
            AgentMessage::XlReceiving => "XlReceiving",
            AgentMessage::DestinationReady { .. } => "DestinationReady",
            AgentMessage::Running { .. } => "Running",
            AgentMessage::Abandoned { .. } => "Abandoned",
            AgentMessage::StatusReport { .. } => "StatusReport",
            AgentMessage::Checked { .. } => "Checked",
            AgentMessage::Refused { .. } => "Refused",
        }
    }
}

/// One disk's export on the agent's NBD server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportInfo {
    /// The disk's name in the VM description.
    pub disk: String,
    /// The NBD export name: unguessable, so only the authenticated source can find it.
    pub export: String,
}

/// One disk's image on the agent's host (for `xl`'s domain config).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    /// The disk's name in the VM description.
    pub disk: String,
    /// The image's absolute path on the agent's host.
    pub path: String,
}

/// A control-protocol failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The socket failed or closed.
    #[error("control connection failed")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame over the cap.
    #[error("peer sent a {len}-byte frame, more than the {MAX_FRAME}-byte limit")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
    },
    /// The frame is not a message of this protocol.
    #[error("peer sent a message this version does not understand")]
    Malformed(#[source] serde_json::Error),
}

/// Tunes a control connection: no Nagle delay (the messages are small and latency-bound), and
/// TCP keepalive, so that a peer host that vanished (power loss, partition) is noticed within
/// about a minute even when the protocol itself is silent, as it is during a long mirror.
pub fn tune_socket(stream: &tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(20))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(4);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "cannot enable TCP keepalive on the control connection");
    }
}

/// A host as it goes into a QEMU `tcp:HOST:PORT` URI: IPv6 literals in brackets.
pub fn uri_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// Writes one message as a frame.
pub async fn write_message<W, M>(writer: &mut W, message: &M) -> Result<(), ProtocolError>
where
    W: AsyncWrite + Unpin,
    M: Serialize,
{
    let body = serde_json::to_vec(message).map_err(ProtocolError::Malformed)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len: body.len() });
    }
    let len =
        u32::try_from(body.len()).map_err(|_| ProtocolError::FrameTooLarge { len: body.len() })?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    writer.write_all(&frame).await?;
    writer.flush().await?;
    Ok(())
}

/// Reads one frame and decodes it; the length is checked before the body is allocated.
pub async fn read_message<R, M>(reader: &mut R) -> Result<M, ProtocolError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let mut len = [0u8; 4];
    reader.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge { len });
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await?;
    decode(&body)
}

/// Decodes a frame's body (separate so that it can be fuzzed and unit-tested without a socket).
pub fn decode<M: DeserializeOwned>(body: &[u8]) -> Result<M, ProtocolError> {
    serde_json::from_slice(body).map_err(ProtocolError::Malformed)
}

/// The highest version both sides speak.
pub fn pick_version(offered: &[u32]) -> Option<u32> {
    SUPPORTED_VERSIONS
        .iter()
        .rev()
        .find(|v| offered.contains(v))
        .copied()
}

/// A fresh random nonce, hex-encoded.
pub fn new_nonce() -> String {
    let bytes: [u8; NONCE_LEN] = rand::random();
    hex(&bytes)
}

/// Which side signs: the two directions use different labels so a proof cannot be reflected back.
#[derive(Debug, Clone, Copy)]
pub enum Signer {
    /// `ferry migrate` answering the agent's challenge.
    Source,
    /// The agent answering the source's challenge.
    Agent,
}

/// HMAC-SHA256 of `label ‖ binding ‖ nonce` under the token, hex-encoded. `binding` is the TLS
/// exporter value of the session the proof travels in ([`crate::tls::exporter`]).
pub fn sign(token: &[u8], signer: Signer, binding: &[u8], nonce: &str) -> String {
    hex(&mac(token, signer, binding, nonce).finalize().into_bytes())
}

/// Checks a proof in constant time; a malformed hex string is simply wrong.
pub fn verify(token: &[u8], signer: Signer, binding: &[u8], nonce: &str, proof: &str) -> bool {
    match unhex(proof) {
        Some(bytes) => mac(token, signer, binding, nonce)
            .verify_slice(&bytes)
            .is_ok(),
        None => false,
    }
}

fn mac(token: &[u8], signer: Signer, binding: &[u8], nonce: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token).expect("HMAC accepts keys of any length");
    let label: &[u8] = match signer {
        Signer::Source => b"ferry-v3-source:",
        Signer::Agent => b"ferry-v3-agent:",
    };
    mac.update(label);
    // Fixed length (the exporter's): no ambiguity with the nonce that follows.
    mac.update(&(binding.len() as u32).to_be_bytes());
    mac.update(binding);
    mac.update(nonce.as_bytes());
    mac
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || text.len() > 128 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let sent = SourceMessage::Hello {
            versions: vec![1, 7],
            software: "ferry test".into(),
        };
        write_message(&mut a, &sent).await.expect("write");
        let got: SourceMessage = read_message(&mut b).await.expect("read");
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.expect("write");
        let err = read_message::<_, SourceMessage>(&mut b)
            .await
            .expect_err("must refuse");
        assert!(matches!(err, ProtocolError::FrameTooLarge { len } if len == u32::MAX as usize));
    }

    #[tokio::test]
    async fn garbage_is_malformed_not_a_panic() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&5u32.to_be_bytes()).await.expect("write");
        a.write_all(b"{\"ty").await.expect("write");
        a.write_all(b"x").await.expect("write");
        let err = read_message::<_, SourceMessage>(&mut b)
            .await
            .expect_err("must refuse");
        assert!(matches!(err, ProtocolError::Malformed(_)));
    }

    #[tokio::test]
    async fn control_sockets_get_keepalive_and_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tune_socket(&client);
        let sock = socket2::SockRef::from(&client);
        assert!(sock.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            std::time::Duration::from_secs(20)
        );
        assert!(client.nodelay().expect("TCP_NODELAY"));
    }

    #[test]
    fn ipv6_hosts_are_bracketed_for_uris() {
        assert_eq!(uri_host("::1"), "[::1]");
        assert_eq!(uri_host("[::1]"), "[::1]");
        assert_eq!(uri_host("10.0.0.2"), "10.0.0.2");
        assert_eq!(uri_host("agent.example"), "agent.example");
    }

    #[test]
    fn versions_pick_the_highest_common() {
        assert_eq!(pick_version(&[1, 2, 3, 4, 5]), Some(4));
        assert_eq!(pick_version(&[1, 2, 3]), None);
    }

    #[test]
    fn proofs_verify_only_with_the_right_token_direction_and_session() {
        let nonce = new_nonce();
        let session = [7u8; 32];
        let proof = sign(b"secret-token", Signer::Source, &session, &nonce);
        assert!(verify(
            b"secret-token",
            Signer::Source,
            &session,
            &nonce,
            &proof
        ));
        assert!(!verify(
            b"other-token",
            Signer::Source,
            &session,
            &nonce,
            &proof
        ));
        assert!(
            !verify(b"secret-token", Signer::Agent, &session, &nonce, &proof),
            "reflection"
        );
        assert!(
            !verify(b"secret-token", Signer::Source, &[8u8; 32], &nonce, &proof),
            "a proof made in another TLS session (a relay) fails"
        );
        assert!(!verify(
            b"secret-token",
            Signer::Source,
            &session,
            &new_nonce(),
            &proof
        ));
        assert!(!verify(
            b"secret-token",
            Signer::Source,
            &session,
            &nonce,
            "zz"
        ));
        assert!(!verify(
            b"secret-token",
            Signer::Source,
            &session,
            &nonce,
            ""
        ));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode::<SourceMessage>(&bytes);
            let _ = decode::<AgentMessage>(&bytes);
        }
    }
}
