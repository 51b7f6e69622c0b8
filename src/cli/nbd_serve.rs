//! `ferry nbd-serve --listen ADDR --export NAME=PATH ... [--read-only]`.

use std::process::ExitCode;

/// Arguments of `ferry nbd-serve`.
#[derive(clap::Args, Debug)]
pub struct NbdServeArgs {}

/// Runs `ferry nbd-serve`.
pub async fn run(_args: NbdServeArgs) -> ExitCode {
    super::fail(super::EXIT_FAILED, "not implemented yet")
}
