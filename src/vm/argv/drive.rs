//! Disks: `-drive` and `-blockdev`. A disk that travels points at its new raw image; anything
//! else that would open storage (a file, a host device, a network block device) is refused,
//! whatever spelling it uses (`file=`, `file.filename=`, JSON).

use serde_json::{json, Map, Value};

use super::super::keyval::{is_true, KeyVal};
use super::value;
use super::{refuse, RewriteError, Rewriter};

/// `-drive` keys that describe only the guest side or QEMU's own behaviour: all a drive that is
/// not a disk (an empty cdrom) may have.
const EMPTY_DRIVE_KEYS: &[&str] = &[
    "if",
    "id",
    "media",
    "index",
    "bus",
    "unit",
    "readonly",
    "read-only",
    "cache",
    "aio",
    "werror",
    "rerror",
    "discard",
    "detect-zeroes",
    "serial",
    "addr",
    "cyls",
    "heads",
    "secs",
    "trans",
    "boot",
    "auto-read-only",
    "copy-on-read",
    "format",
];

/// `-drive` keys of a disk that name its source image or its format: replaced.
fn is_image_key(key: &str) -> bool {
    key == "format"
        || key == "driver"
        || key == "key-secret"
        || ["file.", "backing", "data-file", "encrypt.", "json:"]
            .iter()
            .any(|p| key.starts_with(p))
}

/// `-blockdev` drivers that open nothing on the host.
const INERT_DRIVERS: &[&str] = &["null-co", "null-aio"];

impl Rewriter<'_> {
    pub(super) fn drive(&mut self, value: &str) -> Result<(), RewriteError> {
        let no = |reason: String| refuse("drive", Some(value), reason);
        // Parsed once as data for the duplicate and nested-key checks.
        value::parse(value, "file").map_err(no)?;
        let mut kv = KeyVal::parse(value);
        if kv.get("snapshot").is_some_and(is_true) {
            return Err(no("snapshot=on keeps writes in a temporary overlay".into()));
        }
        let file = kv.get("file").unwrap_or("").to_string();
        let id = kv.get("id").unwrap_or("").to_string();
        let disk =
            self.vm.disks.iter().find(|d| {
                (!id.is_empty() && d.device == id) || (!file.is_empty() && d.file == file)
            });
        let Some(disk) = disk else {
            if !file.is_empty() && kv.get("media") == Some("cdrom") {
                return Err(no("a cdrom with media inserted; eject it first".into()));
            }
            if let Some((key, _)) = kv.items.iter().find(|(k, _)| {
                !k.starts_with("throttling.") && !EMPTY_DRIVE_KEYS.contains(&k.as_str())
            }) {
                let key = if key.is_empty() { "file" } else { key };
                return Err(no(format!(
                    "this drive is not among the disks QEMU reported, so it cannot be copied \
                     (its `{key}=` opens storage on the source host)"
                )));
            }
            // An empty drive (a cdrom without media): nothing host-local in it.
            self.push("drive", Some(value.to_string()));
            return Ok(());
        };
        let image = self.image_for(&disk.name)?;
        let name = disk.name.clone();
        kv.remove_where(is_image_key);
        let mut rest = kv.clone();
        rest.remove_where(|k| k == "file");
        let rest = value::parse(&rest.render(), "if").map_err(no)?;
        if let Some(key) = value::any_host_reference(&rest) {
            return Err(no(format!("`{key}=` names something on the source host")));
        }
        kv.set("file", &image);
        kv.set("format", "raw");
        self.placed.insert(name);
        self.push("drive", Some(kv.render()));
        Ok(())
    }

    pub(super) fn blockdev(&mut self, value: &str) -> Result<(), RewriteError> {
        let parsed =
            value::parse(value, "driver").map_err(|e| refuse("blockdev", Some(value), e))?;
        let node = value::field(&parsed, "node-name").to_string();
        if let Some(disk) = self.vm.disks.iter().find(|d| d.node_name == node) {
            let (name, read_only) = (disk.name.clone(), disk.read_only);
            let image = self.image_for(&name)?;
            let mut root = Map::new();
            root.insert("driver".into(), json!("raw"));
            root.insert("node-name".into(), json!(node));
            root.insert("file".into(), json!({"driver": "file", "filename": image}));
            if read_only {
                root.insert("read-only".into(), json!(true));
            }
            for key in ["discard", "detect-zeroes"] {
                if let Some(v) = parsed.get(key).and_then(Value::as_str) {
                    root.insert(key.into(), json!(v));
                }
            }
            self.placed.insert(name);
            self.push("blockdev", Some(Value::Object(root).to_string()));
            return Ok(());
        }
        if !node.is_empty() && self.chain_nodes.contains(&node) {
            return Ok(());
        }
        if value::any_host_reference(&parsed).is_some() {
            return Err(refuse(
                "blockdev",
                Some(value),
                "it opens a file that is not one of the VM's disks",
            ));
        }
        let driver = value::field(&parsed, "driver");
        if !INERT_DRIVERS.contains(&driver) {
            return Err(refuse(
                "blockdev",
                Some(value),
                format!("it opens storage (driver `{driver}`) that is not one of the VM's disks"),
            ));
        }
        self.push("blockdev", Some(value.to_string()));
        Ok(())
    }
}
