//! The fixtures of ferry's integration tests (`tests/*.rs`): `ferry agent`, `ferry migrate` and
//! `ferry recover` as subprocesses ([`agent`], [`migrate`]), the test guest booted for them
//! ([`guest`]), the checks made from outside on where the VM runs and what is left behind
//! ([`checks`]), a network namespace as the destination host ([`netns`]), and for the NBD tests
//! ferry's server in-process with a raw client and TLS credentials ([`nbd`]).
//!
//! A library rather than a module each test binary includes: a test uses the part it needs and
//! the rest does not warn as dead code. It depends on ferry's library (the in-process NBD server,
//! the TLS credentials), so it cannot live in `ferry-testkit`, which `ferry demo` pulls into the
//! product.

pub mod agent;
pub mod checks;
pub mod files;
pub mod guest;
pub mod migrate;
pub mod nbd;
pub mod netns;
pub mod ops;

pub use agent::*;
pub use checks::*;
pub use files::*;
pub use guest::*;
pub use migrate::*;
pub use netns::*;

use std::path::Path;
use std::process::Command;

/// The `ferry` binary under test. Cargo tells only the test crate where it built it
/// (`env!("CARGO_BIN_EXE_ferry")` at compile time), so each test names it once:
/// `const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));`.
#[derive(Clone, Copy, Debug)]
pub struct Ferry(&'static str);

impl Ferry {
    pub const fn new(path: &'static str) -> Ferry {
        Ferry(path)
    }

    pub fn path(self) -> &'static Path {
        Path::new(self.0)
    }

    /// A command running this binary.
    pub fn command(self) -> Command {
        Command::new(self.0)
    }
}
