//! NBD: the destination's data path. A tokio NBD server that serves raw files and block devices
//! to QEMU's `blockdev-mirror` (and to qemu-img, nbdcopy, nbdinfo), following `doc/proto.md` of
//! the NetworkBlockDevice/nbd repository. Knows nothing of migration.
//!
//! ```text
//!  client                                                 server
//!    │ ◄─────────────── greeting (NBDMAGIC IHAVEOPT) ──────── │  handshake phase
//!    ┊ ── STARTTLS ─► ◄─ ACK ─ ◄═ TLS handshake ═►            ┊  (ServerConfig::tls: required)
//!    │ ── options: EXTENDED_HEADERS | STRUCTURED_REPLY, ────► │  (handshake.rs, bounded by
//!    │    SET_META_CONTEXT base:allocation, LIST, INFO       │   ServerConfig::handshake_timeout)
//!    │ ── GO(name, BLOCK_SIZE) ─────────────────────────────► │
//!    │ ◄─────────────── INFO(size, flags) INFO(sizes) ACK ─── │
//!    │                                                        │  transmission phase
//!    │ ── READ/WRITE/FLUSH/TRIM/WRITE_ZEROES/BLOCK_STATUS ──► │  (connection.rs: many in flight,
//!    │ ◄───────────────────── replies, in any order ──────── │   replies out of order)
//!    │ ── DISC ─────────────────────────────────────────────► │  in-flight requests finish,
//!    ╵                                                        ╵  then the socket closes
//! ```
//!
//! Modules, each with one job:
//! - [`wire`]: constants, parsers and encoders; pure, fuzzed (`fuzz/`).
//! - `handshake`: option negotiation on any byte stream, STARTTLS when TLS is required.
//! - `transport`: the stream a connection runs on: plain TCP, or TLS over it.
//! - `request`: checks a request against the session and the export (pure).
//! - `connection`: the transmission loop: reader, write lane, blocking pool.
//! - `job`: runs one request against the backend and encodes its reply.
//! - `sink`: replies written by the thread that completes them, backlog when the socket is full;
//!   over TLS, queued to the one task that writes the session.
//! - `backend`: pread/pwrite, fdatasync, hole punching, SEEK_DATA/SEEK_HOLE (all blocking).
//! - `export`: exports' lifecycle and the name registry.
//! - `server`: listener, connection bound, add/remove exports, graceful shutdown.
//! - [`stats`]: request, error and byte counters for the embedder's metrics.
//!
//! `docs/nbd.md` describes what is supported and the flags advertised, for people who don't read
//! Rust.

mod backend;
mod buffers;
mod connection;
mod export;
mod handshake;
mod job;
mod request;
mod server;
mod sink;
pub mod stats;
mod transport;
pub mod wire;
mod writeback;

pub use server::{Export, NbdError, NbdServer, ServerConfig};
pub use stats::NbdStats;
