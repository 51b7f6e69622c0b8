//! `ferry nbd-serve` as a user runs it: serves until SIGTERM/SIGINT, then exits 0 after a
//! graceful stop; bad input is refused with exit code 2 and a message naming the problem.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use ferry_harness::files::*;
use ferry_harness::nbd::pki::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The server process, killed if a test fails before stopping it.
struct Serve {
    child: Child,
    urls: Vec<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], exports: usize) -> Serve {
    let mut child = Command::new(FERRY)
        .arg("nbd-serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ferry");
    let stdout = child.stdout.take().expect("stdout");
    let urls: Vec<String> = BufReader::new(stdout)
        .lines()
        .take(exports)
        .map(|l| l.expect("a URL line"))
        .collect();
    assert_eq!(urls.len(), exports, "ferry printed {urls:?}");
    Serve { child, urls }
}

fn stop(mut s: Serve, signal: Signal) -> std::process::ExitStatus {
    let pid = Pid::from_raw(i32::try_from(s.child.id()).expect("pid"));
    kill(pid, signal).expect("signal ferry");
    s.child.wait().expect("wait for ferry")
}

#[test]
fn serves_exports_until_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    sparse_file(&a, 4 * MIB);
    sparse_file(&b, 8 * MIB);
    let ea = format!("alpha={}", a.display());
    let eb = format!("beta={}", b.display());
    let s = serve(
        &["--listen", "127.0.0.1:0", "--export", &ea, "--export", &eb],
        2,
    );
    assert!(
        s.urls[0].starts_with("nbd://127.0.0.1:") && s.urls[0].ends_with("/alpha"),
        "{:?}",
        s.urls
    );
    assert!(s.urls[1].ends_with("/beta"));
    let base = s.urls[0].trim_end_matches("/alpha").to_string();
    let list = run("nbdinfo", &["--list", &base]);
    assert!(
        list.contains("export=\"alpha\"") && list.contains("export=\"beta\""),
        "{list}"
    );
    run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x42 0 1M", &s.urls[1]],
    );
    assert_eq!(
        run("nbdinfo", &["--size", &s.urls[1]]).trim(),
        (8 * MIB).to_string()
    );
    let status = stop(s, Signal::SIGTERM);
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let bytes = std::fs::read(&b).expect("image");
    assert!(bytes[..MIB as usize].iter().all(|&x| x == 0x42));
}

#[test]
fn read_only_and_sigint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let a = dir.path().join("a.raw");
    sparse_file(&a, MIB);
    let ea = format!("ro={}", a.display());
    let s = serve(
        &["--listen", "127.0.0.1:0", "--export", &ea, "--read-only"],
        1,
    );
    let info = run("nbdinfo", &[&s.urls[0]]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4k", &s.urls[0]])
        .output()
        .expect("qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("ermission") || text.contains("not permitted") || text.contains("read-only"),
        "{text}"
    );
    let status = stop(s, Signal::SIGINT);
    assert!(status.success(), "exit status after SIGINT: {status}");
}

#[test]
fn bad_input_exits_2_naming_the_problem() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.raw");
    let spec = format!("x={}", missing.display());
    let out = Command::new(FERRY)
        .args(["nbd-serve", "--listen", "127.0.0.1:0", "--export", &spec])
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("ferry: "), "{err}");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("No such file"),
        "{err}"
    );

    let out = Command::new(FERRY)
        .args(["nbd-serve", "--listen", "127.0.0.1:0", "--export", "nopath"])
        .output()
        .expect("run ferry");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=PATH"));
}

#[test]
fn tls_serves_nbds_urls_to_clients_with_a_certificate_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let creds = Creds::local(dir.path(), "cli");
    let image = dir.path().join("disk.raw");
    sparse_file(&image, 8 * MIB);
    let export = format!("disk={}", image.display());
    let file = |name: &str| creds.server_dir.join(name).display().to_string();
    let (cert, key, ca) = (
        file("server-cert.pem"),
        file("server-key.pem"),
        file("ca-cert.pem"),
    );
    let s = serve(
        &[
            "--listen",
            "127.0.0.1:0",
            "--export",
            &export,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
        ],
        1,
    );
    let url = &s.urls[0];
    assert!(
        url.starts_with("nbds://127.0.0.1:") && url.ends_with("/disk"),
        "{url}"
    );
    let with_cert = format!("{url}?tls-certificates={}", creds.client_dir.display());
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x5au8; 2 * MIB as usize]).expect("source");
    run("nbdcopy", &[src.to_str().expect("utf-8"), &with_cert]);
    let info = run("nbdinfo", &[&with_cert]);
    assert!(info.contains("with TLS"), "{info}");

    let plain = url.replacen("nbds://", "nbd://", 1);
    let refused = run_fails("nbdinfo", &[&plain]);
    assert!(refused.contains("without TLS"), "{refused}");
    let status = stop(s, Signal::SIGTERM);
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let bytes = std::fs::read(&image).expect("image");
    assert!(bytes[..2 * MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(bytes[2 * MIB as usize..].iter().all(|&b| b == 0));
}

#[test]
fn tls_bad_files_exit_2_naming_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let creds = Creds::local(dir.path(), "bad");
    let image = dir.path().join("disk.raw");
    sparse_file(&image, MIB);
    let export = format!("disk={}", image.display());
    let server = |name: &str| creds.server_dir.join(name).display().to_string();
    let client = |name: &str| creds.client_dir.join(name).display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let not_pem = image.display().to_string();
    let refused = |tls: &[&str]| {
        let out = Command::new(FERRY)
            .args(["nbd-serve", "--listen", "127.0.0.1:0", "--export", &export])
            .args(tls)
            .output()
            .expect("run ferry");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{tls:?}: {err}");
        assert!(out.stdout.is_empty(), "nothing served: {tls:?}");
        err
    };
    for (args, names) in [
        (
            vec![
                "--tls-cert",
                &missing,
                "--tls-key",
                &server("server-key.pem"),
            ],
            vec![missing.as_str(), "No such file"],
        ),
        (
            vec![
                "--tls-cert",
                &server("server-cert.pem"),
                "--tls-key",
                &missing,
            ],
            vec![missing.as_str()],
        ),
        (
            vec![
                "--tls-cert",
                &not_pem,
                "--tls-key",
                &server("server-key.pem"),
            ],
            vec![not_pem.as_str(), "no certificate"],
        ),
        (
            vec![
                "--tls-cert",
                &server("server-cert.pem"),
                "--tls-key",
                &client("client-key.pem"),
            ],
            vec!["--tls-key", "client-key.pem"],
        ),
        (
            vec![
                "--tls-cert",
                &server("server-cert.pem"),
                "--tls-key",
                &server("server-key.pem"),
                "--tls-ca",
                &missing,
            ],
            vec!["--tls-ca", missing.as_str()],
        ),
    ] {
        let err = refused(&args);
        assert!(err.starts_with("ferry: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        for name in names {
            assert!(err.contains(name), "{args:?}: {name:?} missing from {err}");
        }
    }
    // Half a pair, or a CA without a certificate to serve with: refused by the parser.
    for args in [
        vec!["--tls-cert", &server("server-cert.pem")],
        vec!["--tls-key", &server("server-key.pem")],
        vec!["--tls-ca", &server("ca-cert.pem")],
    ] {
        let err = refused(&args);
        assert!(err.contains("--tls-"), "{err}");
    }
    assert!(std::fs::read(&image)
        .expect("image")
        .iter()
        .all(|&b| b == 0));
}
