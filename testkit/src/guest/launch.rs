//! Booting the test guest under QEMU (TCG) and following its console.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{Acks, GuestError, GuestImages, ImageFormat};

/// The QEMU binary to use when the caller has no opinion.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";

/// virtio-blk serials hold at most 20 bytes; the id doubles as the serial.
const MAX_ID: usize = 20;
/// How long QEMU may take to open its QMP socket.
const QMP_SOCKET_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// How much of a log to quote in an error.
const TAIL: u64 = 800;

/// One disk of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// The host's name for the disk: the block node name (`<id>`, its file node `<id>-file`),
    /// the device id (`<id>-dev`) and the virtio serial the guest reports in `ferry-start`.
    /// 1 to 20 of `[A-Za-z0-9_-]`, starting with a letter.
    pub id: String,
}

impl DiskSpec {
    /// A disk from `path` in `format`, known to the host as `id`.
    pub fn new(path: impl Into<PathBuf>, format: ImageFormat, id: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            format,
            id: id.into(),
        }
    }

    fn check_id(&self) -> Result<(), GuestError> {
        let bad = |reason| {
            Err(GuestError::BadDiskId {
                id: self.id.clone(),
                reason,
            })
        };
        let id = self.id.as_bytes();
        if id.is_empty() || id.len() > MAX_ID {
            return bad("it must be 1 to 20 characters (the virtio serial limit)");
        }
        if !id[0].is_ascii_alphabetic() {
            return bad("it must start with a letter (QEMU node names do)");
        }
        if !id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("only letters, digits, '-' and '_' are allowed");
        }
        Ok(())
    }
}

/// How to boot the test guest.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Kernel and initrd.
    pub images: GuestImages,
    /// The disks, in the order the guest sees them: the first is `vda`, the next `vdb`, ...
    pub disks: Vec<DiskSpec>,
    /// Guest RAM.
    pub memory_mib: u32,
    /// The QEMU machine type.
    pub machine: String,
    /// Records per second per disk (`ferry.rate`); 0 is as fast as the disk allows.
    pub rate: u32,
    /// MiB of filler each disk gets before the records start (`ferry.fill`).
    pub fill_mib: u64,
    /// More kernel command line words.
    pub extra_kernel_args: Vec<String>,
    /// More QEMU arguments, appended last (e.g. `-incoming defer -S` for a destination).
    pub extra_qemu_args: Vec<OsString>,
}

impl GuestSpec {
    /// 256 MiB, machine `pc`, 50 records per second per disk, no disks yet.
    pub fn new(images: GuestImages) -> Self {
        Self {
            images,
            disks: Vec::new(),
            memory_mib: 256,
            machine: "pc".to_owned(),
            rate: 50,
            fill_mib: 0,
            extra_kernel_args: Vec::new(),
            extra_qemu_args: Vec::new(),
        }
    }

    /// Adds a disk (the next `vdX`).
    pub fn disk(mut self, disk: DiskSpec) -> Self {
        self.disks.push(disk);
        self
    }

    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        // quiet: kernel messages would interleave with the acks; panic=-1 with -no-reboot makes
        // a guest that dies take QEMU with it instead of rebooting into a fresh run.
        let mut words = vec![
            "console=ttyS0".to_owned(),
            "quiet".to_owned(),
            "panic=-1".to_owned(),
            format!("ferry.rate={}", self.rate),
        ];
        if self.fill_mib > 0 {
            words.push(format!("ferry.fill={}", self.fill_mib));
        }
        words.extend(self.extra_kernel_args.iter().cloned());
        words.join(" ")
    }

    /// QEMU's arguments (without the binary) for a guest whose QMP socket and console log are
    /// `qmp_socket` and `serial_log`.
    pub fn qemu_args(
        &self,
        qmp_socket: &Path,
        serial_log: &Path,
    ) -> Result<Vec<OsString>, GuestError> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |words: &[&str]| args.extend(words.iter().map(OsString::from));
        push(&[
            "-accel",
            "tcg",
            "-M",
            &self.machine,
            "-m",
            &self.memory_mib.to_string(),
        ]);
        push(&["-nodefaults", "-display", "none", "-no-reboot"]);
        push(&[
            "-kernel",
            &utf8(&self.images.kernel)?,
            "-initrd",
            &utf8(&self.images.initrd)?,
        ]);
        push(&["-append", &self.kernel_cmdline()]);
        // The legacy `file:` syntax takes the rest verbatim; `unix:` parses options after it.
        push(&["-serial", &format!("file:{}", utf8(serial_log)?)]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", escape(&utf8(qmp_socket)?)),
        ]);
        for disk in &self.disks {
            disk.check_id()?;
            let id = &disk.id;
            let file = escape(&utf8(&disk.path)?);
            push(&[
                "-blockdev",
                &format!("driver=file,filename={file},node-name={id}-file"),
            ]);
            push(&[
                "-blockdev",
                &format!("driver={},file={id}-file,node-name={id}", disk.format),
            ]);
            push(&[
                "-device",
                &format!("virtio-blk-pci,drive={id},id={id}-dev,serial={id}"),
            ]);
        }
        args.extend(self.extra_qemu_args.iter().cloned());
        Ok(args)
    }
}

/// QEMU's key=value option syntax doubles a comma to mean a literal one.
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn utf8(path: &Path) -> Result<String, GuestError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| GuestError::PathNotUtf8 {
            path: path.to_owned(),
        })
}

/// A test guest's QEMU process; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct RunningGuest {
    child: Child,
    argv: Vec<OsString>,
    qmp_socket: PathBuf,
    serial_log: PathBuf,
    stderr_log: PathBuf,
    acks: Acks,
    read: u64,
}

/// Starts QEMU for `spec` with its QMP socket, console log and stderr in `dir` (`qmp.sock`,
/// `serial.log`, `qemu.stderr`; stale ones are replaced) and returns once QMP is listening.
pub async fn launch(dir: &Path, spec: &GuestSpec, qemu: &Path) -> Result<RunningGuest, GuestError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| GuestError::Io { what, path, source }
    };
    std::fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let qmp_socket = dir.join("qmp.sock");
    let serial_log = dir.join("serial.log");
    let stderr_log = dir.join("qemu.stderr");
    for stale in [&qmp_socket, &serial_log] {
        match std::fs::remove_file(stale) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", stale)(e))
            }
            _ => {}
        }
    }
    let args = spec.qemu_args(&qmp_socket, &serial_log)?;
    let stderr = File::create(&stderr_log).map_err(io("create", &stderr_log))?;
    // Not a pipe: nobody reads it while QEMU runs, and a full pipe would stall QEMU.
    let child = Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|source| GuestError::Spawn {
            qemu: qemu.to_owned(),
            source,
        })?;
    let mut argv = vec![qemu.as_os_str().to_owned()];
    argv.extend(args);
    let mut guest = RunningGuest {
        child,
        argv,
        qmp_socket,
        serial_log,
        stderr_log,
        acks: Acks::default(),
        read: 0,
    };
    tracing::debug!(pid = guest.pid(), dir = %dir.display(), "test guest started");

    let started = Instant::now();
    while !guest.qmp_socket.exists() {
        guest.check_alive("while starting")?;
        if started.elapsed() > QMP_SOCKET_WAIT {
            return Err(GuestError::QmpSocketTimeout {
                path: guest.qmp_socket.clone(),
                waited: QMP_SOCKET_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(guest)
}

impl RunningGuest {
    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// QEMU's QMP socket (a server; one client at a time).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp_socket
    }

    /// The guest's serial console, as a file QEMU appends to.
    pub fn serial_log(&self) -> &Path {
        &self.serial_log
    }

    /// QEMU's stderr.
    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// The command line QEMU was started with, binary first.
    pub fn argv(&self) -> &[OsString] {
        &self.argv
    }

    /// Reads what the console printed since the last call and returns everything seen so far.
    pub fn acks(&mut self) -> Result<&Acks, GuestError> {
        self.read = read_more(&self.serial_log, self.read, &mut self.acks)?;
        Ok(&self.acks)
    }

    /// Waits until `disk` (the guest's name, e.g. `vda`) has at least `n` acknowledgements on
    /// this guest's console. Fails early if QEMU exits or the workload reports an error.
    pub async fn wait_for_acks(
        &mut self,
        disk: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Acks, GuestError> {
        let started = Instant::now();
        loop {
            self.acks()?;
            if let Some(done) = progress(&self.acks, disk, n)? {
                return Ok(done);
            }
            self.check_alive("while the guest was running")?;
            if started.elapsed() > timeout {
                return Err(ack_timeout(&self.acks, &self.serial_log, disk, n, timeout));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `Some(status)` once QEMU has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, GuestError> {
        self.child.try_wait().map_err(|source| GuestError::Io {
            what: "wait for QEMU of",
            path: self.qmp_socket.clone(),
            source,
        })
    }

    /// Kills QEMU (SIGKILL) and reaps it. The images are left as QEMU last wrote them.
    pub fn kill(&mut self) -> Result<ExitStatus, GuestError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let wait_err = |source| GuestError::Io {
            what: "kill QEMU of",
            path: self.qmp_socket.clone(),
            source,
        };
        self.child.kill().map_err(wait_err)?;
        self.child.wait().map_err(|source| GuestError::Io {
            what: "reap QEMU of",
            path: self.qmp_socket.clone(),
            source,
        })
    }

    fn check_alive(&mut self, during: &'static str) -> Result<(), GuestError> {
        match self.try_wait()? {
            None => Ok(()),
            Some(status) => Err(GuestError::QemuExited {
                status,
                during,
                stderr: tail(&self.stderr_log),
                console: tail(&self.serial_log),
            }),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(pid = self.pid(), error = %e, "cannot kill the test guest's QEMU");
        }
    }
}

/// Waits until `disk` has at least `n` acknowledgements in the console log `serial_log` of a
/// guest this process does not own (e.g. a migration's destination). Fails early if the
/// workload reports an error.
pub async fn wait_for_acks(
    serial_log: &Path,
    disk: &str,
    n: usize,
    timeout: Duration,
) -> Result<Acks, GuestError> {
    let started = Instant::now();
    let mut acks = Acks::default();
    let mut read = 0;
    loop {
        read = read_more(serial_log, read, &mut acks)?;
        if let Some(done) = progress(&acks, disk, n)? {
            return Ok(done);
        }
        if started.elapsed() > timeout {
            return Err(ack_timeout(&acks, serial_log, disk, n, timeout));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn progress(acks: &Acks, disk: &str, n: usize) -> Result<Option<Acks>, GuestError> {
    if let Some((_, message)) = acks.errors().iter().find(|(d, _)| d == disk) {
        return Err(GuestError::WorkloadFailed {
            disk: disk.to_owned(),
            message: message.clone(),
        });
    }
    Ok((acks.count(disk) >= n).then(|| acks.clone()))
}

fn ack_timeout(
    acks: &Acks,
    serial_log: &Path,
    disk: &str,
    n: usize,
    waited: Duration,
) -> GuestError {
    GuestError::AckTimeout {
        disk: disk.to_owned(),
        wanted: n,
        got: acks.count(disk),
        waited,
        serial_log: serial_log.to_owned(),
        console: tail(serial_log),
    }
}

/// Feeds the bytes of `path` after `offset` to `acks`; returns the new offset. A log that does
/// not exist yet reads as empty (QEMU creates it when it starts).
fn read_more(path: &Path, offset: u64, acks: &mut Acks) -> Result<u64, GuestError> {
    let io = |source| GuestError::Io {
        what: "read the console log",
        path: path.to_owned(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(offset),
        Err(e) => return Err(io(e)),
    };
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io)?;
    acks.feed(&bytes);
    Ok(offset + bytes.len() as u64)
}

/// The last few hundred bytes of a log, for error messages.
fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(cannot read {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(TAIL)))
        .is_err()
        || file.read_to_end(&mut bytes).is_err()
    {
        return format!("(cannot read {})", path.display());
    }
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim();
    if text.is_empty() {
        "(nothing)".to_owned()
    } else {
        text.replace("\r\n", "\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> GuestSpec {
        GuestSpec::new(GuestImages {
            kernel: "/g/vmlinuz".into(),
            initrd: "/g/initrd.img".into(),
        })
        .disk(DiskSpec::new("/d/a,b.raw", ImageFormat::Raw, "disk0"))
        .disk(DiskSpec::new("/d/b.qcow2", ImageFormat::Qcow2, "disk1"))
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn builds_the_command_line() -> Result<(), GuestError> {
        let args = spec().qemu_args(Path::new("/r/qmp.sock"), Path::new("/r/serial.log"))?;
        assert_eq!(
            joined(&args),
            "-accel tcg -M pc -m 256 -nodefaults -display none -no-reboot \
             -kernel /g/vmlinuz -initrd /g/initrd.img \
             -append console=ttyS0 quiet panic=-1 ferry.rate=50 \
             -serial file:/r/serial.log -qmp unix:/r/qmp.sock,server=on,wait=off \
             -blockdev driver=file,filename=/d/a,,b.raw,node-name=disk0-file \
             -blockdev driver=raw,file=disk0-file,node-name=disk0 \
             -device virtio-blk-pci,drive=disk0,id=disk0-dev,serial=disk0 \
             -blockdev driver=file,filename=/d/b.qcow2,node-name=disk1-file \
             -blockdev driver=qcow2,file=disk1-file,node-name=disk1 \
             -device virtio-blk-pci,drive=disk1,id=disk1-dev,serial=disk1"
        );
        Ok(())
    }

    #[test]
    fn kernel_cmdline_carries_the_workload_parameters() {
        let mut spec = spec();
        spec.rate = 0;
        spec.fill_mib = 8;
        spec.extra_kernel_args.push("loglevel=7".into());
        assert_eq!(
            spec.kernel_cmdline(),
            "console=ttyS0 quiet panic=-1 ferry.rate=0 ferry.fill=8 loglevel=7"
        );
    }

    #[test]
    fn rejects_disk_ids_qemu_or_virtio_cannot_carry() {
        for (id, reason) in [
            ("", "1 to 20"),
            ("abcdefghijklmnopqrstu", "1 to 20"),
            ("0disk", "start with a letter"),
            ("disk,0", "only letters"),
            ("disk.0", "only letters"),
        ] {
            let spec =
                GuestSpec::new(spec().images).disk(DiskSpec::new("/d/x", ImageFormat::Raw, id));
            let err = spec
                .qemu_args(Path::new("/q"), Path::new("/s"))
                .expect_err(id);
            assert!(err.to_string().contains(reason), "{id:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_missing_qemu_binary_says_what_to_install() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let err = launch(dir.path(), &spec(), Path::new("/nonexistent/qemu"))
            .await
            .expect_err("no such binary");
        assert!(
            err.to_string().contains("is qemu-system-x86 installed"),
            "{err}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn waiting_on_a_log_sees_acks_and_errors() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("serial.log");
        std::fs::write(
            &log,
            "ferry-ack vda 1\nferry-ack vda 2\nferry-ack vdb 1\nferry-ack vda 3",
        )?;
        let acks = wait_for_acks(&log, "vda", 2, Duration::from_secs(5))
            .await
            .expect("two acks are there");
        assert_eq!(acks.seqs("vda"), &[1, 2]);

        let err = wait_for_acks(&log, "vda", 3, Duration::from_millis(200))
            .await
            .expect_err("3 is unterminated");
        assert!(
            err.to_string()
                .starts_with("disk vda: 2 of 3 acknowledgements after"),
            "{err}"
        );

        std::fs::write(
            &log,
            "ferry-ack vdb 1\nferry-error vdb cannot write record 2: I/O error\n",
        )?;
        let err = wait_for_acks(&log, "vdb", 5, Duration::from_secs(5))
            .await
            .expect_err("workload failed");
        assert_eq!(
            err.to_string(),
            "the guest's workload stopped on disk vdb: cannot write record 2: I/O error"
        );
        Ok(())
    }
}
