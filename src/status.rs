//! Typed views of the two QEMU answers both ends of a migration poll: `query-migrate` and
//! `query-block-jobs`, and the one wait helper that watches a migration reach a status.
//!
//! The views are lenient on purpose: QEMU 7.2 and 10.x report different optional fields, and an
//! unknown status must not make a reader fail (it is carried as [`MigrationStatus::Other`]), so
//! these are read from raw JSON rather than through the `qapi` crate's exact schema.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// QEMU's `MigrationStatus`, the values a driver acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration has run (or, on a destination, nothing has arrived yet).
    None,
    /// Connecting and setting up.
    Setup,
    /// Copying RAM.
    Active,
    /// Stopped at `pause-before-switchover`, waiting for `migrate-continue`.
    PreSwitchover,
    /// Sending (or, on a destination, loading) the final device state.
    Device,
    /// Being cancelled.
    Cancelling,
    /// Cancelled: the source owns the VM (and QEMU resumed it if it was running).
    Cancelled,
    /// Failed: the source owns the VM (and QEMU resumed it if it was running).
    Failed,
    /// Completed: with the return path on, the destination has loaded the whole state.
    Completed,
    /// Any other status (postcopy, colo, wait-unplug...): not final.
    Other(String),
}

impl MigrationStatus {
    /// Parses QEMU's status word.
    pub fn parse(text: &str) -> MigrationStatus {
        match text {
            "none" | "" => MigrationStatus::None,
            "setup" => MigrationStatus::Setup,
            "active" => MigrationStatus::Active,
            "pre-switchover" => MigrationStatus::PreSwitchover,
            "device" => MigrationStatus::Device,
            "cancelling" => MigrationStatus::Cancelling,
            "cancelled" => MigrationStatus::Cancelled,
            "failed" => MigrationStatus::Failed,
            "completed" => MigrationStatus::Completed,
            other => MigrationStatus::Other(other.to_string()),
        }
    }

    /// A status the migration stays in until something new starts.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            MigrationStatus::None
                | MigrationStatus::Cancelled
                | MigrationStatus::Failed
                | MigrationStatus::Completed
        )
    }

    /// QEMU's word for it.
    pub fn as_str(&self) -> &str {
        match self {
            MigrationStatus::None => "none",
            MigrationStatus::Setup => "setup",
            MigrationStatus::Active => "active",
            MigrationStatus::PreSwitchover => "pre-switchover",
            MigrationStatus::Device => "device",
            MigrationStatus::Cancelling => "cancelling",
            MigrationStatus::Cancelled => "cancelled",
            MigrationStatus::Failed => "failed",
            MigrationStatus::Completed => "completed",
            MigrationStatus::Other(s) => s,
        }
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of `query-migrate` ferry reads.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// Where the migration stands.
    pub status: MigrationStatus,
    /// QEMU's reason for a failure, if it gave one.
    pub error: Option<String>,
    /// The measured downtime (ms), once completed.
    pub downtime_ms: Option<u64>,
    /// RAM bytes sent so far.
    pub ram_transferred: u64,
    /// RAM bytes left in this pass.
    pub ram_remaining: u64,
    /// Guest RAM size.
    pub ram_total: u64,
    /// Dirty-bitmap syncs so far: one per pass over the RAM.
    pub dirty_syncs: u64,
    /// On a destination: the port `migrate-incoming tcp:HOST:0` picked.
    pub incoming_port: Option<u16>,
}

impl MigrationInfo {
    /// Reads a `query-migrate` answer.
    pub fn from_json(info: &Value) -> MigrationInfo {
        let ram = |k: &str| {
            info.get("ram")
                .and_then(|r| r.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        MigrationInfo {
            status: MigrationStatus::parse(
                info.get("status").and_then(Value::as_str).unwrap_or(""),
            ),
            error: info
                .get("error-desc")
                .and_then(Value::as_str)
                .map(str::to_string),
            downtime_ms: info.get("downtime").and_then(Value::as_u64),
            ram_transferred: ram("transferred"),
            ram_remaining: ram("remaining"),
            ram_total: ram("total"),
            dirty_syncs: ram("dirty-sync-count"),
            incoming_port: info
                .get("socket-address")
                .and_then(Value::as_array)
                .and_then(|addrs| {
                    addrs
                        .iter()
                        .find_map(|a| a.get("port")?.as_str()?.parse().ok())
                }),
        }
    }

    /// `query-migrate` on `qmp`.
    pub async fn query(qmp: &qmp::Qmp) -> Result<MigrationInfo, qmp::Error> {
        let info = qmp.execute_raw("query-migrate", Value::Null).await?;
        Ok(MigrationInfo::from_json(&info))
    }

    /// QEMU's reason for a failure, or a stand-in.
    pub fn why(&self) -> &str {
        self.error.as_deref().unwrap_or("QEMU gave no reason")
    }
}

/// A `query-migrate` poll that did not reach the wanted status.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// QMP failed (the QEMU is gone, or refused the query).
    #[error("query-migrate failed")]
    Qmp(#[from] qmp::Error),
    /// The deadline passed; the last status seen.
    #[error("the migration was still `{last}` after {secs} s")]
    Timeout {
        /// The status when time ran out.
        last: MigrationStatus,
        /// The timeout.
        secs: u64,
    },
}

/// Polls `query-migrate` every `every` until `done` holds for the status, or `timeout` passes.
/// The one place either end waits on a migration's status.
pub async fn wait_migration(
    qmp: &qmp::Qmp,
    timeout: Duration,
    every: Duration,
    done: impl Fn(&MigrationStatus) -> bool,
) -> Result<MigrationInfo, WaitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = MigrationInfo::query(qmp).await?;
        if done(&info.status) {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            return Err(WaitError::Timeout {
                last: info.status,
                secs: timeout.as_secs(),
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockJob {
    /// The job id (`device` in QEMU's answer).
    pub id: String,
    /// Bytes done.
    pub offset: u64,
    /// Bytes to do (grows while the guest writes).
    pub len: u64,
    /// In sync (a mirror that has sent BLOCK_JOB_READY).
    pub ready: bool,
    /// QEMU's job status word (`running`, `ready`, `concluded`...).
    pub status: String,
}

impl BlockJob {
    /// Reads a `query-block-jobs` answer.
    pub fn list_from_json(jobs: &Value) -> Vec<BlockJob> {
        jobs.as_array()
            .into_iter()
            .flatten()
            .filter_map(|j| {
                Some(BlockJob {
                    id: j.get("device")?.as_str()?.to_string(),
                    offset: j.get("offset").and_then(Value::as_u64).unwrap_or(0),
                    len: j.get("len").and_then(Value::as_u64).unwrap_or(0),
                    ready: j.get("ready").and_then(Value::as_bool).unwrap_or(false),
                    status: j
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                })
            })
            .collect()
    }

    /// Bytes still to copy.
    pub fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn migrate_info_reads_both_ends() {
        let src = json!({"status": "completed", "downtime": 12,
            "ram": {"transferred": 100, "remaining": 0, "total": 200}});
        let info = MigrationInfo::from_json(&src);
        assert_eq!(info.status, MigrationStatus::Completed);
        assert!(info.status.is_final());
        assert_eq!(
            (info.downtime_ms, info.ram_transferred, info.ram_total),
            (Some(12), 100, 200)
        );

        let dst = json!({"status": "setup",
            "socket-address": [{"type": "inet", "host": "127.0.0.1", "port": "40123"}]});
        let info = MigrationInfo::from_json(&dst);
        assert_eq!(info.incoming_port, Some(40123));
        assert!(!info.status.is_final());

        let failed = MigrationInfo::from_json(&json!({"status": "failed", "error-desc": "boom"}));
        assert_eq!(failed.why(), "boom");
        assert_eq!(
            MigrationInfo::from_json(&json!({})).status,
            MigrationStatus::None
        );
        let odd = MigrationStatus::parse("postcopy-active");
        assert_eq!(odd.as_str(), "postcopy-active");
        assert!(!odd.is_final());
    }

    #[test]
    fn block_jobs_are_read_leniently() {
        let jobs = json!([
            {"device": "j1", "offset": 10, "len": 30, "ready": true, "status": "ready"},
            {"offset": 1},
            {"device": "j2"}
        ]);
        let list = BlockJob::list_from_json(&jobs);
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].remaining(), list[0].ready), (20, true));
        assert_eq!((list[1].id.as_str(), list[1].remaining()), ("j2", 0));
        assert!(BlockJob::list_from_json(&json!(null)).is_empty());
    }
}
