//! The server against independent NBD clients: qemu-io and qemu-img (QEMU 10: extended
//! headers), nbdcopy and nbdinfo (libnbd: structured replies, several connections).

mod nbd_support;

use std::path::Path;
use std::process::Command;

use ferry::nbd::ServerConfig;
use nbd_support::*;

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
    let out = Command::new("nbdinfo")
        .args(["--list", &format!("nbd://{}", ts.addr())])
        .output()
        .expect("nbdinfo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("secret-export-name"), "{text}");
    let _dir = ts.shutdown();
}
