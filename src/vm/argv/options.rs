//! The allowlist: every QEMU option ferry knows, and what the agent does with it.
//!
//! The source's command line comes from a peer the agent trusts only to migrate here, not to run
//! anything here. So an option is accepted only when ferry knows what it touches on the host and
//! how to move that (or knows it touches nothing); anything else is refused with the option
//! named. A new QEMU option is refused until someone adds it here with its reason.

/// QEMU options that take no value (from `qemu-system-x86_64 -h`, 7.2 to 10.0, plus a few
/// removed ones so that an old command line still splits correctly). Everything else takes one.
pub(super) const FLAGS: &[&str] = &[
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
    "no-kvm",
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
    "mem-prealloc",
    "perfmap",
    "jitdump",
    "singlestep",
    "one-insn-per-tb",
    "async-teardown",
];

/// What the agent does with one option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// Guest configuration without a value: copied.
    Flag,
    /// The agent sets its own (`-S`, `-incoming`, `-qmp`, ...): the source's is dropped.
    Agent,
    /// Refused, with the reason for the operator.
    Refused(&'static str),
    /// A name or number (`-cpu host`, `-k de`): copied, but never a path.
    Name,
    /// Free text for the guest (`-append`): copied.
    Text,
    /// `key=value` guest configuration (`-m`, `-smp`, `-rtc`): copied after the check that no key
    /// names a host file, a file descriptor or a host directory.
    Keyval,
    /// A file the destination QEMU loads at start-up (`-kernel`): copied; the agent checks the
    /// path against the directories it allows.
    HostFile,
    /// `-drive`.
    Drive,
    /// `-blockdev`.
    Blockdev,
    /// `-chardev`.
    Chardev,
    /// `-serial`, `-parallel`, `-debugcon`: the legacy chardev syntax.
    LegacyChardev,
    /// `-netdev`.
    Netdev,
    /// `-nic`.
    Nic,
    /// `-net`.
    Net,
    /// `-device`.
    Device,
    /// `-object`.
    Object,
    /// `-machine`, `-M`.
    Machine,
    /// `-display`.
    Display,
    /// `-vnc`.
    Vnc,
    /// `-audiodev`, `-audio`.
    Audio,
    /// `-usbdevice`.
    UsbDevice,
    /// `-D`: the log file moves into the migration directory.
    LogFile,
}

const IDENTIFY: &str = "use -drive or -blockdev so the disk can be identified";
const DISPLAY: &str =
    "the destination QEMU runs without a display; use -display none (and -vnc unix:PATH)";
const AGENT_RUNS: &str = "the agent decides how its QEMU runs";

/// The class of option `name` (without dashes), or `None` for an option ferry does not know.
pub(super) fn classify(name: &str) -> Option<Class> {
    use Class::*;
    let class = match name {
        "nodefaults" | "no-user-config" | "nodefconfig" | "no-reboot" | "no-shutdown"
        | "enable-kvm" | "no-kvm" | "no-hpet" | "no-acpi" | "no-fd-bootchk" | "win2k-hack"
        | "usb" | "only-migratable" | "rtc-td-hack" | "mem-prealloc" => Flag,
        // `-L`: firmware and ROMs come from the destination binary's own data directories (a
        // wrapper such as scripts/setup's QEMU 7.2 adds its own `-L`); the source's host paths
        // mean nothing here, so they are dropped rather than refused.
        "S" | "daemonize" | "incoming" | "pidfile" | "qmp" | "qmp-pretty" | "monitor" | "mon"
        | "sandbox" | "L" => Agent,
        "cpu" | "vga" | "k" | "uuid" | "d" | "dfilter" | "seed" | "echr" | "watchdog-action" => {
            Name
        }
        "append" | "prom-env" => Text,
        "accel" | "smp" | "m" | "numa" | "rtc" | "boot" | "name" | "msg" | "overcommit"
        | "action" | "icount" | "compat" | "smbios" => Keyval,
        "kernel" | "initrd" | "bios" | "dtb" | "shim" => HostFile,
        "drive" => Drive,
        "blockdev" => Blockdev,
        "chardev" => Chardev,
        "serial" | "parallel" | "debugcon" => LegacyChardev,
        "netdev" => Netdev,
        "nic" => Nic,
        "net" => Net,
        "device" => Device,
        "object" => Object,
        "machine" | "M" => Machine,
        "display" => Display,
        "vnc" => Vnc,
        "audiodev" | "audio" => Audio,
        "usbdevice" => UsbDevice,
        "D" => LogFile,
        other => return refused(other).map(Refused),
    };
    Some(class)
}

/// Options known and refused, with why.
fn refused(name: &str) -> Option<&'static str> {
    Some(match name {
        "snapshot" => "writes go to a temporary overlay that cannot be migrated",
        "loadvm" => "it restores a snapshot stored in the source images",
        "mem-path" => "guest RAM is backed by a file on the source host",
        "fsdev" | "virtfs" => "it shares a host directory with the guest",
        "readconfig" => "the config file lives on the source host",
        "writeconfig" | "dump-vmstate" => "it writes a file on the host",
        "nographic" => {
            "it ties the serial console to the terminal; use -display none and -serial file:PATH"
        }
        "hda" | "hdb" | "hdc" | "hdd" | "fda" | "fdb" | "mtdblock" | "sd" => IDENTIFY,
        "cdrom" => "eject the media or use an empty -drive media=cdrom",
        "pflash" => {
            "use -drive if=pflash,file=...,format=... so the flash travels as one of the disks"
        }
        "set" => "it edits other options by id after ferry has checked them",
        "global" => {
            "it sets properties (such as romfile) on every device of a type, past ferry's checks"
        }
        "plugin" => "it loads a shared library from the host",
        "trace" => "trace options read and write host files",
        "option-rom" | "acpitable" => "it loads a host file into the guest",
        "fw_cfg" => "it can load a host file into the guest; ferry does not move fw_cfg items",
        "add-fd" => "it passes file descriptors of the source's process",
        "tpmdev" => "a TPM's state or device lives on the source host",
        "iscsi" => "network storage is not one of the VM's disks",
        "spice" | "sdl" | "curses" | "full-screen" | "no-frame" | "alt-grab" | "ctrl-grab"
        | "no-quit" | "portrait" => DISPLAY,
        "gdb" | "s" => "it opens a debugger port on the host",
        "semihosting" | "semihosting-config" => "it gives the guest access to host files",
        "runas" | "chroot" | "run-with" => AGENT_RUNS,
        "preconfig" => "it waits for configuration over a monitor the agent does not drive",
        "xen-domid" | "xen-attach" | "xen-domid-restrict" => "ferry migrates Xen guests with xl",
        "h" | "help" | "version" => "it does not start a VM",
        _ => return None,
    })
}

/// The one-line reason for an option ferry does not know.
pub(super) const UNKNOWN: &str =
    "ferry does not know this option, so it cannot tell what it would touch on the destination host";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_ferry_accepts_take_no_value() {
        for name in [
            "nodefaults",
            "no-reboot",
            "enable-kvm",
            "mem-prealloc",
            "S",
            "daemonize",
        ] {
            assert!(FLAGS.contains(&name), "{name}");
        }
    }

    #[test]
    fn unknown_options_are_unknown() {
        assert_eq!(classify("frobnicate"), None);
        assert!(matches!(classify("set"), Some(Class::Refused(_))));
        assert_eq!(classify("kernel"), Some(Class::HostFile));
    }
}
