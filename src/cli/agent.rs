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
        signal.cancel();
    });
    agent.run(shutdown).await;
    ExitCode::SUCCESS
}
