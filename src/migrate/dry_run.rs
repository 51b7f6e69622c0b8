//! `ferry migrate --dry-run`: everything a migration checks before it changes anything, and what
//! it would do, with nothing changed on either host.
//!
//! On the source only read-only QMP commands run (`query-status`, `query-block`, `qom-get`,
//! `query-memory-size-summary`, `query-yank`) and the journal is read, never written or settled;
//! the agent gets `Check` instead of `Prepare` and answers from the same checks without creating
//! a directory, an image, a certificate or an NBD server (see [`crate::protocol`]).

use serde::Serialize;

use super::control::AgentLink;
use super::error::at;
use super::journal::Journal;
use super::{connect, Failure, MigrateError, MigrateOptions, PhaseName};
use crate::human_bytes;

/// What a migration would do. The JSON form (`--json`) is this object with `"event":
/// "dry_run"`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Plan {
    /// Always `dry_run`, so that a script reading `--json` lines tells it from progress events.
    pub event: &'static str,
    /// Whether the guest runs (a paused VM would arrive paused).
    pub running: bool,
    /// The resolved machine type.
    pub machine: Option<String>,
    /// Guest RAM, bytes.
    pub ram_bytes: u64,
    /// The disks that would travel.
    pub disks: Vec<DiskPlan>,
    /// Whether the disks and the RAM would travel encrypted.
    pub encrypted: bool,
    /// RAM stream connections.
    pub parallel: u32,
    /// Cap on each disk's copy, bytes/s.
    pub mirror_bandwidth: Option<u64>,
    /// Cap on the RAM stream, bytes/s.
    pub ram_bandwidth: Option<u64>,
    /// Whether the mirrors start write-blocking.
    pub sync_writes: bool,
    /// The agent, `HOST:PORT`.
    pub agent: String,
    /// Its storage directory.
    pub storage: String,
    /// Free bytes there.
    pub free_bytes: u64,
    /// What the agent reserves there: the disks' full size.
    pub needed_bytes: u64,
    /// The destination QEMU's command line (`<migration-id>` stands for the directory the agent
    /// would create).
    pub destination_argv: Vec<String>,
    /// An interrupted migration of this VM that a real run would settle first.
    pub interrupted: Option<String>,
}

/// One disk of a [`Plan`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskPlan {
    /// Its name.
    pub disk: String,
    /// The source image.
    pub file: String,
    /// The source image's format.
    pub format: String,
    /// Guest-visible size, bytes.
    pub size: u64,
    /// Bytes the source image allocates (about what the mirror sends); `None` when QEMU does not
    /// say.
    pub allocated_bytes: Option<u64>,
    /// Whether the guest sees it read-only.
    pub read_only: bool,
}

/// Runs discovery, the journal check and the agent's checks; changes nothing.
pub async fn dry_run(opts: &MigrateOptions) -> Result<Plan, Failure> {
    let qemu = connect(opts, PhaseName::Discover).await?;
    let journal = Journal::for_socket(&opts.state_dir, &opts.qmp_socket);
    let interrupted = journal
        .read()
        .map_err(|source| MigrateError::Journal {
            path: journal.path().to_path_buf(),
            source,
        })
        .map_err(at(PhaseName::Discover))?
        .map(|record| record.migration_id);
    // A VM left mid-migration (paused at pre-switchover, say) fails discovery; the interrupted
    // migration, not the VM's state, is what the operator must deal with first.
    let vm = match (qemu.discover().await, &interrupted) {
        (Ok(vm), _) => vm,
        (Err(_), Some(id)) => {
            return Err(Failure::new(
                PhaseName::Discover,
                MigrateError::Interrupted {
                    migration_id: id.clone(),
                    socket: opts.qmp_socket.clone(),
                },
            ))
        }
        (Err(e), None) => return Err(at(PhaseName::Discover)(e)),
    };
    // An interrupted migration's own is settled by a real run first (the plan says so).
    if interrupted.is_none() {
        super::no_migration_in_flight(&qemu, &vm).await?;
    }
    let build = super::vet_settings(&qemu, &vm, opts).await?;
    let discover = at::<super::source::SourceError>(PhaseName::Discover);
    let ram_bytes = qemu.ram_size().await.map_err(&discover)?;
    let negotiate = at::<super::control::ControlError>(PhaseName::Negotiate);
    let mut link = AgentLink::connect(&opts.to, &opts.auth)
        .await
        .map_err(&negotiate)?;
    let checked = link.check(&vm, opts.tls).await.map_err(&negotiate)?;
    Ok(Plan {
        event: "dry_run",
        running: vm.running,
        machine: vm.machine.clone(),
        ram_bytes,
        disks: vm
            .disks
            .iter()
            .map(|d| DiskPlan {
                disk: d.name.clone(),
                file: d.file.clone(),
                format: d.format.clone(),
                size: d.size,
                allocated_bytes: d.allocated,
                read_only: d.read_only,
            })
            .collect(),
        encrypted: opts.tls,
        parallel: super::channels(&build, opts),
        mirror_bandwidth: opts.mirror_speed,
        ram_bandwidth: opts.ram_speed,
        sync_writes: opts.sync_writes,
        agent: opts.to.clone(),
        storage: checked.storage,
        free_bytes: checked.free_bytes,
        needed_bytes: vm.total_disk_bytes(),
        destination_argv: checked.argv,
        interrupted,
    })
}

impl Plan {
    /// The plan for a person: the VM, each disk and how it moves, the RAM, the destination's
    /// space and command line (one option per line, quoted for a POSIX shell).
    pub fn human(&self) -> String {
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line("dry run: nothing was changed on either host".into());
        if let Some(id) = &self.interrupted {
            line(format!(
                "note: migration {id} of this VM was interrupted; a real run settles it first (ferry recover)"
            ));
        }
        let channel = if self.encrypted {
            "encrypted (TLS)"
        } else {
            "IN THE CLEAR (--insecure)"
        };
        line(format!(
            "VM: {}, machine {}, {} RAM, {} disk{}",
            if self.running {
                "running"
            } else {
                "paused (arrives paused)"
            },
            self.machine.as_deref().unwrap_or("?"),
            human_bytes(self.ram_bytes),
            self.disks.len(),
            if self.disks.len() == 1 { "" } else { "s" }
        ));
        line(format!(
            "disks: mirrored while the guest runs (blockdev-mirror over NBD, {channel}{}{}) into sparse raw images:",
            if self.sync_writes { ", write-blocking" } else { "" },
            self.mirror_bandwidth
                .map_or(String::new(), |b| format!(", at most {}/s each", human_bytes(b)))
        ));
        for d in &self.disks {
            line(format!(
                "  {}: {} {}, {} allocated on the source{} ({}) -> {}/{}/{}",
                d.disk,
                human_bytes(d.size),
                d.format,
                d.allocated_bytes.map_or("?".into(), human_bytes),
                if d.read_only { ", read-only" } else { "" },
                d.file,
                self.storage,
                crate::protocol::CHECK_DIR,
                crate::agent::storage::image_file_name(&d.disk)
            ));
        }
        line(format!(
            "RAM: {} once the disks are in sync, over QEMU's migration stream ({channel}, {} connection{}{}), then the switchover",
            human_bytes(self.ram_bytes),
            self.parallel,
            if self.parallel == 1 { "" } else { "s" },
            self.ram_bandwidth
                .map_or(", no bandwidth cap".into(), |b| format!(", at most {}/s", human_bytes(b)))
        ));
        line(format!(
            "destination {}: accepts the VM; {} free in {}, the disks need {}",
            self.agent,
            human_bytes(self.free_bytes),
            self.storage,
            human_bytes(self.needed_bytes)
        ));
        line("destination command line:".into());
        line(format_argv(&self.destination_argv));
        out.trim_end().to_string()
    }
}

/// A command line for a person: the program, then each option with its value on a line of its
/// own, continued with ` \`, each word quoted for a POSIX shell where it needs it.
pub fn format_argv(argv: &[String]) -> String {
    let mut lines: Vec<String> = Vec::new();
    for arg in argv {
        let word = shell_quote(arg);
        match lines.last_mut() {
            Some(last)
                if !arg.starts_with('-')
                    && last.trim_start().starts_with('-')
                    && !last.trim_start().contains(' ') =>
            {
                last.push(' ');
                last.push_str(&word);
            }
            _ => lines.push(if lines.is_empty() {
                format!("  {word}")
            } else {
                format!("    {word}")
            }),
        }
    }
    lines.join(" \\\n")
}

fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,./:@%+".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_pair_options_with_values_and_quote_what_needs_it() {
        let argv: Vec<String> = [
            "/usr/bin/qemu-system-x86_64",
            "-S",
            "-machine",
            "pc-i440fx-10.0",
            "-blockdev",
            "driver=file,filename=/var/lib/ferry/images/<migration-id>/disk-vda.raw",
            "-name",
            "it's",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            format_argv(&argv),
            "  /usr/bin/qemu-system-x86_64 \\\n    -S \\\n    -machine pc-i440fx-10.0 \\\n    \
             -blockdev 'driver=file,filename=/var/lib/ferry/images/<migration-id>/disk-vda.raw' \\\n    \
             -name 'it'\\''s'"
        );
    }
}
