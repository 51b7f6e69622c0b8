//! `ferry xl migrate [-C CONFIG] [-e] [-p] [-D] [-F] [--debug] DOMAIN HOST:PORT --token-file FILE`
//! and `ferry xl relay` (the transport `ferry xl migrate` gives to `xl migrate -s`). See
//! `docs/xen.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::migrate::report::{HumanReporter, JsonReporter, Reporter};
use crate::migrate::MigrateOptions;
use crate::xl::migrate::{migrate, XlOptions};

/// `ferry xl ...`.
#[derive(clap::Args, Debug)]
pub struct XlArgs {
    #[command(subcommand)]
    command: XlCommand,
}

#[derive(clap::Subcommand, Debug)]
enum XlCommand {
    /// Live-migrate a Xen domain with its qdisk disks: ferry mirrors the disks to the agent on
    /// HOST, then runs `xl migrate` with ferry as its transport.
    Migrate(Box<MigrateArgs>),
    /// The transport `ferry xl migrate` gives to `xl migrate -s`; not for direct use.
    Relay(RelayArgs),
}

/// Arguments of `ferry xl migrate`.
#[derive(clap::Args, Debug)]
struct MigrateArgs {
    /// The domain's config file (xl.cfg), as for `xl migrate -C`: ferry sends it with its disks
    /// pointed at the destination's images.
    #[arg(short = 'C', value_name = "CONFIG")]
    config: PathBuf,
    /// Passed to `xl migrate`: no daemonizing on the receiver (`-e`).
    #[arg(short = 'e')]
    no_daemon: bool,
    /// Passed to `xl migrate`: leave the domain paused on the receiver (`-p`).
    #[arg(short = 'p')]
    paused: bool,
    /// Passed to `xl migrate`: keep the domain id (`-D`).
    #[arg(short = 'D')]
    preserve_domid: bool,
    /// Passed to `xl migrate`: do not daemonize (`-F`).
    #[arg(short = 'F')]
    foreground: bool,
    /// Passed to `xl migrate`: `--debug`.
    #[arg(long)]
    debug: bool,
    /// The domain, by name or id.
    domain: String,
    /// The destination's `ferry agent`, `HOST:PORT` (also what xl is told as its HOST).
    host: String,
    /// File holding the shared token (the same content as the agent's).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The `xl` to run.
    #[arg(long, value_name = "PATH", default_value = "xl")]
    xl: PathBuf,
    /// Where libxl keeps the device models' QMP sockets (`qmp-libxl-<domid>`).
    #[arg(long, value_name = "DIR", default_value = "/var/run/xen")]
    xen_run_dir: PathBuf,
    /// Print one JSON object per line instead of human progress.
    #[arg(long)]
    json: bool,
    /// Mirror in write-blocking mode from the start.
    #[arg(long)]
    sync_writes: bool,
    /// Cap each disk's copy at this many MiB/s.
    #[arg(long, value_name = "MIB_PER_SEC")]
    bandwidth: Option<u64>,
    /// Give up if the disks are not in sync after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    mirror_timeout: u64,
    /// Where the source journal, the rewritten config and the relay's socket live.
    #[arg(long, value_name = "DIR", env = "FERRY_STATE_DIR", default_value = crate::migrate::journal::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Send the disks in the clear (the control link, which carries xl's stream, stays
    /// encrypted).
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    tls: super::tls::SourceTlsArgs,
}

/// Arguments of `ferry xl relay`.
#[derive(clap::Args, Debug)]
struct RelayArgs {
    /// `ferry xl migrate`'s socket.
    #[arg(long, value_name = "SOCKET")]
    via: PathBuf,
    /// What xl appends: `HOST xl [...] migrate-receive [...]`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    rest: Vec<String>,
}

/// Runs `ferry xl ...`. `migrate` exits 0 when the domain runs on the destination, 1 when the
/// migration failed (the message says where the domain is), 2 on bad input (nothing done).
pub async fn run(args: XlArgs) -> ExitCode {
    match args.command {
        XlCommand::Migrate(args) => run_migrate(*args).await,
        XlCommand::Relay(args) => {
            let result =
                tokio::task::spawn_blocking(move || crate::xl::relay::run(&args.via, &args.rest))
                    .await;
            match result {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => super::fail(super::EXIT_FAILED, format!("xl relay: {e}")),
                Err(e) => super::fail(super::EXIT_FAILED, format!("xl relay: {e}")),
            }
        }
    }
}

async fn run_migrate(args: MigrateArgs) -> ExitCode {
    let token = match super::read_token(&args.token_file) {
        Ok(t) => t,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let auth = match args.tls.auth(token) {
        Ok(auth) => auth,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    if !args.host.contains(':') {
        return super::fail(
            super::EXIT_USAGE,
            format!(
                "HOST {} has no port: give the agent as HOST:PORT",
                args.host
            ),
        );
    }
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            return super::fail(
                super::EXIT_FAILED,
                format!("cannot find this program's path for xl's transport: {e}"),
            )
        }
    };
    let mut base = MigrateOptions::new(PathBuf::new(), args.host.clone(), auth);
    base.tls = !args.insecure;
    base.sync_writes = args.sync_writes;
    base.mirror_timeout = Duration::from_secs(args.mirror_timeout);
    base.mirror_speed = args.bandwidth.map(|m| m.saturating_mul(1 << 20));
    base.state_dir = args.state_dir;
    let mut xl_flags = Vec::new();
    for (on, flag) in [
        (args.no_daemon, "-e"),
        (args.paused, "-p"),
        (args.preserve_domid, "-D"),
        (args.foreground, "-F"),
        (args.debug, "--debug"),
    ] {
        if on {
            xl_flags.push(flag.to_string());
        }
    }
    let opts = XlOptions {
        base,
        xl: args.xl,
        run_dir: args.xen_run_dir,
        domain: args.domain,
        config: args.config,
        xl_flags,
        relay: vec![exe.display().to_string(), "xl".into(), "relay".into()],
    };
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        super::terminated().await;
        on_signal.cancel();
    });
    let mut json = JsonReporter;
    let mut human = HumanReporter::default();
    let reporter: &mut dyn Reporter = if args.json { &mut json } else { &mut human };
    match migrate(&opts, reporter, &cancel).await {
        Ok(summary) => {
            if args.json {
                let mut line = serde_json::json!({"event": "xl_completed"});
                if let (Some(obj), Ok(serde_json::Value::Object(s))) =
                    (line.as_object_mut(), serde_json::to_value(&summary))
                {
                    obj.extend(s);
                }
                println!("{line}");
            } else {
                println!(
                    "domain {} moved: disks final {:.1} ms after END was held (final sync {:.1} ms{}), migration {}",
                    opts.domain,
                    summary.end_held_ms,
                    summary.final_sync_ms,
                    if summary.stopped_device_model { ", device model stopped by ferry" } else { "" },
                    summary.migration_id
                );
            }
            ExitCode::SUCCESS
        }
        Err(failure) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"event": "failed", "phase": failure.phase.to_string(), "error": failure.line(), "source_running": failure.source_running})
                );
            }
            // A failure while reading the domain is bad input: nothing was done yet.
            let code = if failure.phase == crate::migrate::PhaseName::Discover {
                super::EXIT_USAGE
            } else {
                super::EXIT_FAILED
            };
            super::fail(
                code,
                format!(
                    "xl migrate of {} failed at {}: {}{}",
                    opts.domain,
                    failure.phase,
                    failure.line(),
                    if failure.source_running {
                        "; the domain runs on the source"
                    } else {
                        ""
                    }
                ),
            )
        }
    }
}
