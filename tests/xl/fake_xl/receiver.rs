//! The stand-in's receiving side, `xl migrate-receive` (see the parent module).

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use ferry::xl::stream;
use serde_json::{json, Value};

use super::{
    command_then_event, domain_file, event, expect, from_json, now_us, qmp_cmd, qmp_path,
    read_exact, run_dir, start_dm, with_qmp, BANNER, GO, R, READY, REPORT,
};

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn skip(r: &mut impl Read, len: u32) -> R<Vec<u8>> {
    let padded = (len as usize).div_ceil(8) * 8;
    let mut body = read_exact(r, padded, "record body")?;
    body.truncate(len as usize);
    Ok(body)
}

/// The receiver: `xl [-t] migrate-receive [-e] [-d] [-p]`, stream on stdin, answers on stdout.
pub fn receive(args: &[String]) -> R<i32> {
    let pause = args.iter().any(|a| a == "-p");
    let mut out = std::io::stdout().lock();
    let mut inp = std::io::stdin().lock();
    out.write_all(BANNER)
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    // create_domain → libxl_domain_create_restore: the xl header, then the libxl stream to END.
    let head = read_exact(&mut inp, 48, "header")?;
    if &head[..32] != stream::XL_MAGIC {
        return Err("not an xl save stream".into());
    }
    let optional = read_exact(&mut inp, le32(&head[44..48]) as usize, "config")?;
    let len = le32(&optional[..4]) as usize;
    let json_text = optional.get(4..4 + len).ok_or("short config")?;
    let json_text = json_text.strip_suffix(b"\0").unwrap_or(json_text);
    let cfg = from_json(&serde_json::from_slice(json_text).map_err(|e| e.to_string())?)?;
    let lh = read_exact(&mut inp, 16, "libxl header")?;
    if &lh[..8] != stream::LIBXL_IDENT {
        return Err("no libxl header".into());
    }
    let mut state = None;
    // When the record before END was read completely: the gap to END is what the transport
    // adds to the END record alone (ferry holds END for the final disk sync).
    let mut last_record_done = now_us();
    loop {
        let h = read_exact(&mut inp, 8, "record header")?;
        let (ty, len) = (le32(&h[..4]), le32(&h[4..]));
        match ty {
            stream::REC_END => {
                let at = now_us();
                event(
                    "receiver_end_read",
                    json!({"at_us": at, "gap_us": at.saturating_sub(last_record_done)}),
                );
                break;
            }
            stream::REC_LIBXC_CONTEXT => {
                read_exact(&mut inp, 24 + 16, "libxc headers")?;
                // Test hooks: die here, or hold the stream a while.
                match std::env::var("FAKE_XL_DIE").as_deref() {
                    Ok("records") => {
                        event("receiver_died", json!({}));
                        std::process::exit(1);
                    }
                    Ok("hold") => std::thread::sleep(Duration::from_secs(3)),
                    _ => {}
                }
                loop {
                    let h = read_exact(&mut inp, 8, "libxc record header")?;
                    let (ty, len) = (le32(&h[..4]), le32(&h[4..]));
                    skip(&mut inp, len)?;
                    if ty == 0 {
                        break;
                    }
                }
            }
            stream::REC_EMULATOR_CONTEXT => {
                let body = skip(&mut inp, len)?;
                state = Some(body[8..].to_vec());
            }
            _ => {
                skip(&mut inp, len)?;
            }
        }
        last_record_done = now_us();
    }
    // END read: only now does the device model start, and open the disks.
    let mut extra = vec!["-S"];
    let state_file = run_dir().join(format!("{}.incoming", cfg.name));
    if state.is_some() {
        extra.extend(["-incoming", "defer"]);
    }
    std::fs::create_dir_all(run_dir()).map_err(|e| e.to_string())?;
    event("dm_starting", json!({"at_us": now_us()}));
    let (domid, pid) = start_dm(&cfg, &extra)?;
    let destroy = |why: &str| {
        eprintln!("migration target: {why}; destroying our copy");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = std::fs::remove_file(domain_file(&cfg.name));
        let _ = std::fs::remove_file(qmp_path(domid));
    };
    if let Some(bytes) = state {
        std::fs::write(&state_file, &bytes).map_err(|e| e.to_string())?;
        let loaded = qmp_cmd(
            domid,
            "migrate-incoming",
            json!({"uri": format!("file:{}", state_file.display())}),
        )
        .and_then(|_| wait_incoming(domid));
        let _ = std::fs::remove_file(&state_file);
        if let Err(e) = loaded {
            destroy(&e);
            return Err(e);
        }
    }
    event("dm_started", json!({"domid": domid, "pid": pid}));
    if out.write_all(READY).and_then(|()| out.flush()).is_err() {
        destroy("the sender is gone");
        return Ok(1);
    }
    if let Err(e) = expect(&mut inp, GO, "GO message") {
        // perhaps_destroy_notify_rc: no permission, so the copy here goes.
        destroy(&e);
        let _ = out.write_all(REPORT).and_then(|()| out.write_all(&[1]));
        return Ok(0);
    }
    let mut rc = 0u8;
    if !pause {
        let resumed = resume(domid);
        match resumed {
            Ok(at) => event("dm_resumed", json!({"resume_us": at})),
            Err(e) => {
                eprintln!("migration target: {e}");
                rc = 3;
            }
        }
    }
    out.write_all(REPORT)
        .and_then(|()| out.write_all(&[rc]))
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    if rc != 0 {
        destroy("startup failed");
        let _ = out.write_all(GO);
    }
    Ok(0)
}

fn wait_incoming(domid: u32) -> R<()> {
    let start = Instant::now();
    loop {
        let info = qmp_cmd(domid, "query-migrate", Value::Null)?;
        match info["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") => {
                return Err(format!("loading the device model's state failed: {info}"))
            }
            _ if start.elapsed() > Duration::from_secs(60) => {
                return Err("loading the device model's state timed out".into())
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// `cont`, and the RESUME event's timestamp (µs).
fn resume(domid: u32) -> R<u64> {
    with_qmp(domid, |q| async move {
        command_then_event(&q, "cont", "RESUME").await
    })
}
