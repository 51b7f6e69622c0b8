//! Bad input to `ferry agent` and `ferry migrate`: one clear line on stderr, exit 2, nothing done.

use std::process::Command;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(FERRY).args(args).output().expect("run ferry");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_one_line_error(result: (i32, String, String), code: i32, words: &str) {
    let (got, stdout, stderr) = result;
    assert_eq!(got, code, "stderr: {stderr}");
    assert!(stdout.is_empty(), "nothing on stdout: {stdout}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("ferry: "), "{stderr}");
    assert!(stderr.contains(words), "{stderr:?} should say {words:?}");
}

fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn token_files_must_exist_be_private_and_long_enough() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let short = tmp.path().join("short");
    std::fs::write(&short, "abc\n").expect("write");
    chmod(&short, 0o600);
    let open = tmp.path().join("open");
    std::fs::write(&open, "0123456789abcdef0123456789abcdef").expect("write");
    chmod(&open, 0o644);
    let open_path = open.to_str().expect("utf-8");
    for cmd in [
        &[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "/tmp",
            "--token-file",
            open_path,
        ][..],
        &[
            "migrate",
            "--qmp",
            "/x",
            "--to",
            "127.0.0.1:1",
            "--token-file",
            open_path,
        ][..],
    ] {
        assert_one_line_error(
            run(cmd),
            2,
            &format!("(mode 0644): run `chmod 600 {open_path}`"),
        );
    }
    let storage = tmp.path().to_str().expect("utf-8");
    assert_one_line_error(
        run(&[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            storage,
            "--token-file",
            "/nonexistent/token",
        ]),
        2,
        "cannot read token file /nonexistent/token",
    );
    assert_one_line_error(
        run(&[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            storage,
            "--token-file",
            short.to_str().expect("utf-8"),
        ]),
        2,
        "holds 3 bytes; use at least 16",
    );
    assert_one_line_error(
        run(&[
            "migrate",
            "--qmp",
            "/x",
            "--to",
            "127.0.0.1:1",
            "--token-file",
            short.to_str().expect("utf-8"),
        ]),
        2,
        "holds 3 bytes",
    );
}

#[test]
fn agent_refuses_a_missing_storage_directory_and_migrate_a_missing_socket() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").expect("write");
    chmod(&token, 0o600);
    let token = token.to_str().expect("utf-8");
    assert_one_line_error(
        run(&[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "/nonexistent/storage",
            "--token-file",
            token,
        ]),
        2,
        "storage directory /nonexistent/storage is not usable",
    );
    // A directory so deep that QEMU's sockets under it could not be bound.
    let deep = tmp.path().join("d".repeat(90));
    std::fs::create_dir_all(&deep).expect("deep dir");
    let deep = deep.to_str().expect("utf-8");
    let out = run(&[
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--storage",
        deep,
        "--token-file",
        token,
    ]);
    assert_one_line_error(out, 2, "a unix socket path can hold; use a shorter path");
    let socket = tmp.path().join("no-such.qmp");
    assert_one_line_error(
        run(&[
            "migrate",
            "--qmp",
            socket.to_str().expect("utf-8"),
            "--to",
            "127.0.0.1:1",
            "--token-file",
            token,
        ]),
        2,
        "no QMP socket at",
    );
}

/// The agent's policy flags are checked at start-up: a binary that could never be matched to a
/// source, or a directory that is not there, is a usage error naming the flag.
#[test]
fn agent_checks_its_binary_and_allow_path_flags() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = tmp.path().join("token");
    std::fs::write(&token, "0123456789abcdef0123456789abcdef").expect("write");
    chmod(&token, 0o600);
    let token = token.to_str().expect("utf-8");
    let storage = tmp.path().to_str().expect("utf-8");
    let base = [
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--storage",
        storage,
        "--token-file",
        token,
    ];
    let with = |extra: &[&str]| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        run(&args)
    };
    assert_one_line_error(
        with(&["--qemu-binary", "/bin/sh"]),
        2,
        "--qemu-binary /bin/sh: the file name must be qemu-system-ARCH",
    );
    assert_one_line_error(
        with(&["--qemu-binary", "/nonexistent/qemu-system-x86_64"]),
        2,
        "no such program",
    );
    assert_one_line_error(
        with(&["--allow-path", "/nonexistent/firmware"]),
        2,
        "--allow-path /nonexistent/firmware: not a directory",
    );
}
