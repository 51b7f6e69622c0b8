//! `ferry status (--agent HOST:PORT --token-file FILE | --storage DIR) [--json]`: the migrations
//! an agent holds, from the agent (authenticated like a migration) or from its storage directory
//! on this host (works with the agent stopped). Reads only.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::agent::inventory::{self, MigrationSummary};
use crate::human_bytes;
use crate::migrate::control::{AgentLink, ControlError};

/// Arguments of `ferry status`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("from").required(true).args(["agent", "storage"])))]
pub struct StatusArgs {
    /// Ask the agent at HOST:PORT (needs --token-file).
    #[arg(long, value_name = "HOST:PORT", requires = "token_file")]
    agent: Option<String>,
    /// File holding the shared token (the same content as the agent's).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Read the agent's storage directory on this host instead (the agent may be stopped).
    #[arg(long, value_name = "DIR", conflicts_with = "agent")]
    storage: Option<PathBuf>,
    /// One JSON object on stdout: `{"migrations": [...], "more": N}`.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: super::tls::SourceTlsArgs,
}

/// Lists the migrations; exit 0, 1 when the agent cannot be asked, 2 on bad input.
pub async fn run(args: StatusArgs) -> ExitCode {
    let listed = match (&args.agent, &args.storage) {
        (Some(to), _) => {
            let Some(token_file) = &args.token_file else {
                return super::fail(super::EXIT_USAGE, "--agent needs --token-file");
            };
            let token = match super::read_token(token_file) {
                Ok(t) => t,
                Err(e) => return super::fail(super::EXIT_USAGE, e),
            };
            let auth = match args.tls.auth(token) {
                Ok(a) => a,
                Err(e) => return super::fail(super::EXIT_USAGE, e),
            };
            let mut link = match AgentLink::connect(to, &auth).await {
                Ok(link) => link,
                Err(e) => return super::fail(super::EXIT_FAILED, crate::error_chain(&e)),
            };
            match link.status().await {
                Ok(listed) => listed,
                // Authenticated, then hung up on `Status`: a ferry from before the message.
                Err(ControlError::Lost(why)) => {
                    return super::fail(
                        super::EXIT_FAILED,
                        format!("the agent at {to} hung up on the status request ({why}); an agent older than this ferry does not answer it: upgrade ferry there, or run `ferry status --storage DIR` on that host"),
                    )
                }
                Err(e) => return super::fail(super::EXIT_FAILED, crate::error_chain(&e)),
            }
        }
        (None, Some(storage)) => {
            if let Err(e) = crate::agent::check_storage(storage) {
                return super::fail(super::EXIT_USAGE, crate::error_chain(&e));
            }
            inventory::collect(storage)
        }
        (None, None) => return super::fail(super::EXIT_USAGE, "give --agent or --storage"),
    };
    let (migrations, more) = listed;
    if args.json {
        let out = serde_json::json!({ "migrations": migrations, "more": more });
        println!("{out}");
    } else {
        print!("{}", table(&migrations, more));
    }
    ExitCode::SUCCESS
}

/// The human-readable listing.
fn table(migrations: &[MigrationSummary], more: usize) -> String {
    if migrations.is_empty() {
        return "no migrations\n".to_string();
    }
    let rows: Vec<[String; 7]> = migrations
        .iter()
        .map(|m| {
            [
                m.id.clone(),
                m.phase.to_string(),
                m.vm.clone().unwrap_or_else(|| "-".into()),
                m.disks
                    .iter()
                    .map(|d| d.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                format!("{} / {}", human_bytes(m.received), human_bytes(m.size)),
                age(m.age_secs),
                m.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            ]
        })
        .collect();
    let header = [
        "ID",
        "PHASE",
        "VM",
        "DISKS",
        "RECEIVED / SIZE",
        "AGE",
        "PID",
    ]
    .map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if more > 0 {
        out.push_str(&format!("... and {more} older (see --json)\n"));
    }
    out
}

fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::inventory::DiskInfo;
    use crate::agent::storage::Phase;

    #[test]
    fn the_table_shows_one_line_per_migration() {
        let m = MigrationSummary {
            id: "m1-aa".into(),
            phase: Phase::Started,
            vm: Some("web".into()),
            disks: vec![DiskInfo {
                name: "vda".into(),
                size: 1 << 30,
                received: 1 << 29,
            }],
            received: 1 << 29,
            size: 1 << 30,
            age_secs: 65,
            pid: Some(42),
            reserved: 1 << 30,
        };
        let text = table(&[m], 2);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID     PHASE    VM   DISKS"), "{text}");
        assert!(
            lines[1].contains("started  web  vda    512.0 MiB / 1.0 GiB  1m05s  42"),
            "{text}"
        );
        assert_eq!(lines[2], "... and 2 older (see --json)");
        assert_eq!(table(&[], 0), "no migrations\n");
        assert_eq!(age(90_000), "1d01h");
    }
}
