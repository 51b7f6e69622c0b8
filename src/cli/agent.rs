//! `ferry agent --listen ADDR --storage DIR --token-file FILE [--qemu-binary PATH]...
//! [--allow-path DIR]... [--state-dir DIR] [--tls-cert FILE --tls-key FILE] [--tls-ca FILE]
//! [--require-tls]`.

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
    /// Where the agent keeps its TLS key and self-signed certificate (created on first start,
    /// kept afterwards so that its fingerprint does not change).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/ferry")]
    state_dir: PathBuf,
    /// The agent's certificate (PEM, chain leaf first) instead of the generated one; needs
    /// --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require sources to show a certificate signed by this CA (PEM), on top of the token.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Refuse migrations whose disks and RAM would travel in the clear (`ferry migrate
    /// --insecure`).
    #[arg(long)]
    require_tls: bool,
    /// The `xl` to run `migrate-receive` with for `ferry xl migrate` sources (default: `xl` on
    /// PATH). The source never chooses it.
    #[arg(long, value_name = "PATH", default_value = "xl")]
    xl_binary: PathBuf,
}

/// The control link's TLS: the operator's certificate, or the agent's own from `state_dir`;
/// and the line to print once the agent listens.
fn control_tls(args: &AgentArgs) -> Result<(std::sync::Arc<rustls::ServerConfig>, String), String> {
    use crate::tls::Identity;
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Identity::load(cert, key).map_err(|e| e.to_string())?,
        _ => {
            let (identity, created) = Identity::load_or_create(&args.state_dir).map_err(|e| {
                format!(
                    "{e}: create the state directory or point --state-dir elsewhere (or pass --tls-cert/--tls-key)"
                )
            })?;
            if created {
                tracing::info!(dir = %args.state_dir.display(), "created this agent's TLS key and certificate");
            }
            identity
        }
    };
    let line = format!(
        "ferry: agent TLS certificate SHA-256 {}",
        identity.fingerprint()
    );
    let roots = match &args.tls_ca {
        Some(path) => Some(crate::tls::read_roots(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let config = crate::tls::server_config(&identity, roots)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    Ok((config, line))
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
    // Bad input changes nothing: the storage is checked before an identity is created.
    if let Err(e) = crate::agent::check_storage(&args.storage) {
        return super::fail(super::EXIT_USAGE, crate::error_chain(&e));
    }
    let (tls, fingerprint) = match control_tls(&args) {
        Ok(tls) => tls,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let config = AgentConfig {
        tls,
        require_tls: args.require_tls,
        listen: args.listen,
        storage: args.storage,
        token,
        policy,
        recover_window: std::time::Duration::from_secs(args.recover_window),
        xl_binary: args.xl_binary,
    };
    let agent = match Agent::bind(config).await {
        Ok(a) => a,
        Err(e) => return super::fail(super::EXIT_USAGE, crate::error_chain(&e)),
    };
    match agent.local_addr() {
        Ok(addr) => {
            eprintln!("{fingerprint}");
            println!("ferry agent listening on {addr}");
        }
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
