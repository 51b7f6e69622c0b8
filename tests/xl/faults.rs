//! Faults before "cleared to unpause": each must leave the domain running on the source, with
//! nothing of the migration left on either host. And bad input, refused before anything starts.

use std::process::Stdio;
use std::time::Duration;

use super::{event, fake_xl, walk, wrapper, World};

/// The relay (xl's transport) is killed while the stream flows: xl resumes the domain, ferry
/// settles everything back.
pub fn fault_relay_killed(w: &mut World) {
    w.clear_events();
    // The sender kills its transport after its second live round.
    let events = w.tmp.path().join("events.log");
    wrapper(&w.src_xl, &w.src_run, &events, "FAKE_XL_KILL_TRANSPORT=2");
    let (code, lines, stderr) = w.ferry_xl_migrate();
    w.wrappers("");
    assert_eq!(code, 1, "ferry xl migrate fails: {lines:?} {stderr}");
    let failed = lines.last().expect("a failed line");
    assert_eq!(failed["event"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("xl's stream ended before its END"),
        "the error says the stream broke: {failed}"
    );
    assert_eq!(failed["source_running"], true, "{failed}");
    w.assert_back_on_source("relay killed");
}

/// `xl migrate-receive` dies mid-stream on the destination.
pub fn fault_receiver_dies(w: &mut World) {
    w.clear_events();
    w.wrappers("FAKE_XL_DIE=records");
    let (code, lines, stderr) = w.ferry_xl_migrate();
    w.wrappers("");
    assert_eq!(code, 1, "ferry xl migrate fails: {lines:?} {stderr}");
    let failed = lines.last().expect("a failed line");
    assert_eq!(failed["source_running"], true, "{failed}");
    let events = w.events();
    assert!(
        event(&events, "sender_failed").is_some_and(|e| e["resumed"] == true),
        "xl resumed the domain at the sender: {events:?}"
    );
    w.assert_back_on_source("receiver died");
}

/// The agent dies mid-stream (the link is cut): the domain stays; a restarted agent clears
/// what the dead one left.
pub fn fault_agent_killed(w: &mut World) {
    w.clear_events();
    // The receiver holds the stream a while so that the agent dies during it.
    w.wrappers("FAKE_XL_DIE=hold");
    let addr = w.agent_addr();
    let pid = w.agent.as_ref().map(|a| a.child.id()).expect("agent pid");
    let killer = std::thread::spawn(move || {
        // Once the receiver runs (it holds the stream 3 s), kill the agent.
        World::wait_receiver(Duration::from_secs(120)).is_some_and(|_| {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        })
    });
    let (code, lines, stderr) = w.ferry_xl_migrate();
    assert!(
        killer.join().unwrap_or(false),
        "the agent was killed mid-stream"
    );
    w.wrappers("");
    assert_eq!(code, 1, "ferry xl migrate fails: {lines:?} {stderr}");
    let failed = lines.last().expect("a failed line");
    assert_eq!(failed["source_running"], true, "{failed}");
    // The agent's service manager restarts it on the same storage: it removes what the dead
    // one left (a migration still receiving).
    if let Some(mut a) = w.agent.take() {
        a.kill();
    }
    w.start_agent();
    let _ = addr;
    w.assert_back_on_source("agent killed");
}

/// `ferry xl migrate` itself is killed mid-stream: its relay's socket closes, xl resumes the
/// domain, and `ferry recover` on the device model's QMP socket removes what the driver left
/// (its mirror jobs, NBD nodes, journal); the agent rolls back by itself.
pub fn fault_driver_killed(w: &mut World) {
    w.clear_events();
    w.wrappers("FAKE_XL_DIE=hold");
    let mut child = w
        .ferry_xl_migrate_command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ferry xl migrate");
    let receiver = World::wait_receiver(Duration::from_secs(120));
    let _ = child.kill();
    let _ = child.wait();
    w.wrappers("");
    assert!(
        receiver.is_some(),
        "the stream was flowing when ferry xl migrate was killed"
    );
    let journal = walk(&w.state.join("source"));
    assert_eq!(
        journal.len(),
        1,
        "the dead driver's journal is left for ferry recover: {journal:?}"
    );
    let (domid, _) = fake_xl::domain(&w.src_run, &w.name).expect("the source domain");
    let out = crate::FERRY
        .command()
        .args(["recover", "--json", "--qmp"])
        .arg(w.src_run.join(format!("qmp-libxl-{domid}")))
        .arg("--token-file")
        .arg(&w.token)
        .arg("--state-dir")
        .arg(&w.state)
        .output()
        .expect("ferry recover");
    assert!(
        out.status.success(),
        "ferry recover: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("source"),
        "recover says the domain stays on the source: {said}"
    );
    w.assert_back_on_source("driver killed");
}

/// A config naming a disk the device model does not serve (no qdisk node) is refused before
/// anything is created: xl would open the source's path on the destination.
pub fn refuses_unmoved_disk(w: &mut World) {
    let text = std::fs::read_to_string(&w.cfg).expect("config");
    let bad = text.replace(
        "disk = [ 'format=qcow2,",
        "disk = [ 'format=raw, vdev=xvdb, access=rw, target=/srv/other.raw', 'format=qcow2,",
    );
    assert_ne!(bad, text, "the config has the expected disk line");
    let good = w.cfg.clone();
    w.cfg = w.tmp.path().join("bad.cfg");
    std::fs::write(&w.cfg, bad).expect("write config");
    let (code, lines, stderr) = w.ferry_xl_migrate();
    w.cfg = good;
    assert_eq!(code, 2, "bad input: {lines:?} {stderr}");
    let failed = lines.last().expect("a failed line");
    let error = failed["error"].as_str().unwrap_or("");
    assert!(
        error.contains("xvdb") && error.contains("qdisk"),
        "the error names the disk and why: {failed}"
    );
    assert_eq!(failed["phase"], "discover", "{failed}");
    assert!(w.agent.as_ref().expect("agent").leftovers().is_empty());
    assert!(walk(&w.state).is_empty(), "{:?}", walk(&w.state));
    let status = w.qmp(&w.src_run, "query-status");
    assert_eq!(status["status"], "running", "{status}");
}
