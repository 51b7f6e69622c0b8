//! ferry: live-migrate running QEMU virtual machines together with their local disks between two
//! hosts that share no storage.
//!
//! Where things live:
//! - [`nbd`]: the NBD wire format, the tokio NBD server and its file backend (the destination's
//!   data path). Knows nothing of migration.
//! - [`cli`]: the command line, one file per subcommand, output formats and exit codes.

pub mod cli;
pub mod nbd;
