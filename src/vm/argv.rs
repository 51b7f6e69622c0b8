//! Rewriting the source QEMU's argv into the destination's.
//!
//! The destination runs the same VM (same machine type, devices, CPU, memory) with everything
//! host-local moved into the migration directory:
//! - disks point at the new raw images (`-drive file=`, or a fresh `-blockdev` chain with the same
//!   root node name, so `-device ...,drive=NAME` still finds it);
//! - file-backed chardevs and logs (`-serial file:X`, `-chardev file,path=X`, socket paths, `-D`)
//!   go to files of the same base name inside the directory;
//! - monitors and QMP sockets are dropped and replaced by the agent's own QMP socket;
//! - `-S -incoming defer -daemonize -pidfile` are the agent's.
//!
//! Anything that would make the destination share a path with the source, or that cannot run
//! daemonized, is refused with the option named, rather than guessed at.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::blockdev::{collect_chain, has_filename, parse_blockdev};

use super::keyval::{is_true, KeyVal};
use super::VmDescription;

/// QEMU options that take no value. Everything else takes exactly one.
const FLAGS: &[&str] = &[
    "S",
    "snapshot",
    "nographic",
    "daemonize",
    "nodefaults",
    "no-user-config",
    "nodefconfig",
    "no-reboot",
    "no-shutdown",
    "enable-kvm",
    "s",
    "full-screen",
    "no-frame",
    "alt-grab",
    "ctrl-grab",
    "no-quit",
    "no-hpet",
    "no-acpi",
    "no-fd-bootchk",
    "win2k-hack",
    "usb",
    "only-migratable",
    "enable-sync-profile",
    "preconfig",
    "xen-attach",
    "xen-domid-restrict",
    "version",
    "h",
    "help",
    "semihosting",
    "rtc-td-hack",
    "portrait",
    "sdl",
    "curses",
    "enable-fips",
    "no-kvm",
];

/// Options that cannot move to another host: why, for the operator.
const REFUSED: &[(&str, &str)] = &[
    (
        "snapshot",
        "writes go to a temporary overlay that cannot be migrated",
    ),
    (
        "loadvm",
        "it restores a snapshot stored in the source images",
    ),
    (
        "mem-path",
        "guest RAM is backed by a file on the source host",
    ),
    ("fsdev", "it shares a host directory with the guest"),
    ("virtfs", "it shares a host directory with the guest"),
    ("readconfig", "the config file lives on the source host"),
    ("writeconfig", "it writes a file on the source host"),
    (
        "nographic",
        "it ties the serial console to the terminal; use -display none and -serial file:PATH",
    ),
    (
        "hda",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "hdb",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "hdc",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "hdd",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "cdrom",
        "eject the media or use an empty -drive media=cdrom",
    ),
    (
        "fda",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "fdb",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "mtdblock",
        "use -drive or -blockdev so the disk can be identified",
    ),
    (
        "sd",
        "use -drive or -blockdev so the disk can be identified",
    ),
];

/// Options the agent sets itself; the source's values are dropped.
const REPLACED: &[&str] = &[
    "S",
    "daemonize",
    "incoming",
    "pidfile",
    "qmp",
    "qmp-pretty",
    "monitor",
];

/// File names inside the migration directory that belong to the agent.
const RESERVED_NAMES: &[&str] = &["qmp.sock", "qemu.pid", "phase", "qemu.stderr"];

/// Where the destination's host-local things go.
#[derive(Debug, Clone)]
pub struct RewriteContext {
    /// The QEMU binary to run on the destination.
    pub binary: String,
    /// The migration directory.
    pub dir: PathBuf,
    /// New raw image for each disk, by [`super::DiskDescription::name`].
    pub images: HashMap<String, PathBuf>,
}

impl RewriteContext {
    /// The agent's QMP socket for the destination QEMU.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }

    /// The destination QEMU's pid file.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// The destination's command line and what moved where.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewritten {
    /// argv[0] included.
    pub argv: Vec<String>,
    /// `(source path, destination path)` of every relocated chardev, socket or log file.
    pub relocated: Vec<(String, PathBuf)>,
}

/// Why an argv cannot be run on the destination: names the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot relocate `{option}`: {reason}")]
pub struct RewriteError {
    /// The option as written on the source command line.
    pub option: String,
    /// Why, and what the operator can do instead.
    pub reason: String,
}

fn refuse(option: &str, value: Option<&str>, reason: impl Into<String>) -> RewriteError {
    let option = match value {
        Some(v) => format!("-{option} {v}"),
        None => format!("-{option}"),
    };
    RewriteError {
        option,
        reason: reason.into(),
    }
}

/// One option of a QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    /// Name without leading dashes.
    pub name: String,
    /// Its value, for options that take one.
    pub value: Option<String>,
}

/// Splits a QEMU argv (without argv\[0\]) into options.
pub fn parse(args: &[String]) -> Result<Vec<Opt>, RewriteError> {
    let mut opts = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let Some(name) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(RewriteError {
                option: arg.clone(),
                reason: "a bare image argument cannot be identified; use -drive or -blockdev"
                    .into(),
            });
        };
        if FLAGS.contains(&name) {
            opts.push(Opt {
                name: name.to_string(),
                value: None,
            });
            continue;
        }
        let value = iter
            .next()
            .ok_or_else(|| refuse(name, None, "it is missing its value"))?;
        opts.push(Opt {
            name: name.to_string(),
            value: Some(value.clone()),
        });
    }
    Ok(opts)
}

/// Builds the destination argv for `vm`, or says which option prevents it.
pub fn rewrite(vm: &VmDescription, ctx: &RewriteContext) -> Result<Rewritten, RewriteError> {
    let opts = parse(vm.argv.get(1..).unwrap_or_default())?;
    let mut out = Rewriter::new(vm, ctx, &opts)?;
    for opt in &opts {
        out.option(opt)?;
    }
    out.finish()
}

struct Rewriter<'a> {
    vm: &'a VmDescription,
    ctx: &'a RewriteContext,
    argv: Vec<String>,
    relocated: Vec<(String, PathBuf)>,
    used_names: HashSet<String>,
    /// `-blockdev` node names that belong to a disk's chain (replaced, not copied).
    chain_nodes: HashSet<String>,
    /// Disks already written out, to catch one that no option on the command line matched.
    placed: HashSet<String>,
    machine_seen: bool,
}

impl<'a> Rewriter<'a> {
    fn new(
        vm: &'a VmDescription,
        ctx: &'a RewriteContext,
        opts: &[Opt],
    ) -> Result<Self, RewriteError> {
        let blockdevs: HashMap<String, Value> = opts
            .iter()
            .filter(|o| o.name == "blockdev")
            .filter_map(|o| o.value.as_deref())
            .map(parse_blockdev)
            .filter_map(|v| Some((v.get("node-name")?.as_str()?.to_string(), v)))
            .collect();
        let mut chain_nodes = HashSet::new();
        for disk in &vm.disks {
            collect_chain(&disk.node_name, &blockdevs, &mut chain_nodes);
        }
        Ok(Rewriter {
            vm,
            ctx,
            argv: vec![ctx.binary.clone()],
            relocated: Vec::new(),
            used_names: RESERVED_NAMES.iter().map(|s| s.to_string()).collect(),
            chain_nodes,
            placed: HashSet::new(),
            machine_seen: false,
        })
    }

    fn push(&mut self, name: &str, value: Option<String>) {
        self.argv.push(format!("-{name}"));
        if let Some(v) = value {
            self.argv.push(v);
        }
    }

    fn option(&mut self, opt: &Opt) -> Result<(), RewriteError> {
        let name = opt.name.as_str();
        let value = opt.value.as_deref();
        if let Some((_, why)) = REFUSED.iter().find(|(n, _)| *n == name) {
            return Err(refuse(name, value, *why));
        }
        if REPLACED.contains(&name) {
            return Ok(());
        }
        let Some(value) = value else {
            self.push(name, None);
            return Ok(());
        };
        match name {
            "drive" => self.drive(value),
            "blockdev" => self.blockdev(value),
            "serial" | "parallel" | "debugcon" => {
                let v = self.legacy_chardev(name, value)?;
                self.push(name, Some(v));
                Ok(())
            }
            "chardev" => self.chardev(value),
            "D" => {
                let moved = self.relocate(value);
                self.push(name, Some(moved));
                Ok(())
            }
            "machine" | "M" => {
                self.machine_seen = true;
                let mut kv = KeyVal::parse(value);
                if let Some(machine) = &self.vm.machine {
                    match kv.items.first_mut() {
                        Some((k, v)) if k.is_empty() => *v = machine.clone(),
                        _ => kv.set("type", machine),
                    }
                }
                self.push(name, Some(kv.render()));
                Ok(())
            }
            "object" => {
                let kv = KeyVal::parse(value);
                if kv.implied() == Some("memory-backend-file")
                    || kv.get("qom-type") == Some("memory-backend-file")
                {
                    return Err(refuse(
                        name,
                        Some(value),
                        "guest RAM is backed by a file on the source host",
                    ));
                }
                self.push(name, Some(value.to_string()));
                Ok(())
            }
            _ => {
                self.push(name, Some(value.to_string()));
                Ok(())
            }
        }
    }

    fn drive(&mut self, value: &str) -> Result<(), RewriteError> {
        let mut kv = KeyVal::parse(value);
        if kv.get("snapshot").is_some_and(is_true) {
            return Err(refuse(
                "drive",
                Some(value),
                "snapshot=on keeps writes in a temporary overlay",
            ));
        }
        let file = kv.get("file").unwrap_or("").to_string();
        let id = kv.get("id").unwrap_or("").to_string();
        let disk =
            self.vm.disks.iter().find(|d| {
                (!id.is_empty() && d.device == id) || (!file.is_empty() && d.file == file)
            });
        let Some(disk) = disk else {
            if file.is_empty() {
                // An empty drive (a cdrom without media): nothing host-local in it.
                self.push("drive", Some(value.to_string()));
                return Ok(());
            }
            if kv.get("media") == Some("cdrom") {
                return Err(refuse(
                    "drive",
                    Some(value),
                    "a cdrom with media inserted; eject it first",
                ));
            }
            return Err(refuse(
                "drive",
                Some(value),
                "this drive is not among the disks QEMU reported, so it cannot be copied",
            ));
        };
        let image = self.image_for(&disk.name)?;
        kv.remove_where(|k| k == "format" || k.starts_with("file.") || k.starts_with("backing"));
        kv.set("file", &image);
        kv.set("format", "raw");
        self.placed.insert(disk.name.clone());
        self.push("drive", Some(kv.render()));
        Ok(())
    }

    fn blockdev(&mut self, value: &str) -> Result<(), RewriteError> {
        let parsed = parse_blockdev(value);
        let node = parsed
            .get("node-name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(disk) = self.vm.disks.iter().find(|d| d.node_name == node) {
            let image = self.image_for(&disk.name)?;
            let mut root = Map::new();
            root.insert("driver".into(), json!("raw"));
            root.insert("node-name".into(), json!(node));
            root.insert("file".into(), json!({"driver": "file", "filename": image}));
            if disk.read_only {
                root.insert("read-only".into(), json!(true));
            }
            for key in ["discard", "detect-zeroes"] {
                if let Some(v) = parsed.get(key).and_then(Value::as_str) {
                    root.insert(key.into(), json!(v));
                }
            }
            self.placed.insert(disk.name.clone());
            self.push("blockdev", Some(Value::Object(root).to_string()));
            return Ok(());
        }
        if self.chain_nodes.contains(&node) {
            return Ok(());
        }
        if has_filename(&parsed) {
            return Err(refuse(
                "blockdev",
                Some(value),
                "it opens a file that is not one of the VM's disks",
            ));
        }
        self.push("blockdev", Some(value.to_string()));
        Ok(())
    }

    /// `-serial file:X`, `unix:X`, `stdio`, `mon:stdio`, ...
    fn legacy_chardev(&mut self, name: &str, value: &str) -> Result<String, RewriteError> {
        let inner = value.strip_prefix("mon:").unwrap_or(value);
        let prefix = &value[..value.len() - inner.len()];
        if inner == "stdio" || inner.starts_with("pipe:") {
            return Err(refuse(
                name,
                Some(value),
                "the destination QEMU runs daemonized; use file:PATH or a unix socket",
            ));
        }
        if let Some(path) = inner.strip_prefix("file:") {
            return Ok(format!("{prefix}file:{}", self.relocate(path)));
        }
        if let Some(rest) = inner.strip_prefix("unix:") {
            let (path, opts) = rest
                .split_once(',')
                .map_or((rest, None), |(p, o)| (p, Some(o)));
            let moved = self.relocate(path);
            return Ok(match opts {
                Some(o) => format!("{prefix}unix:{moved},{o}"),
                None => format!("{prefix}unix:{moved}"),
            });
        }
        Ok(value.to_string())
    }

    fn chardev(&mut self, value: &str) -> Result<(), RewriteError> {
        let mut kv = KeyVal::parse(value);
        let backend = kv
            .implied()
            .or_else(|| kv.get("backend"))
            .unwrap_or("")
            .to_string();
        match backend.as_str() {
            "stdio" | "pipe" | "serial" | "tty" | "parallel" | "parport" => {
                return Err(refuse("chardev", Some(value), "the destination QEMU runs daemonized and cannot reach this host device; use file or socket"));
            }
            _ => {}
        }
        for key in ["path", "logfile"] {
            if let Some(path) = kv.get(key).map(str::to_string) {
                let moved = self.relocate(&path);
                kv.set(key, &moved);
            }
        }
        self.push("chardev", Some(kv.render()));
        Ok(())
    }

    /// A path inside the migration directory with the same base name, unique within it.
    fn relocate(&mut self, path: &str) -> String {
        let base = Path::new(path)
            .file_name()
            .map(|b| b.to_string_lossy().into_owned())
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| "file".to_string());
        let mut name = base.clone();
        let mut n = 1;
        while self.used_names.contains(&name) {
            n += 1;
            name = format!("{n}-{base}");
        }
        self.used_names.insert(name.clone());
        let moved = self.ctx.dir.join(&name);
        self.relocated.push((path.to_string(), moved.clone()));
        moved.to_string_lossy().into_owned()
    }

    fn image_for(&mut self, disk: &str) -> Result<String, RewriteError> {
        let image = self.ctx.images.get(disk).ok_or_else(|| RewriteError {
            option: disk.to_string(),
            reason: "no destination image was prepared for this disk".into(),
        })?;
        if let Some(name) = image.file_name() {
            self.used_names.insert(name.to_string_lossy().into_owned());
        }
        Ok(image.to_string_lossy().into_owned())
    }

    fn finish(mut self) -> Result<Rewritten, RewriteError> {
        if let Some(missing) = self
            .vm
            .disks
            .iter()
            .find(|d| !self.placed.contains(&d.name))
        {
            return Err(RewriteError {
                option: missing.name.clone(),
                reason: format!(
                    "disk {} (node {}) is not defined by a -drive or -blockdev on the command line \
                     (was it hot-plugged?); ferry cannot recreate it",
                    missing.name, missing.node_name
                ),
            });
        }
        if !self.machine_seen {
            if let Some(machine) = self.vm.machine.clone() {
                self.push("machine", Some(machine));
            }
        }
        let qmp = format!(
            "unix:{},server=on,wait=off",
            self.ctx.qmp_socket().display()
        );
        let pidfile = self.ctx.pidfile().to_string_lossy().into_owned();
        self.push("qmp", Some(qmp));
        self.push("pidfile", Some(pidfile));
        self.push("daemonize", None);
        self.push("S", None);
        self.push("incoming", Some("defer".into()));
        Ok(Rewritten {
            argv: self.argv,
            relocated: self.relocated,
        })
    }
}

#[cfg(test)]
mod tests;
