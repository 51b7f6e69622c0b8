//! `ferry migrate --qmp SOCKET --to HOST:PORT --token-file FILE [--json] [--insecure]
//! [--dry-run] [--tls-ca FILE [--tls-cert FILE --tls-key FILE]]`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::migrate::report::{HumanReporter, JsonReporter, Reporter};
use crate::migrate::settle::Outcome;
use crate::migrate::{migrate, recover, MigrateOptions};

/// Arguments of `ferry migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    /// The VM's QMP socket (a unix socket on this host).
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// The destination's `ferry agent`, `HOST:PORT`.
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// File holding the shared token (the same content as the agent's).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// Print one JSON object per line instead of human progress.
    #[arg(long)]
    json: bool,
    /// Mirror in write-blocking mode from the start: guest writes wait for the network, and the
    /// disks are guaranteed to converge however fast the guest writes.
    #[arg(long)]
    sync_writes: bool,
    /// Cap each disk's background copy and the RAM stream at this many MiB/s (leave room for
    /// other traffic). Default: as fast as the link goes.
    #[arg(long, value_name = "MIB_PER_SEC", value_parser = positive_rate)]
    bandwidth: Option<f64>,
    /// Cap the RAM stream alone at this many MiB/s; 0: no cap. Default: --bandwidth, if given,
    /// else no cap.
    #[arg(long, value_name = "MIB_PER_SEC")]
    ram_bandwidth: Option<u64>,
    /// The longest the guest may be paused at the switchover, in milliseconds (QEMU's
    /// `downtime-limit`). Default: 50, raised to the source QEMU's own (300) if the RAM has not
    /// converged after 5 passes.
    #[arg(long, value_name = "MS")]
    max_downtime: Option<u64>,
    /// RAM stream connections (QEMU multifd channels), 1 to 16; 1 is one plain stream.
    /// Default: 4 for an encrypted migration from a source QEMU 10.0 or newer, 1 with
    /// --insecure (no relay guards QEMU against a broken multifd channel; see docs/protocol.md),
    /// with a RAM cap (multifd overshoots it) or from an older QEMU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    parallel: Option<u32>,
    /// When the agent allocates all of the guest's RAM on the destination while the disks
    /// copy, so that the RAM stream writes into memory the kernel has already zeroed: a shorter
    /// RAM phase for guests whose RAM is mostly in use, at the price of the guest's whole RAM
    /// allocated there, used or not (no overcommit for this VM on the destination). `auto`:
    /// when the disks' copy is expected to take at least twice as long as the preallocation,
    /// which then costs no time; the flag alone means `always`.
    #[arg(long, value_name = "WHEN", value_enum, num_args = 0..=1, default_value = "auto", default_missing_value = "always")]
    preallocate_ram: crate::migrate::prealloc::RamPrealloc,
    /// Switch a disk's mirror to write-blocking after its remaining work has not shrunk for this
    /// many seconds (needs QEMU 9.1 or later on the source).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    converge_after: u64,
    /// Give up if the disks are not in sync after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    mirror_timeout: u64,
    /// Where the source journal lives (one file per VM, removed once the migration is settled).
    #[arg(long, value_name = "DIR", env = "FERRY_STATE_DIR", default_value = crate::migrate::journal::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Seconds to keep trying to reach the agent when the source QEMU completed and only the
    /// agent can confirm the hand-over (the VM stays paused meanwhile).
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    agent_wait: u64,
    /// Send the disks and the RAM in the clear (the control link stays encrypted). For trusted
    /// networks and benchmarks; an agent started with --require-tls refuses it.
    #[arg(long)]
    insecure: bool,
    /// Check everything and print what would move and how (disks, sizes, data, the destination
    /// command line), changing nothing on either host: discovery, the agent's checks (space,
    /// binary, command line) and the rewrite. Exit 0: the migration would start.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    tls: super::tls::SourceTlsArgs,
}

/// Runs one migration. Exit 0 when the VM runs on the destination, 1 when it failed (and was
/// rolled back), 2 on bad input.
pub async fn run(args: MigrateArgs) -> ExitCode {
    let token = match super::read_token(&args.token_file) {
        Ok(t) => t,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let auth = match args.tls.auth(token) {
        Ok(auth) => auth,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    if !args.qmp.exists() {
        return super::fail(
            super::EXIT_USAGE,
            format!("no QMP socket at {}", args.qmp.display()),
        );
    }
    let mut opts = MigrateOptions::new(args.qmp, args.to, auth);
    opts.tls = !args.insecure;
    opts.sync_writes = args.sync_writes;
    opts.mirror_timeout = Duration::from_secs(args.mirror_timeout);
    let bytes = |mib: f64| (mib * f64::from(1u32 << 20)) as u64;
    opts.mirror_speed = args.bandwidth.map(bytes);
    opts.ram_speed = match args.ram_bandwidth {
        Some(0) => None,
        Some(mib) => Some(mib.saturating_mul(1 << 20)),
        None => args.bandwidth.map(bytes),
    };
    opts.converge_after = Duration::from_secs(args.converge_after);
    opts.max_downtime = args.max_downtime.map(Duration::from_millis);
    opts.parallel = args.parallel;
    opts.prealloc_ram = args.preallocate_ram;
    opts.state_dir = args.state_dir;
    opts.agent_wait = Duration::from_secs(args.agent_wait);
    opts.keeper = std::env::current_exe().ok();
    if let (Some(n @ 2..), Some(cap)) = (opts.parallel, opts.ram_speed) {
        // Without --parallel a capped stream stays one (see `hazards::QemuBuild::channels`).
        eprintln!(
            "ferry: warning: --parallel {n} with the RAM capped at {}/s: QEMU's multifd \
             channels overshoot the cap (measured 36 MiB/s against 20); leave --parallel out \
             to keep it",
            crate::human_bytes(cap)
        );
    }
    if let (Some(n @ 2..), false) = (opts.parallel, opts.tls) {
        eprintln!(
            "ferry: warning: --parallel {n} with --insecure: QEMU's multifd channels go \
             straight to the destination, and a destination that dies during the switchover \
             can leave the source QEMU stuck with the guest paused (docs/protocol.md); leave \
             --parallel out for one stream"
        );
    }
    if args.dry_run {
        return dry_run(&opts, args.json).await;
    }
    // An interrupted migration of the same VM is settled first; if it left the VM on the
    // destination, or could not finish, there is nothing more to do.
    match recover(&opts, None).await {
        Ok(None) => {}
        Ok(Some(recovered)) => {
            eprintln!(
                "ferry: migration {} of this VM was interrupted; settled it first",
                recovered.migration_id
            );
            if !matches!(recovered.outcome, Outcome::Source { pending: None, .. }) {
                return super::recover::report(Some(&recovered), args.json);
            }
        }
        Err(e) => return super::fail(super::EXIT_FAILED, e),
    }
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        super::terminated().await;
        on_signal.cancel();
    });
    // Bars only where a person watches; pipes and files keep the line output.
    let mut reporter: Box<dyn Reporter> = if args.json {
        Box::new(JsonReporter)
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Box::new(super::progress::BarReporter::stderr())
    } else {
        Box::new(HumanReporter::default())
    };
    let reporter = reporter.as_mut();
    match migrate(&opts, reporter, &cancel).await {
        Ok(_) => ExitCode::SUCCESS,
        // The reporter has printed the failure (stderr, or the `failed` JSON event).
        Err(_) => ExitCode::from(super::EXIT_FAILED),
    }
}

/// `--dry-run`: the plan on stdout (one JSON object with `--json`), exit 0; or why the migration
/// would not start, exit 1.
async fn dry_run(opts: &MigrateOptions, json: bool) -> ExitCode {
    match crate::migrate::dry_run::dry_run(opts).await {
        Ok(plan) if json => match serde_json::to_string(&plan) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => super::fail(super::EXIT_FAILED, e),
        },
        Ok(plan) => {
            println!("{}", plan.human());
            ExitCode::SUCCESS
        }
        Err(failure) if json => {
            let failed = crate::migrate::report::Progress::Failed {
                phase: failure.phase.to_string(),
                error: failure.line(),
                source_running: true,
            };
            crate::migrate::report::JsonReporter.report(&failed);
            ExitCode::from(super::EXIT_FAILED)
        }
        Err(failure) => super::fail(
            super::EXIT_FAILED,
            format_args!(
                "dry run: the migration would fail during {}: {} (nothing was changed)",
                failure.phase,
                failure.line()
            ),
        ),
    }
}

/// A rate in MiB/s: a positive number, fractions allowed (0.25 is 256 KiB/s).
fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("{text:?} is not a positive number of MiB/s")),
    }
}
