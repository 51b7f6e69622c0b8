//! ferry's test scaffolding, kept out of the product: the test guest seen from the host
//! ([`guest`]: boot it, follow its acknowledgements, verify its disks; [`disk`]: the images it
//! boots with) and the QEMU binaries to test against ([`qemu`]). Used by `tests/`, `bench/`, the `qmp` crate's tests and, behind the
//! `demo` feature, `ferry demo`.

pub mod disk;
pub mod guest;
pub mod qemu;

pub use guest::*;
