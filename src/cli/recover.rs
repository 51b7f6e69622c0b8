//! `ferry recover --qmp SOCKET --token-file FILE [--to HOST:PORT]`: finish a migration whose
//! `ferry migrate` died (or lost the agent at the hand-over), from the source journal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::migrate::settle::Outcome;
use crate::migrate::{recover, MigrateOptions, Recovered};
use crate::protocol::AgentMessage;

/// Arguments of `ferry recover`.
#[derive(clap::Args, Debug)]
pub struct RecoverArgs {
    /// The VM's QMP socket (a unix socket on this host).
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// File holding the shared token (the same content as the agent's).
    #[arg(long, value_name = "FILE")]
    token_file: PathBuf,
    /// The agent, if it moved since the migration started (default: the journaled address).
    #[arg(long, value_name = "HOST:PORT")]
    to: Option<String>,
    /// Where the source journals live.
    #[arg(long, value_name = "DIR", env = "FERRY_STATE_DIR", default_value = crate::migrate::journal::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Seconds to keep trying to reach the agent when its answer decides the outcome.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    agent_wait: u64,
    /// Print one JSON object instead of a sentence.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: super::tls::SourceTlsArgs,
}

/// Exit 0 when the migration is settled (or there was none), 1 when it could not be decided
/// (the VM stays paused on the source; run it again) or the source has the VM but something is
/// left (the agent could not be told to roll back; run it again), 2 on bad input.
pub async fn run(args: RecoverArgs) -> ExitCode {
    let token = match super::read_token(&args.token_file) {
        Ok(t) => t,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let auth = match args.tls.auth(token) {
        Ok(auth) => auth,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let mut opts = MigrateOptions::new(args.qmp.clone(), String::new(), auth);
    opts.state_dir = args.state_dir;
    opts.agent_wait = Duration::from_secs(args.agent_wait);
    match recover(&opts, args.to.as_deref()).await {
        Ok(recovered) => report(recovered.as_ref(), args.json),
        Err(e) => super::fail(super::EXIT_FAILED, e),
    }
}

/// Prints what recovery did; the exit code follows the outcome.
pub fn report(recovered: Option<&Recovered>, json: bool) -> ExitCode {
    let (owner, text, code) = match recovered {
        None => (
            "source",
            "no interrupted migration of this VM".to_string(),
            ExitCode::SUCCESS,
        ),
        Some(r) => match &r.outcome {
            Outcome::Source { why, pending } => {
                let text = format!(
                    "migration {} rolled back: the VM stays on the source ({why})",
                    r.migration_id
                );
                match pending {
                    None => ("source", text, ExitCode::SUCCESS),
                    Some(pending) => (
                        "source",
                        format!("{text}; but {pending}"),
                        ExitCode::from(super::EXIT_FAILED),
                    ),
                }
            }
            Outcome::Destination { running, .. } => {
                let whereabouts = match running {
                    AgentMessage::Running { pid, qmp, .. } => format!(" (pid {pid}, QMP {qmp})"),
                    _ => String::new(),
                };
                (
                    "destination",
                    format!(
                        "migration {} finished: the VM runs on the destination{whereabouts}; the source QEMU has quit",
                        r.migration_id
                    ),
                    ExitCode::SUCCESS,
                )
            }
            Outcome::Undecided { why } => {
                ("undecided", why.clone(), ExitCode::from(super::EXIT_FAILED))
            }
        },
    };
    if json {
        let id = recovered.map(|r| r.migration_id.clone());
        println!(
            "{}",
            serde_json::json!({"event": "recovered", "owner": owner, "migration_id": id, "message": text})
        );
    } else if owner == "undecided" || code != ExitCode::SUCCESS {
        eprintln!("ferry: {text}");
    } else {
        println!("{text}");
    }
    code
}
