//! `ferry agent --listen ADDR --storage DIR --token-file FILE [--qemu-binary PATH]...
//! [--allow-path DIR]...`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::agent::policy::Policy;
use crate::agent::{Agent, AgentConfig};

/// Arguments of `ferry agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Address to accept sources on, e.g. `0.0.0.0:7800` (port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Directory for received disks: one subdirectory per migration.
    #[arg(long, value_name = "DIR")]
    storage: PathBuf,
    /// File holding the shared token (the same file content on the source).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// A QEMU system emulator destination VMs may run, named qemu-system-ARCH; repeatable. The
    /// one whose file name matches the source's binary is used. Default: qemu-system-* on PATH.
    #[arg(long, value_name = "PATH")]
    qemu_binary: Vec<PathBuf>,
    /// A directory `-kernel`, `-initrd`, `-bios`, `-dtb` files may come from; repeatable.
    /// Default: the distribution's firmware directories (/usr/share/qemu, /usr/share/seabios,
    /// /usr/share/ovmf, ...).
    #[arg(long, value_name = "DIR")]
    allow_path: Vec<PathBuf>,
    /// Seconds a paused destination is kept after its source's control connection dropped, for
    /// `ferry recover` on the source to settle it (one whose incoming migration completed is kept
    /// until the source settles it).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    recover_window: u64,
}

/// Runs the agent until SIGINT/SIGTERM. Prints `listening on ADDR` once ready.
pub async fn run(args: AgentArgs) -> ExitCode {
    let token = match super::read_token(&args.token_file) {
        Ok(t) => t,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let policy = match Policy::new(&args.qemu_binary, &args.allow_path) {
        Ok(p) => p,
        Err(e) => return super::fail(super::EXIT_USAGE, crate::error_chain(&e)),
    };
    let config = AgentConfig {
        listen: args.listen,
        storage: args.storage,
        token,
        policy,
        recover_window: std::time::Duration::from_secs(args.recover_window),
    };
    let agent = match Agent::bind(config).await {
        Ok(a) => a,
        Err(e) => return super::fail(super::EXIT_USAGE, crate::error_chain(&e)),
    };
    match agent.local_addr() {
        Ok(addr) => println!("ferry agent listening on {addr}"),
        Err(e) => return super::fail(super::EXIT_FAILED, e),
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        super::terminated().await;
        eprintln!("ferry: draining: no new migrations; waiting for those in progress (signal again to exit now)");
        signal.cancel();
        super::terminated().await;
        // Every migration is journaled: a restarted agent picks up where this one stopped.
        std::process::exit(i32::from(super::EXIT_FAILED));
    });
    agent.run(shutdown).await;
    ExitCode::SUCCESS
}
