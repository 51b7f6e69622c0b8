//! `ferry xl migrate`: ferry as the storage half of a Xen `xl migrate`. See `docs/xen.md`.
//!
//! - [`migrate`]: the driver (mirrors, then `xl migrate -s "ferry xl relay ..."`, holding END).
//! - [`domain`]: finding the domain, its device model and disks, and checking its config.
//! - [`transport`]: starting `xl migrate` and meeting its relay.
//! - [`finish`]: the final sync while the stream flows.
//! - [`relay`]: the transport xl runs; it only carries bytes to the driver.
//! - [`stream`]: the sender's framing (xl header, libxl and libxc records), enough to find END.
//! - [`wire`]: stream mode of the agent link.
//! - [`config`]: the domain config's disk lines pointed at the agent's images.
//!
//! The agent's half is `crate::agent::xl`.

pub mod config;
pub mod domain;
pub mod finish;
pub mod migrate;
pub mod relay;
pub mod stream;
pub mod transport;
pub mod wire;
