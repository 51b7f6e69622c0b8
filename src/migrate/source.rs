//! The source QEMU as the driver sees it: every QMP command the migration sends, in one place.
//!
//! Commands whose arguments are stable across QEMU 7.2 and 10.x go through the typed `qapi`
//! structs; the ones whose schema moved (`blockdev-add` of an nbd node, `blockdev-mirror`,
//! `migrate`, `query-migrate` fields) go through `execute_raw` with exactly the fields both
//! versions accept.

use std::path::PathBuf;

use qmp::qapi::qmp as q;
use serde_json::{json, Value};

use crate::status::{wait_migration, BlockJob, MigrationInfo, MigrationStatus, WaitError};
use crate::vm::{safe_name, DiskDescription, VmDescription};

/// A QMP failure on the source, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("source QEMU: {what}")]
pub struct SourceError {
    /// What was being done.
    pub what: String,
    /// The QMP error.
    #[source]
    pub source: qmp::Error,
}

/// A discovery failure that is the VM's fault, not QEMU's: one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] SourceError),
    /// The VM is in a state that cannot migrate, or has a device ferry will not move.
    #[error("{0}")]
    Unsupported(String),
}

/// Shorthand for wrapping a QMP error with context.
pub fn ctx(what: impl Into<String>) -> impl FnOnce(qmp::Error) -> SourceError {
    let what = what.into();
    move |source| SourceError { what, source }
}

/// Where the source QEMU sends a stream: the agent itself (`--insecure`), or one of ferry's
/// relays on this host (TLS, see [`crate::tunnel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port` over TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// As a QMP `SocketAddress` (an NBD node's `server`).
    fn qmp(&self) -> Value {
        match self {
            Endpoint::Tcp { host, port } => {
                json!({"type": "inet", "host": host, "port": port.to_string()})
            }
            Endpoint::Unix(path) => json!({"type": "unix", "path": path.display().to_string()}),
        }
    }

    /// As a migration URI.
    fn uri(&self) -> String {
        match self {
            Endpoint::Tcp { host, port } => {
                format!("tcp:{}:{port}", crate::protocol::uri_host(host))
            }
            Endpoint::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

/// How long the source QEMU may take to answer one QMP command. Every command ferry sends
/// answers in milliseconds; a QEMU silent for this long is stuck holding its big lock (QEMU
/// 10.0's multifd can end there when its channels break during the switchover), and a driver
/// that waited on it would never exit. Past this the call fails and the migration is settled
/// (or left to `ferry recover`) with that said.
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The source QEMU's QMP connection.
#[derive(Clone)]
pub struct SourceQemu {
    qmp: qmp::Qmp,
}

impl SourceQemu {
    /// Wraps a connection to the source QEMU's monitor, every call bounded by [`REPLY_TIMEOUT`].
    pub fn new(qmp: qmp::Qmp) -> SourceQemu {
        SourceQemu {
            qmp: qmp.with_reply_timeout(Some(REPLY_TIMEOUT)),
        }
    }

    /// A subscription to the QEMU's events from now on.
    pub fn events(&self) -> qmp::Events {
        self.qmp.events()
    }

    /// The QEMU's pid (the QMP peer's).
    pub fn pid(&self) -> Option<u32> {
        self.qmp.peer_pid()
    }

    /// Reads the VM: its state, argv (through the QMP peer's pid), machine type and disks.
    pub async fn discover(&self) -> Result<VmDescription, DiscoverError> {
        let (running, state) = self.status().await?;
        if !matches!(state.as_str(), "running" | "paused") {
            return Err(DiscoverError::Unsupported(format!(
                "the VM is `{state}`; only a running or paused VM can be migrated"
            )));
        }
        let argv = self.argv()?;
        let machine = self.machine().await?;
        let blocks = self
            .qmp
            .execute_raw("query-block", Value::Null)
            .await
            .map_err(ctx("query-block"))?;
        let disks = disks_from_query_block(&blocks)?;
        Ok(VmDescription {
            argv,
            machine,
            disks,
            running,
        })
    }

    /// The QEMU's version and accelerator (`query-version`, `query-kvm`), for the checks of
    /// [`super::hazards`].
    pub async fn build(&self) -> Result<super::hazards::QemuBuild, SourceError> {
        let version = self
            .qmp
            .execute_raw("query-version", Value::Null)
            .await
            .map_err(ctx("query-version"))?;
        let kvm = self
            .qmp
            .execute_raw("query-kvm", Value::Null)
            .await
            .map_err(ctx("query-kvm"))?;
        let part = |name: &str| version["qemu"][name].as_u64().unwrap_or(0);
        Ok(super::hazards::QemuBuild {
            version: (part("major"), part("minor"), part("micro")),
            kvm: kvm["enabled"].as_bool().unwrap_or(false),
        })
    }

    /// The guest's RAM in bytes (`query-memory-size-summary`: base plus hot-plugged memory).
    pub async fn ram_size(&self) -> Result<u64, SourceError> {
        let summary = self
            .qmp
            .execute_raw("query-memory-size-summary", Value::Null)
            .await
            .map_err(ctx("query-memory-size-summary"))?;
        let field = |name: &str| summary.get(name).and_then(Value::as_u64).unwrap_or(0);
        Ok(field("base-memory").saturating_add(field("plugged-memory")))
    }

    fn argv(&self) -> Result<Vec<String>, DiscoverError> {
        let pid = self.qmp.peer_pid().ok_or_else(|| {
            DiscoverError::Unsupported(
                "cannot tell which process owns the QMP socket (is it a unix socket?)".into(),
            )
        })?;
        let path = PathBuf::from(format!("/proc/{pid}/cmdline"));
        let raw = std::fs::read(&path).map_err(|e| {
            DiscoverError::Unsupported(format!(
                "cannot read the QEMU command line from {}: {e}",
                path.display()
            ))
        })?;
        Ok(raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect())
    }

    /// The concrete machine type (`pc` resolves to e.g. `pc-i440fx-10.0`).
    async fn machine(&self) -> Result<Option<String>, SourceError> {
        let ty = self
            .qmp
            .execute_raw("qom-get", json!({"path": "/machine", "property": "type"}))
            .await
            .map_err(ctx("qom-get /machine type"))?;
        Ok(ty
            .as_str()
            .map(|t| t.strip_suffix("-machine").unwrap_or(t).to_string()))
    }

    /// Adds the NBD client node a disk is mirrored into. `discard`/`detect-zeroes: unmap` let the
    /// mirror send holes as holes, which keeps the destination image sparse.
    pub async fn add_nbd_target(
        &self,
        node: &str,
        server: &Endpoint,
        export: &str,
    ) -> Result<(), SourceError> {
        let args = json!({
            "driver": "nbd",
            "node-name": node,
            "server": server.qmp(),
            "export": export,
            "discard": "unmap",
            "detect-zeroes": "unmap",
        });
        self.qmp
            .execute_raw("blockdev-add", args)
            .await
            .map_err(ctx(format!("adding NBD target {node}")))?;
        Ok(())
    }

    /// Removes a node added by [`add_nbd_target`](Self::add_nbd_target).
    pub async fn del_node(&self, node: &str) -> Result<(), SourceError> {
        self.qmp
            .execute(q::blockdev_del {
                node_name: node.to_string(),
            })
            .await
            .map_err(ctx(format!("removing node {node}")))?;
        Ok(())
    }

    /// Starts a full mirror of `disk` into `target`, optionally write-blocking from the start and
    /// with the background copy capped at `speed` bytes per second.
    pub async fn start_mirror(
        &self,
        job: &str,
        disk: &DiskDescription,
        target: &str,
        write_blocking: bool,
        speed: Option<u64>,
    ) -> Result<(), SourceError> {
        let mut args =
            json!({"job-id": job, "device": disk.node_name, "target": target, "sync": "full"});
        if write_blocking {
            args["copy-mode"] = json!("write-blocking");
        }
        if let Some(speed) = speed {
            args["speed"] = json!(speed);
        }
        self.qmp
            .execute_raw("blockdev-mirror", args)
            .await
            .map_err(ctx(format!("starting the mirror of disk {}", disk.name)))?;
        Ok(())
    }

    /// `block-job-cancel`: with `force: false` on a READY mirror this is the final sync that
    /// completes the job without pivoting; with `force: true` it abandons the copy.
    pub async fn cancel_job(&self, job: &str, force: bool) -> Result<(), SourceError> {
        self.qmp
            .execute(q::block_job_cancel {
                device: job.to_string(),
                force: Some(force),
            })
            .await
            .map_err(ctx(format!("cancelling job {job}")))?;
        Ok(())
    }

    /// Switches a running mirror to write-blocking (active) mode, so that guest writes are copied
    /// synchronously and the job converges however fast the guest writes. QEMU 9.1 and later.
    pub async fn make_write_blocking(&self, job: &str) -> Result<(), SourceError> {
        self.qmp
            .execute_raw(
                "block-job-change",
                json!({"id": job, "type": "mirror", "copy-mode": "write-blocking"}),
            )
            .await
            .map_err(ctx(format!("switching job {job} to write-blocking")))?;
        Ok(())
    }

    /// The block jobs.
    pub async fn block_jobs(&self) -> Result<Vec<BlockJob>, SourceError> {
        let jobs = self
            .qmp
            .execute_raw("query-block-jobs", Value::Null)
            .await
            .map_err(ctx("query-block-jobs"))?;
        Ok(BlockJob::list_from_json(&jobs))
    }

    /// The names of the block nodes.
    pub async fn node_names(&self) -> Result<Vec<String>, SourceError> {
        let nodes = self
            .qmp
            .execute_raw("query-named-block-nodes", json!({"flat": true}))
            .await
            .map_err(ctx("query-named-block-nodes"))?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n.get("node-name")?.as_str().map(str::to_string))
            .collect())
    }

    /// Of `names`, the migration capabilities that are off now.
    pub async fn capabilities_off(&self, names: &[&str]) -> Result<Vec<String>, SourceError> {
        let caps = self
            .qmp
            .execute_raw("query-migrate-capabilities", Value::Null)
            .await
            .map_err(ctx("query-migrate-capabilities"))?;
        let on = |name: &str| {
            caps.as_array().into_iter().flatten().any(|c| {
                c.get("capability").and_then(Value::as_str) == Some(name)
                    && c.get("state").and_then(Value::as_bool) == Some(true)
            })
        };
        Ok(names
            .iter()
            .filter(|n| !on(n))
            .map(|n| n.to_string())
            .collect())
    }

    /// The current values of the named migration parameters (as `query-migrate-parameters`
    /// reports them), to put back if the VM stays.
    pub async fn migration_parameters(&self, names: &[&str]) -> Result<Value, SourceError> {
        let all = self
            .qmp
            .execute_raw("query-migrate-parameters", Value::Null)
            .await
            .map_err(ctx("query-migrate-parameters"))?;
        let picked: serde_json::Map<String, Value> = names
            .iter()
            .filter_map(|n| all.get(*n).map(|v| (n.to_string(), v.clone())))
            .collect();
        Ok(Value::Object(picked))
    }

    /// Sets migration parameters (an object of `migrate-set-parameters` arguments).
    pub async fn set_migration_parameters(&self, params: &Value) -> Result<(), SourceError> {
        self.qmp
            .execute_raw("migrate-set-parameters", params.clone())
            .await
            .map_err(ctx(format!("setting migration parameters {params}")))?;
        Ok(())
    }

    /// Sets one migration capability.
    pub async fn set_capability(&self, name: &str, state: bool) -> Result<(), SourceError> {
        self.qmp
            .execute_raw(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": name, "state": state}]}),
            )
            .await
            .map_err(ctx(format!("setting migration capability {name}")))?;
        Ok(())
    }

    /// Starts the RAM migration to `host:port`.
    /// Clears the RAM stream's TLS parameters: the stream goes in plaintext, to the agent
    /// (`--insecure`) or to the local relay. Set every time, never left as found: a VM that
    /// arrived here through an older ferry carries its incoming TLS object's name, and QEMU
    /// would try TLS on the relay's socket.
    pub async fn clear_migration_tls(&self) -> Result<(), SourceError> {
        self.qmp
            .execute_raw(
                "migrate-set-parameters",
                json!({"tls-creds": "", "tls-hostname": ""}),
            )
            .await
            .map_err(ctx("clearing the RAM stream's TLS parameters"))?;
        Ok(())
    }

    /// Starts the RAM migration to `to`.
    pub async fn migrate(&self, to: &Endpoint) -> Result<(), SourceError> {
        self.qmp
            .execute_raw("migrate", json!({"uri": to.uri()}))
            .await
            .map_err(ctx("migrate"))?;
        Ok(())
    }
    /// `query-migrate`.
    pub async fn query_migrate(&self) -> Result<MigrationInfo, SourceError> {
        MigrationInfo::query(&self.qmp)
            .await
            .map_err(ctx("query-migrate"))
    }

    /// Polls `query-migrate` until `done` holds for the status (see [`wait_migration`]).
    pub async fn wait_migration(
        &self,
        timeout: std::time::Duration,
        every: std::time::Duration,
        done: impl Fn(&MigrationStatus) -> bool,
    ) -> Result<MigrationInfo, WaitError> {
        wait_migration(&self.qmp, timeout, every, done).await
    }

    /// Waits, at most `timeout`, until QEMU has torn down its last outgoing migration: `true`
    /// once it has (or never had one), `false` if it still has not.
    ///
    /// Why: `query-migrate` says `failed` the moment a channel breaks, but QEMU tears the
    /// migration down later (its migration thread may sleep in the rate limit first), and its
    /// teardown reads the capabilities and parameters as they are *then*: with `multifd`
    /// turned off meanwhile it skips the multifd channels and aborts on their leftover yank
    /// functions (QEMU 10.0.2, `yank_unregister_instance: Assertion ... failed`, seen in the
    /// fault matrix as a source QEMU gone after `ferry recover` put the capabilities back; a
    /// `migrate` issued too early fails with "duplicate yank instance"). The teardown's very
    /// last step unregisters the migration's yank instance, which `query-yank` (QEMU 6.0 and
    /// later) lists: its absence is the signal. A QEMU without `query-yank` has no yank to trip.
    pub async fn wait_migration_torn_down(
        &self,
        timeout: std::time::Duration,
    ) -> Result<bool, SourceError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let instances = match self.qmp.execute_raw("query-yank", Value::Null).await {
                Ok(instances) => instances,
                Err(e) if e.class() == Some("CommandNotFound") => return Ok(true),
                Err(e) => return Err(ctx("query-yank")(e)),
            };
            let migrating = instances
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i.get("type").and_then(Value::as_str) == Some("migration"));
            if !migrating {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// [`wait_migration_torn_down`](Self::wait_migration_torn_down) for a migration that has
    /// ended: if QEMU has not torn it down after `patience`, and `query-migrate` says it is
    /// over (`failed`, `cancelled`, `completed`), its channels are yanked (QMP `yank` of the
    /// `migration` instance, QEMU's own way out of a hung channel: a migration thread blocked
    /// writing into a connection nobody reads never reaches its teardown), and the wait goes
    /// on until `timeout`. A migration still running is never yanked.
    pub async fn wait_ended_migration_torn_down(
        &self,
        patience: std::time::Duration,
        timeout: std::time::Duration,
    ) -> Result<bool, SourceError> {
        if self.wait_migration_torn_down(patience).await? {
            return Ok(true);
        }
        if self.query_migrate().await?.status.is_final() {
            tracing::warn!(
                "the source QEMU's migration ended but is not torn down; yanking its channels"
            );
            // An instance gone meanwhile is an error here, and the wait below sees it gone.
            let _ = self
                .qmp
                .execute_raw("yank", json!({"instances": [{"type": "migration"}]}))
                .await;
        }
        self.wait_migration_torn_down(timeout.saturating_sub(patience))
            .await
    }

    /// Lets a migration paused at `pre-switchover` finish.
    pub async fn migrate_continue(&self) -> Result<(), SourceError> {
        self.qmp
            .execute(q::migrate_continue {
                state: q::MigrationStatus::pre_switchover,
            })
            .await
            .map_err(ctx("migrate-continue"))?;
        Ok(())
    }

    /// Cancels the RAM migration.
    pub async fn migrate_cancel(&self) -> Result<(), SourceError> {
        self.qmp
            .execute(q::migrate_cancel {})
            .await
            .map_err(ctx("migrate_cancel"))?;
        Ok(())
    }

    /// Whether the guest runs, and QEMU's run state.
    pub async fn status(&self) -> Result<(bool, String), SourceError> {
        let status = self
            .qmp
            .execute(q::query_status {})
            .await
            .map_err(ctx("query-status"))?;
        let state = serde_json::to_value(status.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string));
        Ok((status.running, state.unwrap_or_default()))
    }

    /// Stops the guest (`ferry xl migrate`, for a PV/PVH domain's device model, which nothing
    /// else stops before the disks are final).
    pub async fn stop(&self) -> Result<(), SourceError> {
        self.qmp.execute(q::stop {}).await.map_err(ctx("stop"))?;
        Ok(())
    }

    /// The disks only, and whether the guest runs: a Xen device model's command line is xl's
    /// business, not something ferry moves.
    pub async fn discover_disks(&self) -> Result<VmDescription, DiscoverError> {
        let (running, state) = self.status().await?;
        if !matches!(state.as_str(), "running" | "paused") {
            return Err(DiscoverError::Unsupported(format!(
                "the device model is `{state}`; only a running or paused domain can be migrated"
            )));
        }
        let blocks = self
            .qmp
            .execute_raw("query-block", Value::Null)
            .await
            .map_err(ctx("query-block"))?;
        Ok(VmDescription {
            argv: Vec::new(),
            machine: None,
            disks: disks_from_query_block(&blocks)?,
            running,
        })
    }

    /// Resumes the guest.
    pub async fn cont(&self) -> Result<(), SourceError> {
        self.qmp.execute(q::cont {}).await.map_err(ctx("cont"))?;
        Ok(())
    }

    /// Tells the source QEMU to exit (after the switchover: the VM lives elsewhere now).
    pub async fn quit(&self) -> Result<(), SourceError> {
        match self.qmp.execute(q::quit {}).await {
            Ok(_) | Err(qmp::Error::Disconnected) => Ok(()),
            Err(e) => Err(ctx("quit")(e)),
        }
    }
}

/// The disks that travel, from `query-block`: every device with a medium inserted. Removable
/// media with something inserted (a cdrom with an ISO) is refused: eject it first. Empty
/// removable drives stay as they are.
pub fn disks_from_query_block(blocks: &Value) -> Result<Vec<DiskDescription>, DiscoverError> {
    let mut disks = Vec::new();
    let mut names = std::collections::HashSet::new();
    for block in blocks.as_array().into_iter().flatten() {
        let Some(inserted) = block.get("inserted") else {
            continue;
        };
        let device = block
            .get("device")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let qdev = block.get("qdev").and_then(Value::as_str).unwrap_or("");
        if block.get("removable").and_then(Value::as_bool) == Some(true) {
            let who = if device.is_empty() {
                qdev
            } else {
                device.as_str()
            };
            return Err(DiscoverError::Unsupported(format!(
                "removable device {who} has media inserted; eject it first (`ferry qmp SOCKET eject '{{\"id\":\"{who}\"}}'`)"
            )));
        }
        let node_name = inserted
            .get("node-name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let size = inserted
            .get("image")
            .and_then(|i| i.get("virtual-size"))
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                DiscoverError::Unsupported(format!(
                    "QEMU did not report the size of disk {node_name}"
                ))
            })?;
        let base = if !node_name.starts_with('#') && !node_name.is_empty() {
            node_name.clone()
        } else if !device.is_empty() {
            device.clone()
        } else {
            safe_name(&node_name)
        };
        let mut name = safe_name(&base);
        let mut n = 1;
        while !names.insert(name.clone()) {
            n += 1;
            name = format!("{}-{n}", safe_name(&base));
        }
        disks.push(DiskDescription {
            name,
            node_name,
            device,
            file: inserted
                .get("file")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            format: inserted
                .get("drv")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            size,
            allocated: allocated_in_chain(inserted.get("image")),
            read_only: inserted.get("ro").and_then(Value::as_bool).unwrap_or(false),
        });
    }
    Ok(disks)
}

/// The host bytes an image and its backing files take (`actual-size` down the chain): an upper
/// bound of the data a full mirror copies (it reads the whole chain), for an agent that admits
/// disks by their data. `None` when QEMU does not report it for some image of the chain.
fn allocated_in_chain(image: Option<&Value>) -> Option<u64> {
    let mut total = 0u64;
    let mut image = image?;
    for _ in 0..64 {
        total = total.saturating_add(image.get("actual-size")?.as_u64()?);
        match image.get("backing-image") {
            Some(backing) => image = backing,
            None => return Some(total),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_are_read_from_query_block() {
        let blocks = json!([
            {"device": "", "qdev": "vda-dev", "removable": false,
             "inserted": {"node-name": "vda", "file": "/a.qcow2", "drv": "qcow2", "ro": false,
                          "image": {"virtual-size": 1073741824u64, "actual-size": 200,
                                    "backing-image": {"actual-size": 50}}}},
            {"device": "drive1", "qdev": "x", "removable": false,
             "inserted": {"node-name": "#block312", "file": "/b.raw", "drv": "raw", "ro": true,
                          "image": {"virtual-size": 4096}}},
            {"device": "cd0", "qdev": "y", "removable": true}
        ]);
        let disks = disks_from_query_block(&blocks).expect("disks");
        assert_eq!(disks.len(), 2);
        assert_eq!(
            (
                disks[0].name.as_str(),
                disks[0].size,
                disks[0].format.as_str()
            ),
            ("vda", 1 << 30, "qcow2")
        );
        assert_eq!(
            (
                disks[1].name.as_str(),
                disks[1].node_name.as_str(),
                disks[1].read_only
            ),
            ("drive1", "#block312", true)
        );
        assert_eq!(
            disks[0].allocated,
            Some(250),
            "the whole chain's allocation"
        );
        assert_eq!(disks[1].allocated, None, "not reported: unknown");
    }

    #[test]
    fn inserted_cdrom_is_refused_with_what_to_do() {
        let blocks = json!([{"device": "ide1-cd0", "removable": true,
            "inserted": {"node-name": "#b1", "image": {"virtual-size": 1}}}]);
        let err = disks_from_query_block(&blocks).expect_err("refused");
        assert!(err.to_string().contains("eject it first"), "{err}");
    }

    /// What a scripted monitor (below) was asked, and when.
    type Asked = std::sync::Arc<std::sync::Mutex<Vec<(String, std::time::Instant)>>>;

    /// A monitor that answers like a QEMU whose migration is `status` and whose `migration`
    /// yank instance stays registered until a `yank` of it comes, or, with `torn_down_after`,
    /// until that long after the connection. Records every command it is sent.
    async fn scripted_monitor(
        status: &'static str,
        torn_down_after: Option<std::time::Duration>,
    ) -> (tempfile::TempDir, SourceQemu, Asked) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let asked = Asked::default();
        let log = asked.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let since = std::time::Instant::now();
            let (rd, mut wr) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(rd).lines();
            let greeting = json!({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2},
                "package": ""}, "capabilities": []}});
            wr.write_all(format!("{greeting}\n").as_bytes())
                .await
                .expect("greet");
            let mut yanked = false;
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).expect("JSON");
                let command = request["execute"].as_str().unwrap_or_default().to_string();
                let torn_down = yanked || torn_down_after.is_some_and(|t| since.elapsed() >= t);
                let answer = match command.as_str() {
                    "query-migrate" => json!({"status": status}),
                    "query-yank" if torn_down => json!([]),
                    "query-yank" => json!([{"type": "migration"}]),
                    "yank" => {
                        yanked =
                            request["arguments"]["instances"] == json!([{"type": "migration"}]);
                        json!({})
                    }
                    _ => json!({}),
                };
                log.lock()
                    .expect("lock")
                    .push((command, std::time::Instant::now()));
                let reply = json!({"return": answer, "id": request["id"]});
                wr.write_all(format!("{reply}\n").as_bytes())
                    .await
                    .expect("answer");
            }
        });
        let qmp = qmp::Qmp::connect_unix(&path).await.expect("connect");
        (dir, SourceQemu::new(qmp), asked)
    }

    fn yanks(asked: &Asked) -> Vec<std::time::Instant> {
        let asked = asked.lock().expect("lock");
        asked
            .iter()
            .filter(|(c, _)| c == "yank")
            .map(|(_, t)| *t)
            .collect()
    }

    const PATIENCE: std::time::Duration = std::time::Duration::from_millis(300);
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

    #[tokio::test]
    async fn an_ended_migration_not_torn_down_is_yanked_after_the_patience() {
        let (_dir, qemu, asked) = scripted_monitor("failed", None).await;
        let started = std::time::Instant::now();
        let torn_down = qemu
            .wait_ended_migration_torn_down(PATIENCE, TIMEOUT)
            .await
            .expect("waited");
        assert!(torn_down, "the yank let the teardown finish");
        let yanks = yanks(&asked);
        assert_eq!(
            yanks.len(),
            1,
            "one yank: {:?}",
            asked.lock().expect("lock")
        );
        assert!(
            yanks[0].duration_since(started) >= PATIENCE,
            "yanked only after {PATIENCE:?}, not at once"
        );
    }

    #[tokio::test]
    async fn a_running_migration_is_never_yanked() {
        let (_dir, qemu, asked) = scripted_monitor("active", None).await;
        let torn_down = qemu
            .wait_ended_migration_torn_down(PATIENCE, TIMEOUT)
            .await
            .expect("waited");
        assert!(!torn_down, "still migrating: not torn down");
        assert!(
            yanks(&asked).is_empty(),
            "{:?}",
            asked.lock().expect("lock")
        );
    }

    #[tokio::test]
    async fn an_ended_migration_that_tears_down_in_time_is_not_yanked() {
        let (_dir, qemu, asked) =
            scripted_monitor("failed", Some(std::time::Duration::from_millis(100))).await;
        let torn_down = qemu
            .wait_ended_migration_torn_down(PATIENCE, TIMEOUT)
            .await
            .expect("waited");
        assert!(torn_down);
        assert!(
            yanks(&asked).is_empty(),
            "{:?}",
            asked.lock().expect("lock")
        );
    }
}
