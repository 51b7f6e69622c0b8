//! Rewriting the source QEMU's argv into the destination's.
//!
//! The destination runs the same VM (same machine type, devices, CPU, memory) with everything
//! host-local moved into the migration directory:
//! - disks point at the new raw images (`-drive file=`, or a fresh `-blockdev` chain with the same
//!   root node name, so `-device ...,drive=NAME` still finds it);
//! - file-backed chardevs and logs (`-serial file:X`, `-chardev file,path=X`, socket paths, `-D`)
//!   go to files of the same base name inside the directory;
//! - monitors and QMP sockets are dropped and replaced by the agent's own QMP socket;
//! - `-S -incoming defer -pidfile -sandbox` are the agent's (the agent starts QEMU detached
//!   itself: `-daemonize` cannot run under a sandbox that denies fork and setsid).
//!
//! Every option passes an allowlist ([`options`]): ferry accepts only what it knows how to move,
//! and refuses, with the option named, anything that would make the destination QEMU open
//! something of the host's it was not given (a file, a device, a port, a program). The checks
//! look at values as data ([`value`]), so the JSON spelling of an option gets the same checks.
//! Submodules: [`options`] (the table), [`value`] (values, host references), `drive`, `chardev`,
//! `net`, `devices` (one per kind of option).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::blockdev::{collect_chain, parse_blockdev};
use super::VmDescription;

mod chardev;
mod devices;
mod drive;
mod net;
pub mod options;
pub mod value;

use options::Class;

/// The agent's journal in the migration directory (see `agent::storage`), and the temporary
/// file it is written through (`crate::journal`).
pub const JOURNAL_NAME: &str = "journal.json";
const JOURNAL_TMP_NAME: &str = "journal.json.tmp";
/// The unix socket the destination QEMU takes an encrypted migration's RAM stream on, fed by
/// the agent's TLS listener (`crate::tunnel`).
pub const RAM_SOCKET_NAME: &str = crate::tunnel::RAM_SOCKET;

/// File names inside the migration directory that belong to the agent: a relocated file never
/// takes one of these, nor a disk image's name. A chardev writing over the journal would corrupt
/// the record of who owns the VM.
const RESERVED_NAMES: &[&str] = &[
    "qmp.sock",
    "qemu.pid",
    JOURNAL_NAME,
    JOURNAL_TMP_NAME,
    RAM_SOCKET_NAME,
    "qemu.stderr",
    "argv",
    "migration.json",
    "migration.json.tmp",
];

/// What the destination QEMU runs under: seccomp, with no way to run other programs, change
/// its privileges or its scheduling. Even a guest that breaks out of the device emulation is then
/// left with the syscalls QEMU itself needs.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

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

    /// The socket the destination QEMU takes the RAM stream on when it travels encrypted.
    pub fn ram_socket(&self) -> PathBuf {
        self.dir.join(RAM_SOCKET_NAME)
    }

    /// The destination QEMU's pid file.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// The destination's command line and what moved where.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewritten {
    /// argv\[0\] included.
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
        if options::FLAGS.contains(&name) {
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

/// The files the destination QEMU would load from this host's file system at start-up
/// (`-kernel`, `-initrd`, `-bios`, `-dtb`, `-shim`), as `(option, path)`: the agent checks them
/// against the directories it allows. Options that do not parse are left to [`rewrite`] to refuse.
pub fn host_files(argv: &[String]) -> Vec<(String, String)> {
    let opts = parse(argv.get(1..).unwrap_or_default()).unwrap_or_default();
    opts.into_iter()
        .filter(|o| options::classify(&o.name) == Some(Class::HostFile))
        .filter_map(|o| Some((o.name, o.value?)))
        .collect()
}

/// Builds the destination argv for `vm`, or says which option prevents it.
pub fn rewrite(vm: &VmDescription, ctx: &RewriteContext) -> Result<Rewritten, RewriteError> {
    // The machine type is written into `-machine` as it came: it must be a name and nothing more
    // (`pc,kernel=/x` would smuggle keys past the checks).
    if let Some(machine) = &vm.machine {
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if machine.is_empty() || !machine.chars().all(name_char) {
            return Err(RewriteError {
                option: format!("machine type {machine:?}"),
                reason: "a machine type is a name (letters, digits, '.', '_', '-')".into(),
            });
        }
    }
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
            // Images are reserved before any option is read: a `-serial file:/x/disk-vda.raw`
            // seen before its disk's `-blockdev` must not be given the image's name (QEMU would
            // truncate the mirrored image when it opens the serial file).
            used_names: RESERVED_NAMES
                .iter()
                .map(|s| s.to_string())
                .chain(
                    ctx.images
                        .values()
                        .filter_map(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned()),
                )
                .collect(),
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
        let Some(class) = options::classify(name) else {
            return Err(refuse(name, opt.value.as_deref(), options::UNKNOWN));
        };
        let value = match (class, opt.value.as_deref()) {
            (Class::Refused(why), value) => return Err(refuse(name, value, why)),
            (Class::Agent, _) => return Ok(()),
            (Class::Flag, None) => {
                self.push(name, None);
                return Ok(());
            }
            (_, Some(value)) => value,
            (_, None) => return Err(refuse(name, None, "it is missing its value")),
        };
        match class {
            Class::Name => {
                if value.contains('/') {
                    return Err(refuse(
                        name,
                        Some(value),
                        "a name is expected here, not a path",
                    ));
                }
                self.push(name, Some(value.to_string()));
                Ok(())
            }
            Class::Text | Class::HostFile => {
                self.push(name, Some(value.to_string()));
                Ok(())
            }
            Class::Keyval => {
                let parsed = value::parse(value, "").map_err(|e| refuse(name, Some(value), e))?;
                if let Some(key) = value::any_host_reference(&parsed) {
                    return Err(refuse(
                        name,
                        Some(value),
                        format!("`{key}=` names something on the source host"),
                    ));
                }
                self.push(name, Some(value.to_string()));
                Ok(())
            }
            Class::Drive => self.drive(value),
            Class::Blockdev => self.blockdev(value),
            Class::Chardev => self.chardev(value),
            Class::LegacyChardev => self.legacy_chardev(name, value),
            Class::Netdev | Class::Nic | Class::Net => self.netdev(name, value),
            Class::Device => self.device(value),
            Class::Object => self.object(value),
            Class::Machine => self.machine(name, value),
            Class::Display => self.display(value),
            Class::Vnc => self.vnc(value),
            Class::Audio => self.audio(name, value),
            Class::UsbDevice => self.usbdevice(value),
            Class::LogFile => {
                let moved = self.relocate(value);
                self.push(name, Some(moved));
                Ok(())
            }
            Class::Flag | Class::Agent | Class::Refused(_) => Ok(()),
        }
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
        self.push("sandbox", Some(SANDBOX.into()));
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
