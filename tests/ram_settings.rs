//! The RAM phase's and switchover's settings (preallocated destination RAM, the downtime
//! limit), checked from outside: what reached the destination QEMU (its QOM properties, its
//! resident memory), and that the VM still arrives whole (every acknowledged record on the
//! destination image, the guest acknowledging there).

use std::path::{Path, PathBuf};

use ferry_harness::*;
use ferry_testkit::qemu::qemu_7_2;
use serde_json::{json, Value};

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

const TOKEN: &str = "ram-settings-token-0123456789abcdef";

/// Resident memory of `pid`, bytes (`VmRSS`).
fn resident(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// A completed migration's destination QEMU: its pid, a guard that kills it if an assertion
/// fails first (assert_on_destination quits it otherwise), and whether its RAM backend has
/// `prealloc` on.
async fn destination_prealloc(run: &MigrateRun, label: &str) -> (u64, PidGuard, bool) {
    let done = run.last();
    assert_eq!(
        done["event"], "completed",
        "{label}: {done}\n{}",
        run.stderr
    );
    let pid = done["destination"]["pid"]
        .as_u64()
        .expect("destination pid");
    let guard = PidGuard(Some(pid as u32));
    let qmp_path = Path::new(done["destination"]["qmp"].as_str().expect("qmp path"));
    let q = qmp::Qmp::connect_unix(qmp_path).await.expect("QMP");
    let prealloc = q
        .execute_raw(
            "qom-get",
            json!({"path": "/objects/pc.ram", "property": "prealloc"}),
        )
        .await
        .expect("qom-get prealloc");
    (pid, guard, prealloc == Value::Bool(true))
}

/// `--preallocate-ram`: the destination QEMU's RAM backend has `prealloc` on and it holds the
/// guest's whole 256 MiB resident, though this guest's RAM is mostly zero pages (which the RAM
/// stream does not write); the VM arrives whole. On a 10.0 destination, and on Debian 12's 7.2
/// (from a 7.2 source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preallocated_ram_reaches_the_destination_qemu() {
    let mut qemus = vec![PathBuf::from(ferry_testkit::DEFAULT_QEMU)];
    qemus.extend(qemu_7_2());
    for qemu in qemus {
        let mut setup = OneDisk::boot_with(TOKEN, 64 << 20, 8, 50, &qemu).await;
        let binary = qemu.display().to_string();
        let agent = setup.agent(FERRY, &["--qemu-binary", &binary]);
        let run = FERRY.migrate_with(
            setup.guest.qmp_socket(),
            &agent.addr,
            &setup.token,
            &["--insecure", "--preallocate-ram"],
        );
        let (pid, _guard, prealloc) = destination_prealloc(&run, &binary).await;
        assert!(prealloc, "{binary}: prealloc is off on the destination");
        let rss = resident(pid);
        assert!(
            rss >= 256 << 20,
            "{binary}: the destination holds {} MiB resident, not the guest's 256 MiB",
            rss >> 20
        );
        assert_on_destination(&mut setup.guest, &setup.token, &agent).await;
    }
}

/// `--preallocate-ram` left at `auto`: a mirror far shorter than the preallocation gets none
/// (8 MiB of data against 256 MiB of RAM); the same disk capped at 4 MiB/s (`--bandwidth`, the
/// RAM left uncapped) takes 2 s or more to copy, twice the worst-case preallocation, and gets
/// it. Either way the VM arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_preallocates_only_behind_a_long_mirror() {
    let cases: [(&[&str], bool); 2] = [
        (&["--insecure"], false),
        (
            &["--insecure", "--bandwidth", "4", "--ram-bandwidth", "0"],
            true,
        ),
    ];
    for (flags, expected) in cases {
        let mut setup = OneDisk::boot(TOKEN, 64 << 20, 8, 50).await;
        let agent = setup.agent(FERRY, &[]);
        let run = FERRY.migrate_with(setup.guest.qmp_socket(), &agent.addr, &setup.token, flags);
        let (_, _guard, prealloc) = destination_prealloc(&run, &format!("{flags:?}")).await;
        assert_eq!(prealloc, expected, "{flags:?}");
        assert_on_destination(&mut setup.guest, &setup.token, &agent).await;
    }
}

/// A RAM cap holds by default: with `--ram-bandwidth` and no `--parallel` the RAM travels as one
/// stream (QEMU 10.0's multifd channels overshoot `max-bandwidth`: 36 MiB/s against 20 in
/// BENCHMARKS.md, session 7), so the RAM phase lasts at least its bytes over the cap (less a
/// fifth, for the rate limiter's first window); the VM arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ram_cap_holds_by_default() {
    const CAP_MIB: u64 = 32;
    let mut setup = OneDisk::boot(TOKEN, 64 << 20, 8, 50).await;
    let agent = setup.agent(FERRY, &[]);
    let run = FERRY.migrate_with(
        setup.guest.qmp_socket(),
        &agent.addr,
        &setup.token,
        // Encrypted, where multifd is otherwise the default: the cap is what keeps one stream.
        &["--ram-bandwidth", &CAP_MIB.to_string()],
    );
    let done = run.last();
    assert_eq!(done["event"], "completed", "{done}");
    let _guard = PidGuard(done["destination"]["pid"].as_u64().map(|p| p as u32));
    let ram_bytes = done["ram_bytes"].as_u64().expect("ram_bytes");
    let phase = |name: &str| done["phases_ms"][name].as_u64().expect("phase time");
    let ms = phase("ram") + phase("switchover");
    let floor_ms = ram_bytes as f64 / (CAP_MIB << 20) as f64 * 1000.0 * 0.8;
    assert!(
        ms as f64 >= floor_ms,
        "{ram_bytes} bytes of RAM in {ms} ms: faster than {CAP_MIB} MiB/s allows ({floor_ms:.0} ms)"
    );
    assert_on_destination(&mut setup.guest, &setup.token, &agent).await;
}

/// The source QEMU's `downtime-limit` in ms.
async fn downtime_limit(qmp_path: &Path) -> u64 {
    let q = qmp::Qmp::connect_unix(qmp_path).await.expect("source QMP");
    let params = q
        .execute_raw("query-migrate-parameters", Value::Null)
        .await
        .expect("query-migrate-parameters");
    params["downtime-limit"]
        .as_u64()
        .unwrap_or_else(|| panic!("no downtime-limit in {params}"))
}

/// Without `--max-downtime` the source QEMU migrates under ferry's 50 ms downtime limit, not
/// its own 300; a migration that rolls back (here: the driver killed at pre-switchover, then
/// `ferry recover`) puts QEMU's own value back, and the guest runs on the source. A QEMU 7.2
/// source without KVM keeps its own 300 ms (a tighter limit corrupts its guests:
/// src/migrate/hazards.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_downtime_limit_reaches_the_source_and_is_restored() {
    let mut qemus = vec![(PathBuf::from(ferry_testkit::DEFAULT_QEMU), 50)];
    qemus.extend(qemu_7_2().map(|q| (q, 300)));
    for (qemu, expected) in qemus {
        let mut setup = OneDisk::boot_with(TOKEN, 64 << 20, 8, 50, &qemu).await;
        let qmp_path = setup.guest.qmp_socket().to_path_buf();
        assert_eq!(downtime_limit(&qmp_path).await, 300, "QEMU's own default");
        let agent = setup.agent(FERRY, &[]);
        let held = FERRY.held_migrate(
            &qmp_path,
            &agent.addr,
            &setup.token,
            "source-pre-switchover",
            setup.tmp.path(),
        );
        held.wait_held();
        // The driver holds the only QMP connection: it goes first, the parameters stay.
        held.kill();
        assert_eq!(
            downtime_limit(&qmp_path).await,
            expected,
            "{}: the limit during the migration",
            qemu.display()
        );
        let (code, out, err) = FERRY.recover(&qmp_path, &setup.token);
        assert_eq!(code, 0, "{out} {err}");
        assert_eq!(out["owner"], "source", "{out}");
        assert_eq!(downtime_limit(&qmp_path).await, 300, "restored");
        assert_on_source(&mut setup.guest, &setup.token, &agent).await;
    }
}
