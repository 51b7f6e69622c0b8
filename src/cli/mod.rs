//! The command line: one file per subcommand, each owning its clap arguments and its `run`.
//!
//! Exit codes are a contract with scripts: 0 success, 1 the operation itself failed (a QMP error,
//! a failed migration), 2 bad input (a missing socket, bad JSON, bad flags), printed as one line
//! on stderr.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

mod agent;
#[cfg(feature = "demo")]
mod demo;
mod docs;
mod migrate;
mod nbd_serve;
mod progress;
mod qmp;
mod recover;
mod status;
mod tls;
mod xl;

/// The agent's files as the package installs them: `ferry agent --help` and its man page.
const AGENT_FILES: &str = "Files, as the Debian package installs them: /etc/ferry/agent.toml \
holds the options for --config (keys named like the flags: listen, storage, token-file, ...; a \
flag on the command line wins); /etc/ferry/token the shared token (mode 0600, the same on every \
source); /var/lib/ferry the agent's TLS key and certificate (--state-dir); /var/lib/ferry/images \
the received disks (--storage). The package's ferry-agent.service runs `ferry agent --config \
/etc/ferry/agent.toml`.";

/// Exit code for "the operation ran and failed".
pub const EXIT_FAILED: u8 = 1;
/// Exit code for "bad input: nothing was done".
pub const EXIT_USAGE: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Live-migrate QEMU VMs with their local disks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send one QMP command to a QEMU monitor socket, or follow its events.
    Qmp(qmp::QmpArgs),
    /// Serve raw files or block devices over NBD until SIGINT/SIGTERM.
    NbdServe(nbd_serve::NbdServeArgs),
    /// Receive migrations on the destination host (long-running service).
    #[command(after_long_help = AGENT_FILES)]
    Agent(agent::AgentArgs),
    /// Live-migrate the VM behind a QMP socket to a host running `ferry agent`.
    Migrate(migrate::MigrateArgs),
    /// Settle a migration whose `ferry migrate` died or lost the agent: finish it on the
    /// destination or roll it back to the source, and remove its leftovers.
    Recover(recover::RecoverArgs),
    /// List the migrations an agent holds: phase, VM, disks, bytes received, age, QEMU pid.
    Status(status::StatusArgs),
    /// Xen: `ferry xl migrate` moves a domain's qdisk disks and carries `xl migrate`'s stream.
    Xl(xl::XlArgs),
    /// Migrate the bundled test guest on this machine, both ends on localhost, and verify it.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenDocs(docs::GenDocsArgs),
    /// Internal: the RAM keeper `ferry migrate` starts beside a multifd relay (stdin: its
    /// control socket).
    #[command(hide = true, name = crate::tunnel::keeper::SUBCOMMAND)]
    KeepRamChannels,
}

/// Parses the command line, runs the subcommand on a tokio runtime and returns its exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::KeepRamChannels) {
        // No runtime, no logging: a few blocking reads (see `tunnel::keeper`).
        return crate::tunnel::keeper::run();
    }
    if matches!(cli.command, Command::Migrate(_) | Command::Xl(_)) {
        // Before the runtime's threads exist: they relay the encrypted streams.
        crate::tunnel::keep_freed_memory();
    }
    init_tracing(matches!(cli.command, Command::Agent(_)));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                EXIT_FAILED,
                format_args!("cannot start the async runtime: {e}"),
            )
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Qmp(args) => qmp::run(args).await,
            Command::NbdServe(args) => nbd_serve::run(args).await,
            Command::Agent(args) => agent::run(args).await,
            Command::Migrate(args) => migrate::run(args).await,
            Command::Recover(args) => recover::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Xl(args) => xl::run(args).await,
            #[cfg(feature = "demo")]
            Command::Demo(args) => demo::run(args).await,
            Command::GenDocs(args) => docs::run(args, Cli::command()),
            Command::KeepRamChannels => ExitCode::SUCCESS,
        }
    })
}

/// Prints `ferry: MESSAGE` on stderr and returns `code`: the one-line error every command uses.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ferry: {message}");
    ExitCode::from(code)
}

/// Logs go to stderr, filtered by `FERRY_LOG` (e.g. `FERRY_LOG=ferry=debug`); quiet by default so
/// that stdout stays machine-readable, except for the agent (a `service`), whose info lines (one
/// per migration phase change) are what its operator reads. Colours only on a terminal; under
/// systemd (`JOURNAL_STREAM` set) no timestamps, since journald stamps every line itself.
fn init_tracing(service: bool) {
    let default = if service { "warn,ferry=info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// Reads a shared token: the file's content without surrounding white space. Refuses a missing,
/// empty or short token rather than run with a guessable one, and a file other users can read
/// (anyone who reads the token may run migrations into the agent).
pub fn read_token(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let cannot = |e: std::io::Error| format!("cannot read token file {}: {e}", path.display());
    let mut file = std::fs::File::open(path).map_err(cannot)?;
    // The mode of the file actually opened, not of whatever the path names a moment later.
    let mode = file.metadata().map_err(cannot)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {} is accessible by group or others (mode {:04o}): run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        ));
    }
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(cannot)?;
    let token = text.trim_ascii().to_vec();
    if token.len() < 16 {
        return Err(format!(
            "token file {} holds {} bytes; use at least 16 random bytes (e.g. `(umask 077; head -c 32 /dev/urandom | base64 > {})`)",
            path.display(),
            token.len(),
            path.display()
        ));
    }
    Ok(token)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
