//! `ferry qmp` as a user runs it: the built binary against real QEMUs (10.x, and 7.2 when
//! scripts/setup installed it), checking stdout, stderr and exit codes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use ferry_testkit::qemu::{available_qemus, TestQemu};

fn ferry_qmp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .arg("qmp")
        .args(args)
        .output()
        .expect("run ferry")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn socket_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

#[test]
fn command_prints_its_return_as_json_and_exits_0() {
    for bin in available_qemus() {
        let qemu = TestQemu::start(&bin, 1);
        let out = ferry_qmp(&[socket_arg(qemu.socket()), "query-status"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "QEMU {}: stderr {}",
            bin.name,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "");
        let ret: Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
        assert_eq!(ret["status"], "running");
        assert_eq!(ret["running"], true);

        let out = ferry_qmp(&[
            socket_arg(qemu.socket()),
            "qom-get",
            r#"{"path": "/machine", "property": "type"}"#,
        ]);
        assert_eq!(out.status.code(), Some(0), "stderr {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "\"none-machine\"\n");
    }
}

#[test]
fn qmp_error_prints_class_and_desc_and_exits_1() {
    for bin in available_qemus() {
        let qemu = TestQemu::start(&bin, 1);
        let out = ferry_qmp(&[socket_arg(qemu.socket()), "no-such-command"]);
        assert_eq!(out.status.code(), Some(1), "QEMU {}", bin.name);
        assert_eq!(
            text(&out.stderr),
            "CommandNotFound: The command no-such-command has not been found\n"
        );
        assert_eq!(text(&out.stdout), "");

        let out = ferry_qmp(&[socket_arg(qemu.socket()), "query-status", r#"{"bogus": 1}"#]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            text(&out.stderr),
            "GenericError: Parameter 'bogus' is unexpected\n"
        );
    }
}

#[tokio::test]
async fn events_are_json_lines_until_qemu_closes_the_socket() {
    for bin in available_qemus() {
        let mut qemu = TestQemu::start(&bin, 2);
        let mut ferry = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["qmp", socket_arg(&qemu.sockets[0]), "--events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry qmp --events");
        let stdout = ferry.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let actor = qmp::Qmp::connect_unix(&qemu.sockets[1])
            .await
            .expect("second monitor");
        // ferry subscribes some milliseconds after it starts: pause and resume until it shows.
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut seen = Vec::new();
        while !seen.iter().any(|l: &String| l.contains("\"STOP\"")) {
            assert!(
                Instant::now() < deadline,
                "no STOP line from ferry (QEMU {}): {seen:?}",
                bin.name
            );
            actor.execute(qmp::qapi::qmp::stop {}).await.expect("stop");
            actor.execute(qmp::qapi::qmp::cont {}).await.expect("cont");
            seen.extend(lines.recv_timeout(Duration::from_millis(100)));
        }
        actor.execute(qmp::qapi::qmp::quit {}).await.expect("quit");
        let status = tokio::task::spawn_blocking(move || ferry.wait_with_output())
            .await
            .expect("join")
            .expect("wait");
        assert_eq!(
            status.status.code(),
            Some(0),
            "stderr: {}",
            text(&status.stderr)
        );
        seen.extend(lines.try_iter());

        let events: Vec<Value> = seen
            .iter()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        for event in &events {
            let obj = event.as_object().expect("an object");
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            assert_eq!(keys, ["data", "event", "timestamp"], "{event}");
            assert!(event["data"].is_object(), "{event}");
            assert!(
                event["timestamp"]["seconds"]
                    .as_i64()
                    .is_some_and(|s| s > 1_600_000_000),
                "{event}"
            );
            assert!(event["timestamp"]["microseconds"]
                .as_i64()
                .is_some_and(|us| (0..1_000_000).contains(&us)));
        }
        let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
        let stop = names.iter().position(|n| *n == "STOP").expect("STOP");
        assert_eq!(names.get(stop + 1), Some(&"RESUME"), "{names:?}");
        assert_eq!(names.last(), Some(&"SHUTDOWN"), "{names:?}");
        assert_eq!(
            events.last().map(|e| e["data"]["reason"].clone()),
            Some(Value::from("host-qmp-quit"))
        );
        assert!(qemu.wait_exit(Duration::from_secs(2)));
    }
}

#[test]
fn missing_socket_exits_2_with_one_line() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("absent.sock");
    let out = ferry_qmp(&[socket_arg(&path), "query-status"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "ferry: cannot connect to QMP socket {}: No such file or directory (os error 2)\n",
            path.display()
        )
    );
    assert_eq!(text(&out.stdout), "");
}

#[test]
fn socket_that_is_not_qmp_exits_2() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("http.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut stream, _) = listener.accept().expect("accept");
        let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let out = ferry_qmp(&[socket_arg(&path), "query-status"]);
    server.join().expect("fake server");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("ferry: {} is not a QMP socket: ", path.display())),
        "{stderr}"
    );
    assert!(
        stderr.contains("HTTP/1.1 400"),
        "shows what came instead: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // A plain file where the socket should be.
    let file = dir.path().join("file");
    std::fs::write(&file, b"").expect("write file");
    let out = ferry_qmp(&[socket_arg(&file), "query-status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("ferry: cannot connect to QMP socket"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bad_args_json_exits_2_before_touching_qemu() {
    let bins = available_qemus();
    let qemu = TestQemu::start(&bins[0], 1);
    let sock = socket_arg(qemu.socket());
    let out = ferry_qmp(&[sock, "qom-get", "{path: /machine"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("ferry: ARGS_JSON is not valid JSON"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);

    let out = ferry_qmp(&[sock, "qom-get", "[1, 2]"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).starts_with("ferry: ARGS_JSON must be a JSON object"),
        "{}",
        text(&out.stderr)
    );

    // Neither a command nor --events, or both: usage errors.
    assert_eq!(ferry_qmp(&[sock]).status.code(), Some(2));
    assert_eq!(
        ferry_qmp(&[sock, "query-status", "--events"]).status.code(),
        Some(2)
    );

    // The monitor is still fine: nothing half-sent reached it.
    let out = ferry_qmp(&[sock, "query-status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}
