//! The destination QEMU: started detached from the rewritten argv (its own process group, so it
//! outlives the agent and a Ctrl-C on the agent's terminal), sandboxed, and driven over its own
//! QMP socket inside the migration directory.
//!
//! Not `-daemonize`: QEMU forks and calls `setsid` for it after installing its seccomp filter,
//! which `-sandbox spawn=deny,elevateprivileges=deny` forbids. The agent detaches it instead.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::status::{wait_migration, MigrationInfo, MigrationStatus, WaitError};

/// How long QEMU may take to initialise and answer on its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination QEMU may take to answer one QMP command (preallocating RAM aside).
/// Its commands answer in milliseconds; one silent for this long is stuck (QEMU 10.0's incoming
/// multifd, its stream cut mid-way, can wait for good holding its big lock), and the agent must
/// not wait on it forever: the call fails, and the migration is settled as one whose
/// destination cannot say how far it got (kept paused for the source to decide; a rollback
/// kills it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A failure of the destination QEMU, with what QEMU said where there is something.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// QEMU did not start.
    #[error("destination QEMU failed to start: {detail}")]
    Start {
        /// QEMU's own error text (last lines of its stderr) or the spawn error.
        detail: String,
    },
    /// A QMP command failed.
    #[error("destination QEMU: {what}")]
    Qmp {
        /// What was being done.
        what: String,
        /// The QMP error.
        #[source]
        source: qmp::Error,
    },
    /// The incoming migration ended in a state other than `completed`.
    #[error("incoming migration on the destination ended as `{status}`")]
    Incoming {
        /// The final status.
        status: String,
    },
    /// Waiting for the incoming migration failed.
    #[error("destination QEMU: waiting for the incoming migration")]
    Wait(#[from] WaitError),
}

fn qmp_err(what: impl Into<String>) -> impl FnOnce(qmp::Error) -> DestinationError {
    let what = what.into();
    move |source| DestinationError::Qmp { what, source }
}

/// Where the destination QEMU listens for the RAM stream.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// An ephemeral TCP port of this address (`--insecure`: the source QEMU connects itself).
    Tcp(std::net::IpAddr),
    /// A unix socket (TLS: the agent's relay connects, see `crate::tunnel::incoming`).
    Unix(PathBuf),
}

/// A running destination QEMU.
pub struct Destination {
    /// Its pid (from `-pidfile`).
    pub pid: u32,
    /// Its QMP socket.
    pub qmp_path: PathBuf,
    qmp: qmp::Qmp,
}

impl Destination {
    /// Runs `argv` (which must contain `-pidfile PIDFILE -qmp unix:QMP`) and connects. QEMU has
    /// started when its QMP socket answers; if it exits first, its stderr (`dir/qemu.stderr`)
    /// says why. Its working directory is `/`, so that no relative file name (a ROM, a keymap)
    /// resolves against the agent's directory.
    pub async fn start(
        argv: &[String],
        dir: &Path,
        pidfile: &Path,
        qmp_path: &Path,
    ) -> Result<Destination, DestinationError> {
        let (binary, args) = argv.split_first().ok_or_else(|| DestinationError::Start {
            detail: "empty argv".into(),
        })?;
        let stderr_path = dir.join("qemu.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| DestinationError::Start {
            detail: format!("cannot create {}: {e}", stderr_path.display()),
        })?;
        let mut child = tokio::process::Command::new(binary)
            .args(args)
            .current_dir("/")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| DestinationError::Start {
                detail: format!("cannot run {binary}: {e}"),
            })?;
        let pid = child.id().ok_or_else(|| DestinationError::Start {
            detail: "exited at once".into(),
        })?;
        let connected = tokio::select! {
            status = child.wait() => {
                let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                let detail = match status {
                    Ok(status) => last_lines(&text, 3).unwrap_or_else(|| format!("exited with {status}")),
                    Err(e) => e.to_string(),
                };
                return Err(DestinationError::Start { detail });
            }
            connected = qmp::Qmp::connect_unix_timeout(qmp_path, START_TIMEOUT) => connected,
        };
        let qmp = match connected {
            Ok(qmp) => qmp,
            Err(source) => {
                let _ = child.start_kill();
                return Err(DestinationError::Qmp {
                    what: format!(
                        "connecting to its QMP socket within {}s",
                        START_TIMEOUT.as_secs()
                    ),
                    source,
                });
            }
        };
        // The pid file is what a restarted agent goes by; QEMU writes it before its QMP socket.
        if !pidfile.exists() {
            tracing::warn!(pidfile = %pidfile.display(), "destination QEMU wrote no pid file");
        }
        // Dropping `child` leaves QEMU running; tokio reaps it when it exits.
        drop(child);
        Ok(Destination {
            pid,
            qmp_path: qmp_path.to_path_buf(),
            qmp: qmp.with_reply_timeout(Some(REPLY_TIMEOUT)),
        })
    }

    /// Reconnects to a destination QEMU a previous agent started (its pid and QMP socket from
    /// the migration directory). `None` if it is gone.
    pub async fn attach(pid: u32, dir: &Path, qmp_path: &Path) -> Option<Destination> {
        if !is_ours(pid, dir) {
            return None;
        }
        let qmp = qmp::Qmp::connect_unix_timeout(qmp_path, Duration::from_secs(10))
            .await
            .ok()?;
        Some(Destination {
            pid,
            qmp_path: qmp_path.to_path_buf(),
            qmp: qmp.with_reply_timeout(Some(REPLY_TIMEOUT)),
        })
    }

    /// Sets `late-block-activate` (images stay inactive until `cont`) and `return-path` (the
    /// source's migration completes only once this QEMU loaded the whole state, and fails if it
    /// could not), then listens for the RAM: on an ephemeral TCP port of an address (returned),
    /// or on a unix socket that the agent's TLS relay feeds (`crate::tunnel::incoming`). QEMU
    /// itself never gets TLS credentials, so its argv and parameters stay the VM's own and it can
    /// be migrated onwards.
    pub async fn listen(
        &self,
        at: &Incoming,
        parallel: u32,
    ) -> Result<Option<u16>, DestinationError> {
        if parallel > 1 {
            // The destination must expect the same number of RAM connections as the source
            // opens; both are set before the stream starts.
            self.qmp
                .execute_raw(
                    "migrate-set-capabilities",
                    json!({"capabilities": [{"capability": "multifd", "state": true}]}),
                )
                .await
                .map_err(qmp_err("turning on multifd"))?;
            self.qmp
                .execute_raw(
                    "migrate-set-parameters",
                    json!({"multifd-channels": parallel}),
                )
                .await
                .map_err(qmp_err("setting multifd-channels"))?;
        }
        self.qmp
            .execute_raw(
                "migrate-set-capabilities",
                json!({"capabilities": [
                    {"capability": "late-block-activate", "state": true},
                    {"capability": "return-path", "state": true},
                ]}),
            )
            .await
            .map_err(qmp_err("setting late-block-activate and return-path"))?;
        let uri = match at {
            Incoming::Tcp(ip) => format!("tcp:{}:0", crate::protocol::uri_host(&ip.to_string())),
            Incoming::Unix(path) => format!("unix:{}", path.display()),
        };
        self.qmp
            .execute_raw("migrate-incoming", json!({"uri": uri}))
            .await
            .map_err(qmp_err("migrate-incoming"))?;
        if let Incoming::Unix(_) = at {
            return Ok(None);
        }
        let info = MigrationInfo::query(&self.qmp)
            .await
            .map_err(qmp_err("query-migrate"))?;
        info.incoming_port
            .map(Some)
            .ok_or_else(|| DestinationError::Start {
                detail: format!(
                    "query-migrate did not report the listening port (status {})",
                    info.status
                ),
            })
    }

    /// Touches all of the guest's RAM now (`prealloc` on each of its memory backends, with one
    /// thread per host CPU), while the disks still copy. Without it the incoming RAM stream
    /// faults every page in as it writes it, and the kernel zeroes each one then, inside the RAM
    /// phase: for a guest whose RAM is mostly in use that zeroing is a large part of the phase
    /// (BENCHMARKS.md, issue 12). It allocates the guest's whole RAM, used or not. Blocks this
    /// QEMU's monitor until done; returns how many backends it preallocated.
    pub async fn preallocate_ram(&self) -> Result<usize, DestinationError> {
        let objects = self
            .qmp
            .execute_raw("qom-list", json!({"path": "/objects"}))
            .await
            .map_err(qmp_err("listing its objects"))?;
        let backends: Vec<String> = objects
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| {
                o.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.starts_with("child<memory-backend-"))
            })
            .filter_map(|o| o.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = std::time::Instant::now();
        for name in &backends {
            let path = format!("/objects/{name}");
            self.qmp
                .execute_raw(
                    "qom-set",
                    json!({"path": path, "property": "prealloc-threads", "value": threads}),
                )
                .await
                .map_err(qmp_err(format!("setting prealloc-threads on {path}")))?;
            // Touching every page of a big guest takes as long as it takes: unbounded.
            self.qmp
                .with_reply_timeout(None)
                .execute_raw(
                    "qom-set",
                    json!({"path": path, "property": "prealloc", "value": true}),
                )
                .await
                .map_err(qmp_err(format!("preallocating {path}")))?;
        }
        tracing::debug!(
            backends = backends.len(),
            threads,
            ms = started.elapsed().as_millis() as u64,
            "guest RAM preallocated"
        );
        Ok(backends.len())
    }

    /// Waits until the incoming migration is `completed` (Ok) or has failed (Err).
    pub async fn wait_incoming(&self, timeout: Duration) -> Result<(), DestinationError> {
        let info = wait_migration(&self.qmp, timeout, Duration::from_millis(2), |s| {
            s.is_final() && *s != MigrationStatus::None
        })
        .await?;
        match info.status {
            MigrationStatus::Completed => Ok(()),
            status => Err(DestinationError::Incoming {
                status: status.to_string(),
            }),
        }
    }

    /// The incoming migration's status as QEMU reports it (`none` before anything arrived).
    pub async fn incoming_status(&self) -> Result<MigrationStatus, DestinationError> {
        Ok(MigrationInfo::query(&self.qmp)
            .await
            .map_err(qmp_err("query-migrate"))?
            .status)
    }

    /// Whether the guest is running (a restarted agent finishing a hand-over checks this before
    /// `cont`).
    pub async fn running(&self) -> Result<bool, DestinationError> {
        let status = self
            .qmp
            .execute_raw("query-status", Value::Null)
            .await
            .map_err(qmp_err("query-status"))?;
        Ok(status.get("running").and_then(Value::as_bool) == Some(true))
    }

    /// Whether the QEMU process still exists.
    pub fn alive(&self) -> bool {
        pid_alive(self.pid)
    }

    /// Starts the guest; returns QEMU's timestamp of the RESUME event in microseconds, if seen.
    pub async fn resume(&self) -> Result<Option<i64>, DestinationError> {
        let mut events = self.qmp.events();
        self.qmp
            .execute_raw("cont", Value::Null)
            .await
            .map_err(qmp_err("cont"))?;
        let resumed = events
            .wait_for(|e| e.name == "RESUME", Duration::from_secs(5))
            .await;
        Ok(resumed.ok().map(|e| e.timestamp.as_micros()))
    }

    /// Kills the destination QEMU (rollback).
    pub fn kill(&self) {
        kill_pid(self.pid);
    }
}

/// SIGKILL, ignoring a process that is already gone.
pub fn kill_pid(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Whether `pid` exists (a zombie counts as gone: its QEMU is no more).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
}

/// Whether `pid` is a live QEMU started for `dir` (its command line names the directory): a pid
/// file outlives its process, and the number may belong to something else by now.
pub fn is_ours(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    pid_alive(pid) && !needle.is_empty() && cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Kills `pid` only if it [`is_ours`].
pub fn kill_if_ours(pid: u32, dir: &Path) {
    if is_ours(pid, dir) {
        kill_pid(pid);
    }
}

fn last_lines(text: &str, n: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return None;
    }
    Some(lines[lines.len().saturating_sub(n)..].join(" / "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_and_ownership_by_proc() {
        let me = std::process::id();
        assert!(pid_alive(me));
        assert!(!pid_alive(u32::MAX));
        let exe = std::env::current_exe().expect("exe");
        let dir = exe.parent().expect("dir");
        assert!(is_ours(me, dir), "our own command line names our directory");
        assert!(!is_ours(me, Path::new("/nonexistent-ferry-dir")));
    }

    #[test]
    fn stderr_is_summarised() {
        assert_eq!(last_lines("a\n\nb\nc\nd\n", 2).as_deref(), Some("c / d"));
        assert_eq!(last_lines("\n", 2), None);
    }
}
