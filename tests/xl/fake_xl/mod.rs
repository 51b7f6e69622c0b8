//! A stand-in for Xen's `xl`, for `ferry xl migrate`'s end-to-end test on a host without Xen.
//!
//! What it keeps from Xen, read in `tools/xl/xl_migrate.c`, `tools/xl/xl.h`,
//! `tools/xl/xl_saverestore.c`, `tools/libs/light/libxl_qmp.c` and the two stream specs in
//! `docs/specs/`:
//! - `xl migrate -s CMD -C CFG DOMAIN HOST` runs `sh -c "exec CMD HOST xl [-t] migrate-receive
//!   [-e] [-d] [-p]"` with pipes on the transport's stdin and stdout;
//! - the banners byte for byte (the receiver's banner without NUL, the three later messages with
//!   it, then one status byte);
//! - the xl header (magic, byte order, flags, config length and JSON config with its NUL), the
//!   libxl v2 stream header and records (type, length, zero padding to 8), LIBXC_CONTEXT followed
//!   by an inline libxc v3 stream (image header, domain header, records, END), then
//!   EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT (HVM) and END;
//! - for HVM the sender `stop`s the device model over QMP and saves its state before the last
//!   libxc records; for PV/PVH (`type = "pvh"`) nothing stops it;
//! - the receiver reads the whole stream, END included, and only then starts the device model,
//!   which opens the disks; it unpauses only after "cleared to unpause" (not with `-p`);
//! - disks are qdisk nodes named `<vdev>-<format>`, file locking off; the device model's QMP
//!   socket is `<run dir>/qmp-libxl-<domid>`.
//!
//! What differs, because there is no hypervisor: the "domain" is a whole QEMU VM (the test guest)
//! and the device model is that QEMU. Guest memory therefore travels inside QEMU's own migration
//! stream, saved to a file once the VM is stopped and embedded as EMULATOR_CONTEXT; the libxc
//! stream carries filler pages (a few "live rounds" while the guest runs). A PV stand-in domain
//! carries no memory: its receiver keeps the destination paused (`-p`) and the test checks its
//! disks only.
//!
//! Environment: `FAKE_XL_RUN_DIR` (the run dir, `/var/run/xen` on Xen), `FAKE_XL_QEMU` (the QEMU
//! binary), `FAKE_XL_EVENTS` (a file events are appended to, one JSON object per line).

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry::xl::stream::{self, write as sw};
use serde_json::{json, Value};

const BANNER: &[u8] = b"xl migration receiver ready, send binary domain data.\n";
const READY: &[u8] = b"domain received, ready to unpause\0";
const GO: &[u8] = b"domain is yours, you are cleared to unpause\0";
const REPORT: &[u8] = b"my copy unpause results are as follows\0";

type R<T> = Result<T, String>;

mod receiver;

fn run_dir() -> PathBuf {
    PathBuf::from(std::env::var("FAKE_XL_RUN_DIR").unwrap_or_else(|_| "/var/run/xen".into()))
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Appends one event line for the test to read.
fn event(name: &str, data: Value) {
    let Ok(path) = std::env::var("FAKE_XL_EVENTS") else {
        return;
    };
    let mut line = json!({"event": name, "pid": std::process::id()});
    if let (Some(obj), Value::Object(d)) = (line.as_object_mut(), data) {
        obj.extend(d);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

/// The stand-in's entry point; returns the exit code.
pub fn main(args: Vec<String>) -> i32 {
    // xl's global options come before the subcommand.
    let mut i = 0;
    while i < args.len() && args[i].starts_with('-') {
        i += 1;
    }
    let (cmd, rest) = match args.get(i) {
        Some(c) => (c.as_str(), &args[i + 1..]),
        None => ("", &args[..0]),
    };
    let result = match cmd {
        "create" => create(rest),
        "domid" => domid(rest),
        "migrate" => migrate(rest),
        "migrate-receive" => receiver::receive(rest),
        other => Err(format!("fake xl: unknown command {other:?}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fake xl: {e}");
            1
        }
    }
}

/// A parsed domain config (the xl.cfg subset the stand-in needs).
#[derive(Debug, Clone)]
struct Config {
    name: String,
    hvm: bool,
    dm_args: Vec<String>,
    /// (vdev, format, target)
    disks: Vec<(String, String, String)>,
}

fn quoted_list(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(['\'', '"']) {
        let q = rest.as_bytes()[start] as char;
        let Some(len) = rest[start + 1..].find(q) else {
            break;
        };
        out.push(rest[start + 1..start + 1 + len].to_string());
        rest = &rest[start + 2 + len..];
    }
    out
}

fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let mut found = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if let Some(after) = t.strip_prefix(key) {
            if let Some(v) = after.trim_start().strip_prefix('=') {
                let start = offset + line.len() - v.len();
                let value = &text[start..];
                let end = if value.trim_start().starts_with('[') {
                    value.find(']').map_or(value.len(), |e| e + 1)
                } else {
                    value.find('\n').unwrap_or(value.len())
                };
                found = Some(&value[..end]);
                break;
            }
        }
        offset += line.len();
    }
    found
}

fn parse_cfg(text: &str) -> R<Config> {
    let name = setting(text, "name")
        .map(|v| v.trim().trim_matches('"').to_string())
        .ok_or("config without name")?;
    let hvm = setting(text, "type").is_none_or(|v| v.contains("hvm"));
    let dm_args = setting(text, "device_model_args")
        .map(quoted_list)
        .unwrap_or_default();
    let mut disks = Vec::new();
    for spec in setting(text, "disk").map(quoted_list).unwrap_or_default() {
        let d = ferry::xl::config::parse_disk(&spec).map_err(|e| e.to_string())?;
        disks.push((d.vdev, d.format, d.target));
    }
    Ok(Config {
        name,
        hvm,
        dm_args,
        disks,
    })
}

/// libxl's JSON form of the config (the shape of `libxl_domain_config_to_json`), which is what
/// travels in the xl header.
fn to_json(cfg: &Config) -> Value {
    json!({
        "c_info": {"type": if cfg.hvm { "hvm" } else { "pvh" }, "name": cfg.name},
        "b_info": {"device_model_args": cfg.dm_args},
        "disks": cfg.disks.iter().map(|(vdev, format, target)| json!({
            "pdev_path": target, "vdev": vdev, "format": format, "backend": "qdisk", "readwrite": 1
        })).collect::<Vec<_>>(),
    })
}

fn from_json(v: &Value) -> R<Config> {
    let s = |v: &Value| v.as_str().map(str::to_string);
    let name = s(&v["c_info"]["name"]).ok_or("config JSON without c_info.name")?;
    let hvm = v["c_info"]["type"] == "hvm";
    let dm_args = v["b_info"]["device_model_args"]
        .as_array()
        .map(|a| a.iter().filter_map(s).collect())
        .unwrap_or_default();
    let disks = v["disks"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| Some((s(&d["vdev"])?, s(&d["format"])?, s(&d["pdev_path"])?)))
                .collect()
        })
        .unwrap_or_default();
    Ok(Config {
        name,
        hvm,
        dm_args,
        disks,
    })
}

fn domain_file(name: &str) -> PathBuf {
    run_dir().join("domains").join(format!("{name}.json"))
}

fn qmp_path(domid: u32) -> PathBuf {
    run_dir().join(format!("qmp-libxl-{domid}"))
}

/// Starts the device model for `cfg` (detached, so that it outlives this xl), records the
/// domain, and returns (domid, pid).
fn start_dm(cfg: &Config, extra: &[&str]) -> R<(u32, u32)> {
    let run = run_dir();
    std::fs::create_dir_all(run.join("domains")).map_err(|e| e.to_string())?;
    let domid = (1..1000)
        .find(|d| !qmp_path(*d).exists())
        .ok_or("no free domid")?;
    let qemu = std::env::var("FAKE_XL_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let mut args: Vec<String> = cfg.dm_args.clone();
    args.push("-qmp".into());
    args.push(format!(
        "unix:{},server=on,wait=off",
        qmp_path(domid).display()
    ));
    args.push("-serial".into());
    args.push(format!(
        "file:{}",
        run.join(format!("{}.serial", cfg.name)).display()
    ));
    for (vdev, format, target) in &cfg.disks {
        args.push("-blockdev".into());
        args.push(format!(
            "driver=file,filename={target},node-name={vdev}-file,locking=off"
        ));
        args.push("-blockdev".into());
        args.push(format!(
            "driver={format},file={vdev}-file,node-name={vdev}-{format}"
        ));
        args.push("-device".into());
        args.push(format!(
            "virtio-blk-pci,drive={vdev}-{format},id={vdev}-dev,serial={vdev}"
        ));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let stderr = std::fs::File::create(run.join(format!("{}-{domid}.stderr", cfg.name)))
        .map_err(|e| e.to_string())?;
    let child = std::os::unix::process::CommandExt::process_group(
        Command::new(&qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr),
        0,
    )
    .spawn()
    .map_err(|e| format!("cannot start {qemu}: {e}"))?;
    let pid = child.id();
    let start = Instant::now();
    while !qmp_path(domid).exists() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("the device model did not open its QMP socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let record = json!({"domid": domid, "pid": pid, "config": to_json(cfg)});
    std::fs::write(domain_file(&cfg.name), record.to_string()).map_err(|e| e.to_string())?;
    Ok((domid, pid))
}

fn create(args: &[String]) -> R<i32> {
    let path = args.first().ok_or("usage: create CFG")?;
    let cfg = parse_cfg(&std::fs::read_to_string(path).map_err(|e| e.to_string())?)?;
    let (domid, _) = start_dm(&cfg, &[])?;
    println!("{domid}");
    Ok(0)
}

fn load(name: &str) -> R<Value> {
    let text =
        std::fs::read_to_string(domain_file(name)).map_err(|_| format!("no domain {name}"))?;
    serde_json::from_str(&text).map_err(|e| e.to_string())
}

fn domid(args: &[String]) -> R<i32> {
    let name = args.first().ok_or("usage: domid NAME")?;
    println!("{}", load(name)?["domid"]);
    Ok(0)
}

/// Runs `session` on a fresh QMP connection to a device model, on a small runtime of its own
/// (the stand-in is synchronous).
fn with_qmp<T, F>(domid: u32, session: impl FnOnce(qmp::Qmp) -> F) -> R<T>
where
    F: std::future::Future<Output = R<T>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let q = qmp::Qmp::connect_unix(qmp_path(domid))
            .await
            .map_err(|e| format!("QMP: {e}"))?;
        session(q).await
    })
}

/// One QMP command against a device model.
fn qmp_cmd(domid: u32, cmd: &str, args: Value) -> R<Value> {
    with_qmp(domid, |q| async move {
        q.execute_raw(cmd, args)
            .await
            .map_err(|e| format!("{cmd}: {e}"))
    })
}

/// Runs `cmd` (`stop`, `cont`) and returns the timestamp (µs) of the `event` it causes.
async fn command_then_event(q: &qmp::Qmp, cmd: &str, event: &str) -> R<u64> {
    let mut events = q.events();
    q.execute_raw(cmd, Value::Null)
        .await
        .map_err(|e| format!("{cmd}: {e}"))?;
    let ev = events
        .wait_for(|e| e.name == event, Duration::from_secs(10))
        .await
        .map_err(|e| format!("{event} event: {e}"))?;
    Ok(ev.timestamp.as_micros() as u64)
}

/// `stop` and the STOP event's own timestamp (µs), then QEMU's state saved to `file`.
fn suspend_and_save(domid: u32, file: &Path) -> R<u64> {
    with_qmp(domid, |q| async move {
        let stop = command_then_event(&q, "stop", "STOP").await?;
        let uri = format!("file:{}", file.display());
        q.execute_raw("migrate", json!({"uri": uri}))
            .await
            .map_err(|e| format!("migrate to file: {e}"))?;
        loop {
            let info = q
                .execute_raw("query-migrate", Value::Null)
                .await
                .map_err(|e| e.to_string())?;
            match info["status"].as_str() {
                Some("completed") => break,
                Some("failed") | Some("cancelled") => {
                    return Err(format!("saving the device model failed: {info}"))
                }
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        Ok(stop)
    })
}

fn read_exact(r: &mut impl Read, n: usize, what: &str) -> R<Vec<u8>> {
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)
        .map_err(|e| format!("migration stream: reading {what}: {e}"))?;
    Ok(buf)
}

fn expect(r: &mut impl Read, msg: &[u8], what: &str) -> R<()> {
    let got = read_exact(r, msg.len(), what)?;
    if got != msg {
        return Err(format!(
            "migration stream contained unexpected data instead of {what}"
        ));
    }
    Ok(())
}

/// The sender: `xl migrate [-s CMD] [-C CFG] [-e] [-p] [-D] [-F] [--debug] DOMAIN HOST`.
fn migrate(args: &[String]) -> R<i32> {
    let (mut ssh, mut cfg_path, mut daemonize, mut debug, mut pause) =
        ("ssh".to_string(), None, true, false, false);
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-s" => {
                i += 1;
                ssh = args.get(i).cloned().ok_or("-s needs a value")?;
            }
            "-C" => {
                i += 1;
                cfg_path = args.get(i).cloned();
            }
            "-e" => daemonize = false,
            "-F" => daemonize = false,
            "-p" => pause = true,
            "--debug" => debug = true,
            "-D" | "--live" => {}
            other => pos.push(other.to_string()),
        }
        i += 1;
    }
    let [domain, host] = pos.as_slice() else {
        return Err("usage: migrate [options] DOMAIN HOST".into());
    };
    let record = load(domain)?;
    let domid = record["domid"].as_u64().ok_or("bad domain record")? as u32;
    let cfg = match &cfg_path {
        Some(p) => parse_cfg(&std::fs::read_to_string(p).map_err(|e| e.to_string())?)?,
        None => from_json(&record["config"])?,
    };
    let mut config = to_json(&cfg).to_string().into_bytes();
    config.push(0);
    // main_migrate: the transport command, run by sh.
    let rune = format!(
        "exec {ssh} {host} xl{}{}{}{}",
        if std::io::stderr().is_terminal() {
            " -t"
        } else {
            ""
        },
        " migrate-receive",
        if daemonize { "" } else { " -e" },
        if debug { " -d" } else { "" },
    ) + if pause { " -p" } else { "" };
    let mut child = Command::new("sh")
        .args(["-c", &rune])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("failed to exec sh: {e}"))?;
    let (Some(mut send), Some(mut recv)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("no pipes".into());
    };
    let result = send_domain(domid, &cfg, &config, &mut send, &mut recv, child.id());
    let ready = match result {
        Ok(()) => expect(&mut recv, READY, "ready message"),
        Err(e) => Err(e),
    };
    if let Err(e) = ready {
        // failed_resume: close the transport, resume the domain here.
        drop(send);
        eprintln!("fake xl: {e}");
        eprintln!("Migration failed, resuming at sender.");
        let _ = qmp_cmd(domid, "cont", Value::Null);
        let _ = child.wait();
        event("sender_failed", json!({"error": e, "resumed": true}));
        return Ok(1);
    }
    eprintln!("migration sender: Giving target permission to start.");
    if send.write_all(GO).and_then(|()| send.flush()).is_err() {
        eprintln!("** Migration failed during final handshake **");
        return Ok(1);
    }
    event("sent_go", json!({"at_us": now_us()}));
    let status = expect(&mut recv, REPORT, "success/failure report message")
        .and_then(|()| read_exact(&mut recv, 1, "success/failure status"));
    let code = match status {
        Ok(b) => b[0],
        Err(e) => {
            eprintln!("fake xl: {e}\n** Migration failed during final handshake **");
            return Ok(1);
        }
    };
    if code != 0 {
        eprintln!("migration sender: Target reports startup failure (status code {code}).");
        let _ = expect(&mut recv, GO, "permission for sender to resume");
        let _ = qmp_cmd(domid, "cont", Value::Null);
        event("sender_resumed", json!({}));
        return Ok(1);
    }
    // Target reports successful startup: destroy the domain here.
    let _ = qmp_cmd(domid, "quit", Value::Null);
    let _ = std::fs::remove_file(domain_file(&cfg.name));
    drop(send);
    let _ = child.wait();
    eprintln!("Migration successful.");
    event("sender_done", json!({}));
    Ok(0)
}

fn send_domain(
    domid: u32,
    cfg: &Config,
    config: &[u8],
    send: &mut impl Write,
    recv: &mut impl Read,
    transport: u32,
) -> R<()> {
    // Test hook: kill the transport (the relay) after this many live rounds.
    let kill_after: Option<usize> = std::env::var("FAKE_XL_KILL_TRANSPORT")
        .ok()
        .and_then(|v| v.parse().ok());
    let w = |send: &mut dyn Write, bytes: &[u8]| {
        send.write_all(bytes)
            .map_err(|e| format!("migration stream: write: {e}"))
    };
    expect(recv, BANNER, "banner")?;
    w(send, &sw::xl_header(config))?;
    w(send, &sw::libxl_header())?;
    w(send, &sw::record(stream::REC_LIBXC_CONTEXT, &[]))?;
    w(send, &sw::libxc_headers())?;
    // Live rounds while the guest runs: filler PAGE_DATA records.
    let page = vec![0x5au8; 64 * 1024 + 12];
    for round in 1..=4 {
        for _ in 0..8 {
            w(send, &sw::record(1, &page))?;
        }
        std::thread::sleep(Duration::from_millis(100));
        if kill_after == Some(round) {
            event("transport_killed", json!({"pid": transport}));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(transport as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let state = run_dir().join(format!("{}-{domid}.save", cfg.name));
    let mut emulator = None;
    if cfg.hvm {
        // libxl__domain_suspend_device_model → libxl__qmp_suspend_save: stop, then save.
        let stop = suspend_and_save(domid, &state)?;
        event("source_stopped", json!({"stop_us": stop}));
        let bytes = std::fs::read(&state).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(&state);
        emulator = Some(bytes);
    } else {
        event("source_not_stopped", json!({"at_us": now_us()}));
    }
    // The last dirty pages, the libxc END, then the emulator records and END.
    w(send, &sw::record(1, &page))?;
    w(send, &sw::record(stream::REC_END, &[]))?;
    // libxl_stream_write.c writes the emulator records for HVM only.
    if let Some(bytes) = emulator {
        let xenstore = sw::emulator_body(b"physmap\0\0");
        w(
            send,
            &sw::record(stream::REC_EMULATOR_XENSTORE_DATA, &xenstore),
        )?;
        let context = sw::emulator_body(&bytes);
        w(send, &sw::record(stream::REC_EMULATOR_CONTEXT, &context))?;
    }
    w(send, &sw::record(stream::REC_END, &[]))?;
    send.flush().map_err(|e| e.to_string())?;
    event("sender_sent_end", json!({"at_us": now_us()}));
    Ok(())
}

/// A running stand-in domain's QEMU, for tests: (domid, pid), if the run dir has it.
pub fn domain(run: &Path, name: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(run.join("domains").join(format!("{name}.json"))).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some((v["domid"].as_u64()? as u32, v["pid"].as_u64()? as u32))
}
