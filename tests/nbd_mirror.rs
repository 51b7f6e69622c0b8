//! A real QEMU mirrors a sparse disk into the server, the way a migration does: `-M none`, a
//! `blockdev` nbd node with `discard: unmap` and `detect-zeroes: unmap`, `blockdev-mirror`
//! sync=full, BLOCK_JOB_READY, then `block-job-cancel` (complete without pivot). The copy must
//! be byte-identical and no fatter than the source.
//!
//! QMP is driven by a tiny JSON-lines helper here, on purpose independent of the `qmp` crate.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::nbd::ServerConfig;
use ferry_harness::files::*;
use ferry_harness::nbd::*;
use serde_json::{json, Value};

/// QEMU, killed when dropped.
struct Qemu {
    child: Child,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal QMP client: one command at a time, events kept aside.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("QEMU's QMP socket {} never appeared: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let writer = stream.try_clone().expect("clone socket");
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.line();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}));
        qmp
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QEMU closed its QMP socket");
        serde_json::from_str(&line).expect("QMP sends JSON")
    }

    fn execute(&mut self, command: &str, arguments: Value) -> Value {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").expect("write to QMP");
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(ret) = v.get("return") {
                return ret.clone();
            } else {
                panic!("{command} failed: {v}");
            }
        }
    }

    fn wait_event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let v = self.line();
            if v["event"] == name {
                return v;
            }
            if v["event"] == "BLOCK_JOB_ERROR" {
                panic!("mirror failed: {v}");
            }
            self.events.push(v);
        }
    }
}

#[test]
fn qemu_mirrors_a_sparse_disk_exactly() {
    const SIZE: u64 = 2 << 30;
    let ts = TestServer::start(ServerConfig::default());
    let dir = ts.dir.path().to_path_buf();
    let src = dir.join("src.raw");
    sparse_file(&src, SIZE);
    random_chunks(&src, SIZE, 192, 7);
    let export = format!("vda-{}", rand::random::<u32>());
    let dst = ts.export_new(&export, SIZE, false);

    let qmp_path = dir.join("qmp.sock");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .arg("-blockdev")
        .arg(format!(
            "driver=raw,node-name=src,file.driver=file,file.filename={}",
            src.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-system-x86_64 (scripts/setup installs it)");
    let _qemu = Qemu { child };
    let mut qmp = Qmp::connect(&qmp_path);

    let addr = ts.addr();
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": "dst",
            "server": { "type": "inet", "host": addr.ip().to_string(), "port": addr.port().to_string() },
            "export": export,
            "discard": "unmap",
            "detect-zeroes": "unmap",
        }),
    );
    let started = Instant::now();
    qmp.execute(
        "blockdev-mirror",
        json!({ "job-id": "mirror-vda", "device": "src", "target": "dst", "sync": "full" }),
    );
    qmp.wait_event("BLOCK_JOB_READY");
    let to_ready = started.elapsed();
    qmp.execute("block-job-cancel", json!({ "device": "mirror-vda" }));
    qmp.wait_event("BLOCK_JOB_COMPLETED");
    qmp.execute("blockdev-del", json!({ "node-name": "dst" }));
    qmp.execute("quit", json!({}));
    let _dir = ts.shutdown();
    assert_same_bytes(&src, &dst);
    let (s, d) = (allocated(&src), allocated(&dst));
    let diff = s.abs_diff(d);
    assert!(
        diff * 100 <= s,
        "allocation differs by more than 1%: source {s}, destination {d}"
    );
    eprintln!("mirrored 192 MiB of data in a 2 GiB disk in {to_ready:?}; allocation {s} -> {d}");
}
