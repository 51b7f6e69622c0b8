//! The server against independent NBD clients: qemu-io and qemu-img (QEMU 10: extended
//! headers), nbdcopy and nbdinfo (libnbd: structured replies, several connections).

use std::path::Path;

use ferry::nbd::ServerConfig;
use ferry_harness::files::*;
use ferry_harness::nbd::pki::*;
use ferry_harness::nbd::*;

fn qemu_io(url: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(url);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    assert!(
        !out.contains("Pattern verification"),
        "qemu-io pattern mismatch:\n{out}"
    );
    out
}

#[test]
fn qemu_io_write_and_read_patterns() {
    let ts = TestServer::start(ServerConfig::default());
    let path = ts.export_new("disk", 64 * MIB, false);
    let url = ts.url("disk");
    qemu_io(
        &url,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1M 4k",
            "write -P 0x33 3000 5000", // unaligned
            "write -f -P 0x44 2M 64k", // FUA
            "aio_write -P 0x55 4M 1M",
            "aio_write -P 0x66 5M 1M",
            "aio_write -P 0x77 6M 1M",
            "aio_flush",
            "write -z 8M 1M",
            "write -z -u 9M 1M",
            "discard 10M 1M",
            "flush",
        ],
    );
    qemu_io(
        &url,
        &[
            "read -P 0x11 0 3000",
            "read -P 0x33 3000 5000",
            "read -P 0x11 8000 1040576",
            "read -P 0x22 1M 4k",
            "read -P 0x44 2M 64k",
            "read -P 0x55 4M 1M",
            "read -P 0x66 5M 1M",
            "read -P 0x77 6M 1M",
            "read -P 0 8M 2M",
            "read -P 0 40M 1M",
        ],
    );
    let _dir = ts.shutdown();
    // On disk too, not just through the server.
    let bytes = std::fs::read(&path).expect("image");
    assert!(bytes[3000..8000].iter().all(|&b| b == 0x33));
    assert!(bytes[6 * MIB as usize..7 * MIB as usize]
        .iter()
        .all(|&b| b == 0x77));
    assert!(
        allocated(&path) <= 9 * MIB,
        "zeroed ranges did not allocate: {}",
        allocated(&path)
    );
}

#[test]
fn qemu_img_convert_both_ways_and_compare() {
    let ts = TestServer::start(ServerConfig::default());
    let dir = ts.dir.path().to_path_buf();
    let src = dir.join("src.raw");
    sparse_file(&src, 256 * MIB);
    random_chunks(&src, 256 * MIB, 24, 1);
    let dst = ts.export_new("dst", 256 * MIB, false);
    let url = ts.url("dst");
    let s = src.to_str().expect("utf-8");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", s, &url],
    );
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, &url]);
    let back = dir.join("back.raw");
    let b = back.to_str().expect("utf-8");
    run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &url, b]);
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, b]);
    let _dir = ts.shutdown();
    assert_same_bytes(&src, &dst);
    assert_same_bytes(&src, &back);
    assert_sparse_like(&src, &dst);
}

#[test]
fn nbdcopy_both_ways() {
    let ts = TestServer::start(ServerConfig::default());
    let dir = ts.dir.path().to_path_buf();
    let src = dir.join("src.raw");
    sparse_file(&src, 256 * MIB);
    random_chunks(&src, 256 * MIB, 32, 2);
    let dst = ts.export_new("dst", 256 * MIB, false);
    let url = ts.url("dst");
    // Several connections (the export advertises multi-conn) and many requests in flight.
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            src.to_str().expect("utf-8"),
            &url,
        ],
    );
    let back = dir.join("back.raw");
    sparse_file(&back, 256 * MIB);
    run(
        "nbdcopy",
        &["--connections=4", &url, back.to_str().expect("utf-8")],
    );
    let _dir = ts.shutdown();
    assert_same_bytes(&src, &dst);
    assert_same_bytes(&src, &back);
    assert_sparse_like(&src, &dst);
}

#[test]
fn nbdinfo_map_and_list() {
    // Listing is off by default (the agent's export names are secrets); `nbd-serve` turns it on.
    let ts = TestServer::start(ServerConfig {
        list_exports: true,
        ..ServerConfig::default()
    });
    let path = ts.dir.path().join("mapped.raw");
    sparse_file(&path, 16 * MIB);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    for at in [MIB, 5 * MIB, 6 * MIB] {
        std::os::unix::fs::FileExt::write_all_at(&f, &vec![0xeeu8; MIB as usize], at)
            .expect("data");
    }
    drop(f);
    ts.export("mapped", &path, false);
    ts.export_new("second", MIB, true);
    ts.export_new("third", 2 * MIB, false);

    let map = run("nbdinfo", &["--map", &ts.url("mapped")]);
    let rows: Vec<(u64, u64, u64)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3),
            (MIB, MIB, 0),
            (2 * MIB, 3 * MIB, 3),
            (5 * MIB, 2 * MIB, 0),
            (7 * MIB, 9 * MIB, 3),
        ],
        "nbdinfo --map:\n{map}"
    );

    let list = run("nbdinfo", &["--list", &format!("nbd://{}", ts.addr())]);
    for name in ["mapped", "second", "third"] {
        assert!(
            list.contains(&format!("export=\"{name}\"")),
            "{name} missing from:\n{list}"
        );
    }
    assert!(list.contains("is_read_only: true"), "{list}");
    assert!(list.contains("can_multi_conn: true"), "{list}");
    assert!(list.contains("block_size_maximum: 33554432"), "{list}");
    assert!(list.contains("base:allocation"), "{list}");
    let _dir = ts.shutdown();
}

/// The destination is no more allocated than the source (within 1%, plus a little slack for
/// file system metadata of small images).
fn assert_sparse_like(src: &Path, dst: &Path) {
    let (s, d) = (allocated(src), allocated(dst));
    assert!(
        d <= s + s / 100 + 64 * 1024,
        "destination allocates {d} bytes, source {s}"
    );
}

/// With the default configuration (the agent's), `nbdinfo --list` learns no export name.
#[test]
fn nbdinfo_list_names_nothing_by_default() {
    let ts = TestServer::start(ServerConfig::default());
    ts.export_new("secret-export-name", MIB, false);
    let (_, text) = run_output("nbdinfo", &["--list", &format!("nbd://{}", ts.addr())]);
    assert!(!text.contains("secret-export-name"), "{text}");
    let _dir = ts.shutdown();
}

// ---- TLS ----------------------------------------------------------------------------------------

fn tls_server(config: std::sync::Arc<rustls::ServerConfig>) -> TestServer {
    TestServer::start(ServerConfig {
        tls: Some(config),
        list_exports: true,
        ..ServerConfig::default()
    })
}

/// QEMU's tools with the agent's own per-migration credentials, exactly as the source QEMU gets
/// them: a `tls-creds-x509` client object and `tls-hostname`.
#[test]
fn tls_qemu_io_write_and_read_back_with_migration_credentials() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (creds, config) = Creds::migration(dir.path(), "m");
    let ts = tls_server(config);
    let path = ts.export_new("disk", 64 * MIB, false);
    let object = qemu_client_object("tls0", &creds.client_dir);
    let opts = qemu_tls_opts(ts.addr(), "disk", "tls0");
    let qemu_io_tls = |commands: &[&str]| {
        let mut args = vec!["--object", &object, "--image-opts", &opts];
        for c in commands {
            args.extend(["-c", c]);
        }
        let out = run("qemu-io", &args);
        assert!(
            !out.contains("failed") && !out.contains("Pattern verification"),
            "qemu-io over TLS:\n{out}"
        );
    };
    qemu_io_tls(&[
        "write -P 0x5a 0 1M",
        "write -P 0xa5 3000 5000", // unaligned
        "write -f -P 0x3c 2M 64k", // FUA
        "aio_write -P 0x11 4M 1M",
        "aio_write -P 0x22 5M 1M",
        "aio_write -P 0x33 6M 4M",
        "aio_flush",
        "write -z 12M 1M",
        "discard 13M 1M",
        "flush",
    ]);
    qemu_io_tls(&[
        "read -P 0x5a 0 3000",
        "read -P 0xa5 3000 5000",
        "read -P 0x5a 8000 1040576",
        "read -P 0x3c 2M 64k",
        "read -P 0x11 4M 1M",
        "read -P 0x22 5M 1M",
        "read -P 0x33 6M 4M",
        "read -P 0 12M 2M",
    ]);
    let _dir = ts.shutdown();
    let bytes = std::fs::read(&path).expect("image");
    assert!(bytes[3000..8000].iter().all(|&b| b == 0xa5));
    assert!(bytes[6 * MIB as usize..10 * MIB as usize]
        .iter()
        .all(|&b| b == 0x33));
    assert!(bytes[12 * MIB as usize..].iter().all(|&b| b == 0));
}

#[test]
fn tls_qemu_img_convert_both_ways_and_compare() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (creds, config) = Creds::migration(dir.path(), "m");
    let ts = tls_server(config);
    let src = dir.path().join("src.raw");
    sparse_file(&src, 256 * MIB);
    random_chunks(&src, 256 * MIB, 24, 3);
    let dst = ts.export_new("dst", 256 * MIB, false);
    let object = qemu_client_object("tls0", &creds.client_dir);
    let opts = qemu_tls_opts(ts.addr(), "dst", "tls0");
    let s = src.to_str().expect("utf-8");
    let local = format!("driver=raw,file.driver=file,file.filename={s}");
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &object,
            "-f",
            "raw",
            s,
            "--target-image-opts",
            &opts,
        ],
    );
    let compare = run(
        "qemu-img",
        &[
            "compare",
            "--object",
            &object,
            "--image-opts",
            &local,
            &opts,
        ],
    );
    assert!(compare.contains("Images are identical"), "{compare}");
    let back = dir.path().join("back.raw");
    let b = back.to_str().expect("utf-8");
    run(
        "qemu-img",
        &[
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            b,
        ],
    );
    let _dir = ts.shutdown();
    assert_same_bytes(&src, &dst);
    assert_same_bytes(&src, &back);
    assert_sparse_like(&src, &dst);
}

/// libnbd's tools (structured replies, several connections at once) over TLS, with a client
/// certificate; the server's certificate names 127.0.0.1, which libnbd checks.
#[test]
fn tls_nbdcopy_both_ways_and_nbdinfo() {
    let dir = tempfile::tempdir().expect("temp dir");
    let creds = Creds::local(dir.path(), "l");
    let ts = tls_server(creds.server_config(true));
    let src = dir.path().join("src.raw");
    sparse_file(&src, 256 * MIB);
    random_chunks(&src, 256 * MIB, 32, 4);
    let dst = ts.export_new("dst", 256 * MIB, false);
    let uri = libnbd_tls_uri(ts.addr(), "dst", &creds.client_dir);
    run(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=32",
            src.to_str().expect("utf-8"),
            &uri,
        ],
    );
    let back = dir.path().join("back.raw");
    sparse_file(&back, 256 * MIB);
    run(
        "nbdcopy",
        &["--connections=4", &uri, back.to_str().expect("utf-8")],
    );
    let info = run("nbdinfo", &[&uri]);
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 268435456"), "{info}");
    let list_uri = format!(
        "nbds://{}?tls-certificates={}",
        ts.addr(),
        creds.client_dir.display()
    );
    let list = run("nbdinfo", &["--list", &list_uri]);
    assert!(list.contains("export=\"dst\""), "{list}");
    let _dir = ts.shutdown();
    assert_same_bytes(&src, &dst);
    assert_same_bytes(&src, &back);
    assert_sparse_like(&src, &dst);
}

/// Without this migration's client certificate nothing gets through: plaintext clients are told
/// TLS is required, a TLS client without a certificate or with one from another CA is cut off in
/// the TLS handshake. The disk does not change, and the rightful client still gets in.
#[test]
fn tls_refuses_clients_without_the_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (creds, config) = Creds::migration(dir.path(), "m");
    let ts = tls_server(config);
    let path = ts.dir.path().join("disk.raw");
    std::fs::write(&path, vec![0x42u8; 4 * MIB as usize]).expect("image");
    ts.export("disk", &path, false);
    let before = std::fs::read(&path).expect("image");
    // Each refused client tries to overwrite the disk with this.
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x99u8; MIB as usize]).expect("source");
    let s = src.to_str().expect("utf-8");

    let plain = run_fails(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            s,
            &ts.url("disk"),
        ],
    );
    assert!(
        plain.contains("TLS negotiation required") && plain.contains("requires TLS"),
        "qemu-img without credentials:\n{plain}"
    );
    let plain = run_fails("nbdinfo", &[&ts.url("disk")]);
    assert!(
        plain.contains("without TLS") && plain.contains("not supported"),
        "nbdinfo without TLS:\n{plain}"
    );

    let (other, _) = Creds::migration(dir.path(), "other");
    let impostor = creds.impostor(&other, &dir.path().join("impostor"));
    let object = qemu_client_object("tls0", &impostor);
    let opts = qemu_tls_opts(ts.addr(), "disk", "tls0");
    let refused = run_fails(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &object,
            "-f",
            "raw",
            s,
            "--target-image-opts",
            &opts,
        ],
    );
    // The server's alert, or (when QEMU was still writing as the server closed) the handshake
    // failing on the closed socket: either way the handshake is what failed.
    assert!(
        tls_refusal(&refused),
        "qemu-img with another CA's client certificate:\n{refused}"
    );
    assert!(
        std::fs::read(&path).expect("image") == before,
        "a refused client changed the disk"
    );
    // The rightful client is served all along.
    let object = qemu_client_object("tls0", &creds.client_dir);
    let out = run(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-c",
            "read -P 0x42 0 4M",
        ],
    );
    assert!(!out.contains("Pattern verification"), "{out}");
    let _dir = ts.shutdown();
}

/// libnbd with the server's CA but no client certificate: the server ends the TLS handshake
/// (the server's certificate names 127.0.0.1 here, so libnbd's own check passes and the
/// refusal is the server's), and the disk does not change.
#[test]
fn tls_libnbd_without_a_client_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let creds = Creds::local(dir.path(), "l");
    let ts = tls_server(creds.server_config(true));
    let path = ts.dir.path().join("disk.raw");
    std::fs::write(&path, vec![0x42u8; 4 * MIB as usize]).expect("image");
    ts.export("disk", &path, false);
    let ca_only = dir.path().join("ca-only");
    std::fs::create_dir(&ca_only).expect("dir");
    std::fs::copy(
        creds.client_dir.join("ca-cert.pem"),
        ca_only.join("ca-cert.pem"),
    )
    .expect("copy the CA");
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x99u8; MIB as usize]).expect("source");
    let refused = run_fails(
        "nbdcopy",
        &[
            src.to_str().expect("utf-8"),
            &libnbd_tls_uri(ts.addr(), "disk", &ca_only),
        ],
    );
    assert!(
        tls_refusal(&refused),
        "nbdcopy without a client certificate:\n{refused}"
    );
    // With its certificate the same client gets in.
    let info = run(
        "nbdinfo",
        &[&libnbd_tls_uri(ts.addr(), "disk", &creds.client_dir)],
    );
    assert!(info.contains("with TLS"), "{info}");
    let _dir = ts.shutdown();
    assert!(
        std::fs::read(&path)
            .expect("image")
            .iter()
            .all(|&b| b == 0x42),
        "a refused client changed the disk"
    );
}

/// Whether a client's error says its TLS handshake was refused: the server's alert, or (when the
/// client was still writing as the server closed) the handshake failing on the closed socket.
fn tls_refusal(text: &str) -> bool {
    text.contains("TLS fatal alert")
        || text.contains("TLS handshake failed")
        || (text.contains("TLS") && text.contains("push function"))
}
