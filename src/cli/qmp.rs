//! `ferry qmp SOCKET COMMAND [ARGS_JSON]` and `ferry qmp SOCKET --events`.

use std::process::ExitCode;

/// Arguments of `ferry qmp`.
#[derive(clap::Args, Debug)]
pub struct QmpArgs {}

/// Runs `ferry qmp`.
pub async fn run(_args: QmpArgs) -> ExitCode {
    super::fail(super::EXIT_FAILED, "not implemented yet")
}
