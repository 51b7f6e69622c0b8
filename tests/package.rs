//! The Debian package: built with `cargo deb` as `scripts/package` does, unpacked into a scratch
//! root (`dpkg -x`), and checked the way an operator would: the packaged `ferry` runs, its man
//! pages open with `man -l`, the unit is valid for systemd and runs the agent from the shipped
//! conffile, and the completions are where the shells look.
//!
//! It packages the binary this test run built (the debug build) instead of a release build:
//! `cargo deb --no-build` from a scratch target directory holding that binary as
//! `release/ferry`. What is checked is the packaging, and a release build would add minutes to
//! CI for nothing more.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");
const SOURCE: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the .deb from this test run's `ferry`; returns its path.
fn build_deb(scratch: &Path) -> PathBuf {
    let target = scratch.join("target");
    let release = target.join("release");
    std::fs::create_dir_all(&release).expect("mkdir");
    std::fs::copy(FERRY, release.join("ferry")).expect("copy the ferry binary");
    // What scripts/package does after its build.
    run(Command::new(release.join("ferry"))
        .args(["gen-docs", "--out"])
        .arg(release.join("docs")));
    let deb = scratch.join("ferry.deb");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let out = Command::new(cargo)
        .args(["deb", "--no-build", "--fast", "--offline", "-o"])
        .arg(&deb)
        .current_dir(SOURCE)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo deb");
    assert!(
        out.status.success(),
        "cargo deb failed (is cargo-deb installed? scripts/setup installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("cargo deb took {:.1} s", started.elapsed().as_secs_f64());
    deb
}

#[test]
fn the_deb_installs_a_working_ferry_with_man_pages_unit_conffile_and_completions() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(scratch.path());
    let root = scratch.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root));

    // The packaged binary runs.
    let ferry = root.join("usr/bin/ferry");
    let version = text(&run(Command::new(&ferry).arg("--version")));
    assert_eq!(
        version.trim(),
        format!("ferry {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );

    // A man page per subcommand, readable by man.
    let man1 = root.join("usr/share/man/man1");
    for page in [
        "ferry",
        "ferry-agent",
        "ferry-migrate",
        "ferry-recover",
        "ferry-qmp",
        "ferry-nbd-serve",
    ] {
        assert!(man1.join(format!("{page}.1")).is_file(), "{page}.1 missing");
    }
    assert!(
        !man1.join("ferry-gen-docs.1").exists(),
        "the hidden packaging command has no page"
    );
    let page = text(&run(Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(man1.join("ferry-agent.1"))
        .env("MANWIDTH", "100")));
    for words in ["ferry-agent", "--config", "--token-file", "--storage"] {
        assert!(page.contains(words), "man page lacks {words:?}:\n{page}");
    }
    let page = text(&run(Command::new("man")
        .args(["-P", "cat", "-l"])
        .arg(man1.join("ferry-migrate.1"))));
    assert!(page.contains("--dry-run"), "{page}");

    // The unit: what it runs, and valid for systemd (with ExecStart pointed at the scratch root,
    // since verify checks that the program exists).
    let unit_path = root.join("usr/lib/systemd/system/ferry-agent.service");
    let unit = std::fs::read_to_string(&unit_path).expect("the unit is packaged");
    for line in [
        "ExecStart=/usr/bin/ferry agent --config /etc/ferry/agent.toml",
        "KillMode=process",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "StateDirectory=ferry ferry/images",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "unit lacks {line:?}:\n{unit}"
        );
    }
    let local_unit = scratch.path().join("ferry-agent.service");
    std::fs::write(
        &local_unit,
        unit.replace("/usr/bin/ferry", &ferry.display().to_string()),
    )
    .expect("write");
    let verify = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&local_unit));
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        complaints.trim().is_empty(),
        "systemd-analyze: {complaints}"
    );
    let control = scratch.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let postinst = std::fs::read_to_string(control.join("postinst")).expect("postinst");
    assert!(
        postinst.contains("deb-systemd-helper enable ferry-agent.service"),
        "{postinst}"
    );

    // The conffile: marked as one, and the packaged agent starts from it.
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/ferry/agent.toml");
    let config = root.join("etc/ferry/agent.toml");
    let shipped = std::fs::read_to_string(&config).expect("agent.toml is packaged");
    assert!(
        shipped.contains("storage = \"/var/lib/ferry/images\"")
            && shipped.contains("token-file = \"/etc/ferry/token\""),
        "{shipped}"
    );
    agent_starts_from(&ferry, &config, scratch.path());

    // Completions where bash, zsh and fish look for them; the bash one is valid bash.
    let bash = root.join("usr/share/bash-completion/completions/ferry");
    run(Command::new("bash").arg("-n").arg(&bash));
    let bash_text = std::fs::read_to_string(&bash).expect("bash completion");
    assert!(bash_text.contains("--token-file"), "bash completion");
    assert!(root
        .join("usr/share/zsh/vendor-completions/_ferry")
        .is_file());
    assert!(root
        .join("usr/share/fish/vendor_completions.d/ferry.fish")
        .is_file());
}

/// Runs the packaged agent on the packaged config, with the host paths (listen address,
/// storage, token, state) overridden by flags, until it says it listens: the shipped file parses
/// and holds no key the agent does not know.
fn agent_starts_from(ferry: &Path, config: &Path, scratch: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let token = scratch.join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let storage = scratch.join("images");
    std::fs::create_dir_all(&storage).expect("mkdir");
    let mut agent = Command::new(ferry)
        .arg("agent")
        .arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--storage"])
        .arg(&storage)
        .arg("--token-file")
        .arg(&token)
        .arg("--state-dir")
        .arg(scratch.join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the packaged agent");
    let stdout = agent.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let _ = agent.kill();
    let out = agent.wait_with_output().expect("wait");
    assert!(
        line.starts_with("ferry agent listening on 127.0.0.1:"),
        "the agent did not start from the packaged config: {line:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
