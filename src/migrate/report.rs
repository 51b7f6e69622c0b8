//! What a migration tells the operator as it goes: typed progress events, printed either as one
//! JSON object per line (`--json`, for scripts) or as human progress lines.

use std::io::Write;

use serde::Serialize;

use crate::human_bytes;

/// One progress event. The JSON form is `{"event": NAME, ...fields}`.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The agent accepted the VM.
    Prepared {
        /// The agent's id for this migration.
        migration_id: String,
        /// Disks that travel, with their sizes.
        disks: Vec<DiskSize>,
    },
    /// A disk's mirror advanced.
    Mirror {
        /// The disk.
        disk: String,
        /// Bytes copied so far (QEMU's job offset).
        done: u64,
        /// Bytes to copy (QEMU's job length; grows while the guest writes).
        total: u64,
    },
    /// A disk's mirror is in sync (BLOCK_JOB_READY).
    MirrorReady {
        /// The disk.
        disk: String,
    },
    /// A mirror did not converge and was switched to write-blocking mode.
    MirrorWriteBlocking {
        /// The disk.
        disk: String,
    },
    /// The RAM migration advanced.
    Ram {
        /// QEMU's migration status.
        status: String,
        /// Bytes sent.
        transferred: u64,
        /// Bytes left in this pass.
        remaining: u64,
        /// Guest RAM size.
        total: u64,
    },
    /// The guest is paused for the final sync.
    Switchover,
    /// The VM runs on the destination.
    Completed(Summary),
    /// The migration failed and was rolled back (or, after the switchover, could not finish).
    Failed {
        /// The phase that failed.
        phase: String,
        /// What went wrong, one line.
        error: String,
        /// Whether the source VM was left running.
        source_running: bool,
    },
}

/// A disk and its size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DiskSize {
    /// The disk's name.
    pub disk: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The figures of a completed migration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    /// QEMU's own downtime figure, in milliseconds.
    pub downtime_ms: Option<u64>,
    /// From the source's STOP event to the destination's RESUME event (QEMU timestamps; only
    /// meaningful when both hosts' clocks agree).
    pub stop_to_resume_ms: Option<f64>,
    /// Wall time of the whole migration.
    pub total_ms: u64,
    /// Where the time went.
    pub phases_ms: PhaseTimes,
    /// Disk bytes the mirrors copied.
    pub disk_bytes: u64,
    /// RAM bytes sent.
    pub ram_bytes: u64,
    /// Bytes the destination images allocate.
    pub destination_allocated_bytes: u64,
    /// The destination QEMU.
    pub destination: DestinationInfo,
    /// Whether the disks and the RAM travelled encrypted (TLS); the control link always is.
    pub encrypted: bool,
}

/// Milliseconds spent in each phase.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PhaseTimes {
    /// Connect, authenticate, prepare storage.
    pub negotiation: u64,
    /// Start of the mirrors to every disk READY.
    pub mirror: u64,
    /// Destination start and RAM copy up to pre-switchover.
    pub ram: u64,
    /// Final sync, device state, resume on the destination.
    pub switchover: u64,
}

/// Where the VM runs now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DestinationInfo {
    /// Its pid on the destination host.
    pub pid: u32,
    /// Its QMP socket on the destination host.
    pub qmp: String,
}

/// Receives progress events.
pub trait Reporter: Send {
    /// One event.
    fn report(&mut self, event: &Progress);
}

/// One JSON object per line on stdout.
pub struct JsonReporter;

impl Reporter for JsonReporter {
    fn report(&mut self, event: &Progress) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Human-readable progress on stdout: one line per disk update (at most every few percent) and
/// per RAM update, then the summary.
#[derive(Default)]
pub struct HumanReporter {
    last_percent: std::collections::HashMap<String, u64>,
    last_ram: u64,
}

impl Reporter for HumanReporter {
    fn report(&mut self, event: &Progress) {
        let Some(line) = self.line(event) else { return };
        // A failure is the one line an operator must not miss: stderr, like every ferry error.
        if matches!(event, Progress::Failed { .. }) {
            eprintln!("ferry: {line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

impl HumanReporter {
    fn line(&mut self, event: &Progress) -> Option<String> {
        match event {
            Progress::Prepared {
                migration_id,
                disks,
            } => {
                let list: Vec<String> = disks
                    .iter()
                    .map(|d| format!("{} ({})", d.disk, human_bytes(d.size)))
                    .collect();
                Some(format!(
                    "agent accepted migration {migration_id}: {}",
                    list.join(", ")
                ))
            }
            Progress::Mirror { disk, done, total } => {
                let percent = if *total == 0 {
                    100
                } else {
                    done.saturating_mul(100) / total
                };
                let last = self.last_percent.get(disk).copied();
                if last.is_some_and(|l| percent < l + 5 && (percent != 100 || l == 100)) {
                    return None;
                }
                self.last_percent.insert(disk.clone(), percent);
                Some(format!(
                    "  disk {disk}: {} / {} ({percent}%)",
                    human_bytes(*done),
                    human_bytes(*total)
                ))
            }
            Progress::MirrorReady { disk } => Some(format!("  disk {disk}: in sync")),
            Progress::MirrorWriteBlocking { disk } => Some(format!(
                "  disk {disk}: guest writes outpace the copy; switching to synchronous mirroring"
            )),
            Progress::Ram {
                status,
                transferred,
                remaining,
                total,
            } => {
                if *transferred < self.last_ram + (64 << 20) && status == "active" {
                    return None;
                }
                self.last_ram = *transferred;
                Some(format!(
                    "  ram: {} sent, {} remaining of {} ({status})",
                    human_bytes(*transferred),
                    human_bytes(*remaining),
                    human_bytes(*total)
                ))
            }
            Progress::Switchover => Some("  switching over (guest paused)".to_string()),
            Progress::Completed(s) => Some(format!(
                "migration completed in {:.1} s; downtime {} ms (QEMU){}; disks {} + ram {} sent \
                 {}; destination allocates {}; VM runs as pid {} (QMP {})",
                s.total_ms as f64 / 1000.0,
                s.downtime_ms.map_or("?".to_string(), |d| d.to_string()),
                s.stop_to_resume_ms
                    .map_or(String::new(), |d| format!(", {d:.1} ms STOP to RESUME")),
                human_bytes(s.disk_bytes),
                human_bytes(s.ram_bytes),
                if s.encrypted {
                    "encrypted (TLS)"
                } else {
                    "IN THE CLEAR (--insecure)"
                },
                human_bytes(s.destination_allocated_bytes),
                s.destination.pid,
                s.destination.qmp
            )),
            Progress::Failed {
                phase,
                error,
                source_running,
            } => Some(format!(
                "migration failed during {phase}: {error}{}",
                if *source_running {
                    " (the VM keeps running on the source)"
                } else {
                    ""
                }
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_the_documented_one() {
        let v = serde_json::to_value(Progress::Mirror {
            disk: "vda".into(),
            done: 1,
            total: 2,
        })
        .expect("json");
        assert_eq!(
            v,
            serde_json::json!({"event": "mirror", "disk": "vda", "done": 1, "total": 2})
        );
        let v = serde_json::to_value(Progress::Failed {
            phase: "mirror".into(),
            error: "x".into(),
            source_running: true,
        })
        .expect("json");
        assert_eq!(v["event"], "failed");
        assert_eq!(v["phase"], "mirror");
    }

    #[test]
    fn human_mirror_lines_are_throttled() {
        let mut h = HumanReporter::default();
        let ev = |done| Progress::Mirror {
            disk: "vda".into(),
            done,
            total: 100,
        };
        assert!(h.line(&ev(1)).is_some());
        assert!(h.line(&ev(3)).is_none());
        assert!(h.line(&ev(7)).is_some());
        assert!(h.line(&ev(100)).is_some());
        assert!(
            h.line(&ev(100)).is_none(),
            "a disk in sync is not repeated every poll"
        );
    }
}
