//! The NBD servers under comparison, each serving one raw destination file as export `vda` on
//! 127.0.0.1, in plaintext or with TLS required, and the CPU time their process used.
//!
//! TLS rows use one migration's credentials made by ferry the way the agent makes them (a CA, a
//! server certificate for `destination.ferry.invalid`, a client certificate), in QEMU's
//! `tls-creds-x509` layout, which qemu-nbd, QEMU and nbdkit all read; every server requires and
//! checks the client certificate, as the agent's does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

/// The export name every server uses.
pub const EXPORT: &str = "vda";

/// An NBD server implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// `ferry nbd-serve`.
    Ferry,
    /// `qemu-nbd` (QEMU's standalone server), writeback cache, thread pool AIO.
    QemuNbd,
    /// `qemu-nbd` bypassing the page cache (`--cache=none --aio=native`), as ferry does for its
    /// bulk writes: the fair comparison for ferry's `O_DIRECT` path.
    QemuNbdDirect,
    /// `nbdkit file`.
    Nbdkit,
    /// QEMU's built-in server: `nbd-server-start` + `block-export-add` in a `-M none` QEMU.
    Qemu,
}

impl Server {
    /// Every server, ferry first.
    pub const ALL: [Server; 5] = [
        Server::Ferry,
        Server::QemuNbd,
        Server::QemuNbdDirect,
        Server::Nbdkit,
        Server::Qemu,
    ];

    /// The row key.
    pub fn name(self) -> &'static str {
        match self {
            Server::Ferry => "ferry",
            Server::QemuNbd => "qemu-nbd",
            Server::QemuNbdDirect => "qemu-nbd-direct",
            Server::Nbdkit => "nbdkit",
            Server::Qemu => "qemu",
        }
    }
}

/// A mirror row: a server, in plaintext or with TLS required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub server: Server,
    pub tls: bool,
}

impl Target {
    /// Every server in plaintext, ferry first.
    pub fn plain() -> Vec<Target> {
        Server::ALL
            .iter()
            .map(|&server| Target { server, tls: false })
            .collect()
    }

    /// Every server in plaintext, then every server with TLS.
    pub fn plain_and_tls() -> Vec<Target> {
        let tls = Server::ALL
            .iter()
            .map(|&server| Target { server, tls: true });
        Target::plain().into_iter().chain(tls).collect()
    }

    /// The row key: the server's name, `-tls` appended for TLS.
    pub fn name(self) -> String {
        if self.tls {
            format!("{}-tls", self.server.name())
        } else {
            self.server.name().to_string()
        }
    }
}

/// Where the TLS rows' credentials are: QEMU's server-endpoint and client-endpoint directories.
#[derive(Debug, Clone)]
pub struct TlsDirs {
    pub server: PathBuf,
    pub client: PathBuf,
}

impl TlsDirs {
    /// The credentials under `dir/tls`, made on first use.
    pub fn ensure(dir: &Path) -> Result<TlsDirs> {
        let dirs = TlsDirs {
            server: dir.join("tls").join("server"),
            client: dir.join("tls").join("client"),
        };
        if !dirs.server.exists() {
            std::fs::create_dir_all(dir.join("tls"))?;
            let creds = ferry::tls::migration::MigrationCredentials::generate()
                .context("generate TLS credentials")?;
            creds
                .write_qemu_server_dir(&dirs.server)
                .context("write the server's TLS files")?;
            creds
                .client_bundle()
                .write_qemu_dir(&dirs.client)
                .context("write the client's TLS files")?;
        }
        Ok(dirs)
    }

    fn server_file(&self, name: &str) -> Result<String> {
        Ok(self
            .server
            .join(name)
            .to_str()
            .context("paths must be UTF-8")?
            .to_string())
    }

    /// The client credentials as `ferry migrate` holds them (for its relay, `ferry::tunnel`).
    pub fn client_bundle(&self) -> Result<ferry::tls::migration::ClientBundle> {
        use ferry::tls::migration::files;
        let read = |name: &str| {
            std::fs::read_to_string(self.client.join(name))
                .with_context(|| format!("read {}", self.client.join(name).display()))
        };
        Ok(ferry::tls::migration::ClientBundle {
            ca_cert: read(files::CA_CERT)?,
            client_cert: read(files::CLIENT_CERT)?,
            client_key: read(files::CLIENT_KEY)?,
            hostname: ferry::tls::migration::TLS_HOSTNAME.to_string(),
        })
    }

    /// A `tls-creds-x509` object with id `tls0` for `endpoint` (the server verifies clients).
    pub fn qemu_object(&self, endpoint: &str) -> Result<String> {
        let (dir, verify) = match endpoint {
            "server" => (&self.server, ",verify-peer=on"),
            _ => (&self.client, ""),
        };
        let dir = dir.to_str().context("paths must be UTF-8")?;
        Ok(format!(
            "tls-creds-x509,id=tls0,dir={dir},endpoint={endpoint}{verify}"
        ))
    }
}

/// How to run ferry's server.
#[derive(Debug, Clone)]
pub struct FerryCmd {
    /// The `ferry` binary.
    pub bin: PathBuf,
    /// Run it under `perf record -g` writing this file (its CPU figures are then not valid:
    /// /proc shows perf's process, not ferry's).
    pub perf: Option<PathBuf>,
}

/// A running server; killed on drop.
pub struct Running {
    child: Child,
    /// Kept alive for the built-in QEMU server (its QMP connection).
    qmp: Option<qmp::Qmp>,
    /// The TCP port it listens on.
    pub port: u16,
}

/// A free TCP port on 127.0.0.1 (bound and released: a race other tools here do not run).
/// A QEMU with no machine (`-M none`), only block nodes and a QMP socket at `sock`.
pub fn bare_qemu(sock: &Path) -> Command {
    let mut c = Command::new(ferry_testkit::DEFAULT_QEMU);
    c.args([
        "-M",
        "none",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
    ])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", sock.display()));
    c
}

pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Starts `target` exporting `file` and returns once it accepts connections. TLS targets use
/// the credentials in `tls`.
pub async fn start(
    target: Target,
    tls: Option<&TlsDirs>,
    ferry: &FerryCmd,
    file: &Path,
    dir: &Path,
) -> Result<Running> {
    let Target { server, .. } = target;
    let tls = match (target.tls, tls) {
        (true, Some(tls)) => Some(tls),
        (true, None) => bail!("{} needs TLS credentials", target.name()),
        (false, _) => None,
    };
    let port = free_port()?;
    let path = file.to_str().context("paths must be UTF-8")?;
    let mut qmp_socket = None;
    let mut cmd = match server {
        Server::Ferry => {
            let mut c = match &ferry.perf {
                Some(out) => {
                    let mut c = Command::new("perf");
                    c.args(["record", "-q", "-g", "-F", "999", "-o"])
                        .arg(out)
                        .arg("--")
                        .arg(&ferry.bin);
                    c
                }
                None => Command::new(&ferry.bin),
            };
            c.args(["nbd-serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--export", &format!("{EXPORT}={path}")]);
            if let Some(tls) = tls {
                c.args(["--tls-cert", &tls.server_file("server-cert.pem")?])
                    .args(["--tls-key", &tls.server_file("server-key.pem")?])
                    .args(["--tls-ca", &tls.server_file("ca-cert.pem")?]);
            }
            c
        }
        Server::QemuNbd | Server::QemuNbdDirect => {
            let cache: &[&str] = if server == Server::QemuNbd {
                &["--cache=writeback", "--aio=threads"]
            } else {
                &["--cache=none", "--aio=native"]
            };
            let mut c = Command::new("qemu-nbd");
            c.args(["-f", "raw", "-x", EXPORT, "-b", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(cache)
                .args(["--discard=unmap", "--detect-zeroes=unmap"]);
            if let Some(tls) = tls {
                c.args(["--object", &tls.qemu_object("server")?])
                    .args(["--tls-creds", "tls0"]);
            }
            c.arg(path);
            c
        }
        Server::Nbdkit => {
            let mut c = Command::new("nbdkit");
            c.args(["-f", "-i", "127.0.0.1", "-p"])
                .arg(port.to_string())
                .args(["-e", EXPORT]);
            if let Some(tls) = tls {
                let dir = tls.server.to_str().context("paths must be UTF-8")?;
                c.arg("--tls=require")
                    .arg(format!("--tls-certificates={dir}"))
                    .arg("--tls-verify-peer");
            }
            c.args(["file", path]);
            c
        }
        Server::Qemu => {
            let sock = dir.join("server-qmp.sock");
            let _ = std::fs::remove_file(&sock);
            let mut c = bare_qemu(&sock);
            c.arg("-blockdev").arg(format!(
                "driver=raw,node-name={EXPORT},discard=unmap,detect-zeroes=unmap,\
                     file.driver=file,file.filename={path},file.discard=unmap"
            ));
            if let Some(tls) = tls {
                c.arg("-object").arg(tls.qemu_object("server")?);
            }
            qmp_socket = Some(sock);
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", target.name()))?;
    let mut running = Running {
        child,
        qmp: None,
        port,
    };
    if let Some(sock) = qmp_socket {
        let qmp = connect_qmp(&sock).await?;
        let mut args = json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}});
        if tls.is_some() {
            args["tls-creds"] = json!("tls0");
        }
        qmp.execute_raw("nbd-server-start", args).await?;
        qmp.execute_raw(
            "block-export-add",
            json!({"type": "nbd", "id": "exp0", "node-name": EXPORT, "name": EXPORT, "writable": true}),
        )
        .await?;
        running.qmp = Some(qmp);
    }
    wait_listening(port, &mut running.child, target).await?;
    Ok(running)
}

/// Connects to a QMP socket QEMU is about to create.
pub async fn connect_qmp(sock: &PathBuf) -> Result<qmp::Qmp> {
    let started = Instant::now();
    loop {
        match qmp::Qmp::connect_unix(sock).await {
            Ok(q) => return Ok(q),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                return Err(e).with_context(|| format!("QMP {}", sock.display()))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn wait_listening(port: u16, child: &mut Child, target: Target) -> Result<()> {
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{} exited ({status}) before listening", target.name());
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("{} did not listen on port {port} in 10 s", target.name());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Running {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds (user + system, all threads) the server has used so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }

    /// Stops the server cleanly (QMP `quit` or SIGTERM) so it flushes, and waits for it.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(qmp) = self.qmp.take() {
            let _ = qmp.execute_raw("quit", serde_json::Value::Null).await;
        } else {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let started = Instant::now();
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("server {} did not exit within 30 s", self.child.id());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of a process (all its threads) from `/proc/PID/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        Ok(fields.get(i).context("short /proc stat")?.parse::<u64>()? as f64)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    // After ')' the state is field 0; utime and stime are the 12th and 13th.
    Ok((tick(11)? + tick(12)?) / hz)
}
