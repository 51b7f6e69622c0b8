//! The description of a VM as it travels from source to destination, and the rules that turn the
//! source QEMU's command line into the destination's.
//!
//! Pure data and pure functions: nothing here talks to QEMU or touches the file system, so every
//! rewriting rule is unit-tested in isolation. The source builds a [`VmDescription`] from QMP and
//! `/proc/PID/cmdline`; the agent calls [`argv::rewrite`] on it.

pub mod argv;
pub mod blockdev;
pub mod keyval;

use serde::{Deserialize, Serialize};

/// Everything the agent needs to recreate the VM: its command line and its disks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmDescription {
    /// The source QEMU's argv, `argv[0]` included.
    pub argv: Vec<String>,
    /// The resolved machine type (e.g. `pc-i440fx-10.0`), so that an alias such as `pc` cannot
    /// resolve differently on the destination.
    pub machine: Option<String>,
    /// Every disk that travels, in a stable order.
    pub disks: Vec<DiskDescription>,
    /// Whether the guest runs on the source: a paused VM arrives paused.
    pub running: bool,
}

/// One disk that travels: a writable or read-only block device with an image behind it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskDescription {
    /// A stable, file-name-safe name for the disk (used for its image and in progress output).
    pub name: String,
    /// The root block node the mirror copies from.
    pub node_name: String,
    /// The block backend's name (`-drive id=...`), empty for `-blockdev` disks.
    pub device: String,
    /// The image file as QEMU reports it (`inserted.file`), used to match `-drive file=...`.
    pub file: String,
    /// The source image's format (`qcow2`, `raw`, ...); the destination image is always raw.
    pub format: String,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// Bytes of data the source image holds (its allocation, backing files included), for an
    /// agent that admits thin disks by their data (`--space-check data`). Absent from older
    /// sources: the agent then counts the full size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<u64>,
    /// Whether the guest sees the disk read-only.
    pub read_only: bool,
}

impl VmDescription {
    /// The sum of the disks' sizes: what the destination needs in the worst case.
    pub fn total_disk_bytes(&self) -> u64 {
        self.disks
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.size))
    }

    /// The guest's name (`-name guest=NAME` or `-name NAME`), for status and logs.
    pub fn name(&self) -> Option<String> {
        let at = self
            .argv
            .iter()
            .position(|a| a == "-name" || a == "--name")?;
        let value = keyval::KeyVal::parse(self.argv.get(at + 1)?);
        value
            .get("guest")
            .or_else(|| value.implied())
            .filter(|n| !n.is_empty())
            .map(str::to_string)
    }
}

/// Turns a block node or device name into something safe as a file name and readable in output:
/// QEMU's generated names start with `#`, and user names may contain anything.
pub fn safe_name(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches('_');
    if trimmed.is_empty() {
        "disk".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_names() {
        assert_eq!(safe_name("#block123"), "block123");
        assert_eq!(safe_name("disk0"), "disk0");
        assert_eq!(safe_name("../etc/passwd"), "etc_passwd");
        assert_eq!(safe_name("###"), "disk");
    }

    #[test]
    fn names_come_from_dash_name() {
        let vm = |argv: &[&str]| VmDescription {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            machine: None,
            disks: vec![],
            running: true,
        };
        assert_eq!(
            vm(&["qemu", "-name", "web,,1,debug-threads=on"])
                .name()
                .as_deref(),
            Some("web,1")
        );
        assert_eq!(
            vm(&["qemu", "-name", "guest=db,process=x"])
                .name()
                .as_deref(),
            Some("db")
        );
        assert_eq!(vm(&["qemu", "-name"]).name(), None);
        assert_eq!(vm(&["qemu"]).name(), None);
    }
}
