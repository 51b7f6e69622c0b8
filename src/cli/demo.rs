//! `ferry demo`: a real live migration on this machine with the bundled test guest.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

/// Arguments of `ferry demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// QEMU binary for both ends.
    #[arg(long, value_name = "PATH", default_value = ferry_testkit::DEFAULT_QEMU)]
    qemu: PathBuf,
}

/// Runs the demo; exit 0 when the VM migrated and every acknowledged write was found.
pub async fn run(args: DemoArgs) -> ExitCode {
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        super::terminated().await;
        on_signal.cancel();
    });
    match crate::demo::run(&args.qemu, &cancel).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(super::EXIT_FAILED, format!("demo failed: {e:#}")),
    }
}
