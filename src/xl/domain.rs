//! Finding the domain on the source: its id (`xl domid`), its device model's QMP socket
//! (`<run dir>/qmp-libxl-<domid>`, `tools/libs/light/libxl_qmp.c`), the disks that device model
//! serves (qdisk nodes `<vdev>-<format>`, QEMU's `hw/block/xen-block.c`), and the domain config,
//! checked before anything is created: every disk it lists must be one ferry moves.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use super::migrate::{xl_err, XlOptions};
use crate::migrate::error::{at, Failure};
use crate::migrate::source::SourceQemu;
use crate::migrate::PhaseName;
use crate::vm::VmDescription;

/// What [`find`] found.
pub struct Found {
    /// The device model's QMP socket.
    pub socket: PathBuf,
    /// Connected to it.
    pub qemu: SourceQemu,
    /// Its disks (no command line: xl starts the destination's device model).
    pub vm: VmDescription,
    /// Disk name → vdev.
    pub vdevs: HashMap<String, String>,
    /// The domain config's text.
    pub config: String,
}

/// Finds the domain `opts` names; every failure is a failure of the discover phase, with
/// nothing created.
pub async fn find(opts: &XlOptions) -> Result<Found, Failure> {
    let domid = domid(&opts.xl, &opts.domain).await?;
    let socket = qmp_socket(&opts.run_dir, domid);
    let qmp = qmp::Qmp::connect_unix(&socket).await.map_err(|e| {
        xl_err(
            PhaseName::Discover,
            format!(
                "cannot reach domain {}'s device model at {}: {e}; ferry moves only disks its QEMU serves (qdisk)",
                opts.domain,
                socket.display()
            ),
        )
    })?;
    let qemu = SourceQemu::new(qmp);
    let mut vm = qemu
        .discover_disks()
        .await
        .map_err(at(PhaseName::Discover))?;
    let mut vdevs = HashMap::new();
    for disk in &vm.disks {
        let vdev = vdev_of(&disk.node_name, &disk.format).ok_or_else(|| {
            xl_err(
                PhaseName::Discover,
                format!(
                    "disk node {} of the device model is not a qdisk node (<vdev>-<format>)",
                    disk.node_name
                ),
            )
        })?;
        vdevs.insert(disk.name.clone(), vdev);
    }
    let config = std::fs::read_to_string(&opts.config).map_err(|e| {
        xl_err(
            PhaseName::Discover,
            format!(
                "cannot read the domain config {}: {e}",
                opts.config.display()
            ),
        )
    })?;
    // Refuse a config whose disks ferry would not move before anything is created.
    let probe: HashMap<String, String> =
        vdevs.values().map(|v| (v.clone(), String::new())).collect();
    super::config::rewrite(&config, &probe)
        .map_err(|e| xl_err(PhaseName::Discover, e.to_string()))?;
    vm.disks.sort_by(|a, b| a.name.cmp(&b.name));

    Ok(Found {
        socket,
        qemu,
        vm,
        vdevs,
        config,
    })
}

/// The domain's id, from `xl domid DOMAIN`.
async fn domid(xl: &Path, domain: &str) -> Result<u32, Failure> {
    let out = Command::new(xl)
        .args(["domid", domain])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| {
            xl_err(
                PhaseName::Discover,
                format!(
                    "cannot run {} domid: {e} (is xl installed? --xl names it)",
                    xl.display()
                ),
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), text.trim().parse::<u32>()) {
        (true, Ok(id)) => Ok(id),
        _ => Err(xl_err(
            PhaseName::Discover,
            format!(
                "xl knows no domain {domain}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
    }
}

/// The qdisk's vdev from its node name `<vdev>-<format>` (QEMU's xen-block backend names them
/// so).
fn vdev_of(node: &str, format: &str) -> Option<String> {
    node.strip_suffix(&format!("-{format}"))
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// The device model's QMP socket for `domid`.
pub fn qmp_socket(run_dir: &Path, domid: u32) -> PathBuf {
    run_dir.join(format!("qmp-libxl-{domid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdevs() {
        assert_eq!(vdev_of("xvda-qcow2", "qcow2").as_deref(), Some("xvda"));
        assert_eq!(vdev_of("xvda-raw", "qcow2"), None);
        assert_eq!(vdev_of("-raw", "raw"), None);
    }
}
