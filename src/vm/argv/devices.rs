//! Guest hardware and its backends: `-device`, `-object`, `-machine`, `-display`, `-audiodev`,
//! `-usbdevice`.
//!
//! Devices are emulated inside QEMU, so their types are not listed one by one; what matters is
//! what they reach on the host. Device types that pass a host device or load a host file through
//! are refused, and so is any key naming a host file or descriptor (`romfile=`, `vhostfd=`). Objects
//! are backends, few and host-facing, so they are an allowlist.

use serde_json::Value;

use super::super::keyval::KeyVal;
use super::value;
use super::{refuse, RewriteError, Rewriter};

/// Device types refused by prefix, with why.
const DEVICES: &[(&str, &str)] = &[
    ("loader", "it loads a host file into guest memory"),
    ("vfio-", "it passes a host device through"),
    ("usb-host", "it passes a host USB device through"),
    (
        "vhost-",
        "it needs a vhost backend (a host device or daemon) on the destination host",
    ),
    ("virtio-9p", "it shares a host directory with the guest"),
    (
        "ccid-card-emulated",
        "it reads certificates from a host database",
    ),
    ("u2f-passthru", "it passes a host device through"),
    ("scsi-generic", "it passes a host SCSI device through"),
    ("scsi-block", "it passes a host SCSI device through"),
    ("pci-assign", "it passes a host device through"),
    ("kvm-pci-assign", "it passes a host device through"),
    ("xen-", "ferry migrates Xen guests with xl"),
];

/// `-object` types the agent runs: RAM, randomness, I/O threads and other QEMU-internal pieces.
const OBJECTS: &[&str] = &[
    "memory-backend-ram",
    "memory-backend-memfd",
    "rng-builtin",
    "rng-random",
    "rng-egd",
    "iothread",
    "throttle-group",
    "secret",
    "cryptodev-backend-builtin",
    "main-loop",
    "thread-context",
    "can-bus",
    "filter-buffer",
];

/// Entropy sources `rng-random` may read.
const RNG_FILES: &[&str] = &["/dev/urandom", "/dev/random"];

impl Rewriter<'_> {
    pub(super) fn device(&mut self, value: &str) -> Result<(), RewriteError> {
        let parsed = value::parse(value, "driver").map_err(|e| refuse("device", Some(value), e))?;
        let driver = value::field(&parsed, "driver");
        if let Some((_, why)) = DEVICES.iter().find(|(p, _)| driver.starts_with(p)) {
            return Err(refuse("device", Some(value), *why));
        }
        // `romfile=` (empty) turns the option ROM off: nothing is loaded.
        let empty_rom = |k: &str, v: &Value| k == "romfile" && v.as_str() == Some("");
        if let Some(key) = value::host_reference(&parsed, &empty_rom) {
            return Err(refuse(
                "device",
                Some(value),
                format!("`{key}=` names something on the source host"),
            ));
        }
        self.push("device", Some(value.to_string()));
        Ok(())
    }

    pub(super) fn object(&mut self, value: &str) -> Result<(), RewriteError> {
        let parsed =
            value::parse(value, "qom-type").map_err(|e| refuse("object", Some(value), e))?;
        let kind = value::field(&parsed, "qom-type");
        if kind == "memory-backend-file" {
            return Err(refuse(
                "object",
                Some(value),
                "guest RAM is backed by a file on the source host",
            ));
        }
        if !OBJECTS.contains(&kind) {
            return Err(refuse(
                "object",
                Some(value),
                format!("object type `{kind}` is not one ferry knows how to move"),
            ));
        }
        let entropy = |k: &str, v: &Value| {
            kind == "rng-random"
                && k == "filename"
                && v.as_str().is_some_and(|f| RNG_FILES.contains(&f))
        };
        if let Some(key) = value::host_reference(&parsed, &entropy) {
            return Err(refuse(
                "object",
                Some(value),
                format!("`{key}=` names something on the source host"),
            ));
        }
        self.push("object", Some(value.to_string()));
        Ok(())
    }

    /// The machine type is pinned to the resolved one; keys naming host files are refused.
    pub(super) fn machine(&mut self, name: &str, value: &str) -> Result<(), RewriteError> {
        let parsed = value::parse(value, "type").map_err(|e| refuse(name, Some(value), e))?;
        if let Some(key) = value::any_host_reference(&parsed) {
            return Err(refuse(
                name,
                Some(value),
                format!("`{key}=` names a file on the source host"),
            ));
        }
        self.machine_seen = true;
        let out = match (&self.vm.machine, value.trim_start().starts_with('{')) {
            (None, _) => value.to_string(),
            (Some(machine), true) => {
                let mut parsed = parsed;
                parsed.insert("type".into(), Value::String(machine.clone()));
                Value::Object(parsed).to_string()
            }
            (Some(machine), false) => {
                let mut kv = KeyVal::parse(value);
                match kv.items.first_mut() {
                    Some((k, v)) if k.is_empty() => *v = machine.clone(),
                    _ => kv.set("type", machine),
                }
                kv.render()
            }
        };
        self.push(name, Some(out));
        Ok(())
    }

    /// Only `-display none`: the destination QEMU has no screen, and a display server connection
    /// (gtk, sdl, spice, dbus) would reach into the destination host's session.
    pub(super) fn display(&mut self, value: &str) -> Result<(), RewriteError> {
        let parsed = value::parse(value, "type").map_err(|e| refuse("display", Some(value), e))?;
        if value::field(&parsed, "type") != "none" || parsed.len() != 1 {
            return Err(refuse(
                "display",
                Some(value),
                "only -display none runs on the destination (use -vnc unix:PATH for a console)",
            ));
        }
        self.push("display", Some(value.to_string()));
        Ok(())
    }

    /// Audio only through the `none` driver: any other reaches a host sound server or writes a file.
    pub(super) fn audio(&mut self, name: &str, value: &str) -> Result<(), RewriteError> {
        let parsed = value::parse(value, "driver").map_err(|e| refuse(name, Some(value), e))?;
        if value::field(&parsed, "driver") != "none" {
            return Err(refuse(
                name,
                Some(value),
                "only the `none` audio driver runs on the destination (others reach a host sound \
                 server or write a host file)",
            ));
        }
        if let Some(key) = value::any_host_reference(&parsed) {
            return Err(refuse(
                name,
                Some(value),
                format!("`{key}=` names a file on the source host"),
            ));
        }
        self.push(name, Some(value.to_string()));
        Ok(())
    }

    pub(super) fn usbdevice(&mut self, value: &str) -> Result<(), RewriteError> {
        if !matches!(value, "tablet" | "mouse" | "keyboard") {
            return Err(refuse(
                "usbdevice",
                Some(value),
                "only the emulated tablet, mouse and keyboard can move",
            ));
        }
        self.push("usbdevice", Some(value.to_string()));
        Ok(())
    }
}
