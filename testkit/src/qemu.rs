//! Real QEMUs for tests: which ones this machine has, and one started on temporary QMP sockets,
//! killed when dropped.
//!
//! QEMU 7.2 is tested when `scripts/setup` has unpacked it. Without it the 7.2 tests are skipped
//! with a note on stderr, unless `FERRY_REQUIRE_QEMU_7_2=1` (as `scripts/test` sets): then its
//! absence is a failure, so that a CI run never passes while testing less than it says.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where `scripts/setup` unpacks Debian 12's QEMU 7.2, with a wrapper that sets its module and
/// firmware paths.
pub const QEMU_7_2: &str = "/opt/ferry/qemu-7.2/qemu-system-x86_64";

/// A QEMU binary to test against.
#[derive(Clone, Debug)]
pub struct QemuBinary {
    /// For messages: "system" or "7.2".
    pub name: &'static str,
    /// The program to run.
    pub program: PathBuf,
}

/// QEMU 7.2 if it is installed; `None` (said on stderr) if not, or a panic naming what to do
/// when `FERRY_REQUIRE_QEMU_7_2` is set.
pub fn qemu_7_2() -> Option<PathBuf> {
    let path = PathBuf::from(QEMU_7_2);
    if path.exists() {
        return Some(path);
    }
    if std::env::var_os("FERRY_REQUIRE_QEMU_7_2").is_some_and(|v| v != "0") {
        panic!(
            "QEMU 7.2 is required (FERRY_REQUIRE_QEMU_7_2) but {QEMU_7_2} is missing: run scripts/setup"
        );
    }
    eprintln!("note: QEMU 7.2 skipped: {QEMU_7_2} is not installed (scripts/setup installs it)");
    None
}

/// Every QEMU to test against: the system's (10.x, from PATH) always, 7.2 when `scripts/setup`
/// has unpacked it; says on stderr when 7.2 is skipped.
pub fn available_qemus() -> Vec<QemuBinary> {
    let mut all = vec![QemuBinary {
        name: "system",
        program: PathBuf::from("qemu-system-x86_64"),
    }];
    if let Some(program) = qemu_7_2() {
        all.push(QemuBinary {
            name: "7.2",
            program,
        });
    }
    all
}

/// A running `qemu-system-x86_64 -M none` with `monitors` QMP unix sockets, killed on drop.
pub struct TestQemu {
    /// The binary it runs.
    pub binary: QemuBinary,
    /// One socket per `-qmp` option: QEMU serves one client per socket.
    pub sockets: Vec<PathBuf>,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TestQemu {
    /// Starts QEMU with no machine (`-M none`) and TCG; returns once every socket exists.
    pub fn start(binary: &QemuBinary, monitors: usize) -> TestQemu {
        let mut qemu = Self::spawn(binary, monitors);
        qemu.wait_for_sockets(Duration::from_secs(10));
        qemu.wait_for_monitors(Duration::from_secs(60));
        qemu
    }

    /// Like [`start`](Self::start) but returns at once, before QEMU created its sockets.
    pub fn spawn(binary: &QemuBinary, monitors: usize) -> TestQemu {
        let dir = tempfile::tempdir().expect("temporary directory for QMP sockets");
        let sockets: Vec<PathBuf> = (0..monitors)
            .map(|i| dir.path().join(format!("qmp{i}.sock")))
            .collect();
        let mut cmd = Command::new(&binary.program);
        cmd.args([
            "-M",
            "none",
            "-accel",
            "tcg",
            "-display",
            "none",
            "-nodefaults",
        ]);
        for socket in &sockets {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", socket.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} ({e}): run scripts/setup",
                binary.program.display()
            )
        });
        TestQemu {
            binary: binary.clone(),
            sockets,
            child,
            _dir: dir,
        }
    }

    fn wait_for_sockets(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        // Listening, not just created: QEMU binds (the file appears) a moment before it listens,
        // and a connect in between is refused.
        while !self.sockets.iter().all(|s| listening(s)) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "QEMU {} exited before creating its QMP sockets: {status}",
                    self.binary.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "QEMU {} did not create its QMP sockets within {within:?}",
                self.binary.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every monitor answers a command. A monitor greets from its own thread as
    /// soon as it listens, but commands wait for QEMU's main loop, which may still be starting:
    /// on a loaded two-core machine a test's first command once got no answer within the QMP
    /// client's 10 s (CI21, tests/cli_qmp.rs).
    fn wait_for_monitors(&mut self, within: Duration) {
        use std::io::{BufRead, BufReader, Write};
        let deadline = Instant::now() + within;
        for socket in &self.sockets {
            let answered = (|| -> std::io::Result<bool> {
                let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
                stream
                    .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))?;
                let mut lines = BufReader::new(stream.try_clone()?);
                let mut line = String::new();
                lines.read_line(&mut line)?;
                stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
                loop {
                    line.clear();
                    if lines.read_line(&mut line)? == 0 {
                        return Ok(false);
                    }
                    if line.contains("\"return\"") || line.contains("\"error\"") {
                        return Ok(true);
                    }
                }
            })();
            assert!(
                matches!(answered, Ok(true)),
                "QEMU {}'s monitor {} did not answer qmp_capabilities within {within:?}: {answered:?}",
                self.binary.name,
                socket.display()
            );
        }
    }

    /// The first (usually only) QMP socket.
    pub fn socket(&self) -> &Path {
        &self.sockets[0]
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes QEMU (SIGSTOP): it stops answering, so calls stay pending.
    pub fn freeze(&self) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid fits i32"));
        kill(pid, Signal::SIGSTOP).expect("SIGSTOP QEMU");
    }

    /// SIGKILL and reap: what a crash looks like to its QMP clients.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for QEMU to exit by itself (after `quit`), at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Drop for TestQemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a unix socket at `path` is listening (its `/proc/net/unix` entry has the
/// accepting-connections flag), found without connecting to it: a QMP monitor takes one client.
fn listening(path: &Path) -> bool {
    const ACCEPTING: &str = "00010000";
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return path.exists();
    };
    let path = path.to_string_lossy();
    table.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8 && fields[3] == ACCEPTING && fields[7] == path
    })
}
