//! `ferry demo`, the README's main command, runs green: it migrates the test guest and verifies
//! every acknowledged write on the destination disks.

#[test]
fn ferry_demo_migrates_and_verifies() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("demo")
        .output()
        .expect("run ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ferry demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("demo: verified on the destination images: vda: "),
        "{stdout}"
    );
    assert!(stdout.contains("vdb: "), "{stdout}");
    assert!(stdout.contains("downtime (QEMU)"), "{stdout}");
    // Nothing left behind: the demo's directory is gone.
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("demo: working in "))
        .expect("the demo names its directory");
    assert!(!std::path::Path::new(dir).exists(), "{dir} was removed");
}
