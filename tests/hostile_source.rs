//! A source that holds the token but not the operator's trust: every test sends a real
//! `ferry agent` a command line it must refuse, and checks from outside that it did (the words
//! naming the option), that nothing was created in its storage and that nothing ran.
//!
//! Most cases use a hand-written control-protocol peer (Hello → Challenge → Auth →
//! Authenticated → Prepare), which can send any argv without booting QEMU; one boots the test
//! guest with an option QEMU accepts on the source but the agent must not run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::migrate::control::{self, ClientStream};
use ferry::protocol::{self, AgentMessage, Signer, SourceMessage};
use ferry::vm::{DiskDescription, VmDescription};
use ferry_harness::*;

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

const TOKEN: &str = "hostile-test-token-0123456789abcdef";

/// A connected, authenticated peer.
struct Peer {
    rd: tokio::io::ReadHalf<ClientStream>,
    wr: tokio::io::WriteHalf<ClientStream>,
}

impl Peer {
    async fn connect(addr: &str) -> Peer {
        let tls = ferry::tls::client_config(None, None).expect("TLS config");
        let (stream, binding) = control::dial(addr, &tls)
            .await
            .expect("connect to the agent");
        let (mut rd, mut wr) = tokio::io::split(stream);
        let hello = SourceMessage::Hello {
            versions: protocol::SUPPORTED_VERSIONS.to_vec(),
            software: "hostile test peer".into(),
        };
        protocol::write_message(&mut wr, &hello)
            .await
            .expect("hello");
        let nonce = match protocol::read_message(&mut rd).await.expect("challenge") {
            AgentMessage::Challenge { nonce, .. } => nonce,
            other => panic!("expected a challenge, got {other:?}"),
        };
        let auth = SourceMessage::Auth {
            mac: protocol::sign(TOKEN.as_bytes(), Signer::Source, &binding, &nonce),
            nonce: protocol::new_nonce(),
        };
        protocol::write_message(&mut wr, &auth).await.expect("auth");
        match protocol::read_message(&mut rd)
            .await
            .expect("authenticated")
        {
            AgentMessage::Authenticated { .. } => {}
            other => panic!("expected authenticated, got {other:?}"),
        }
        Peer { rd, wr }
    }

    async fn prepare(&mut self, vm: VmDescription) -> AgentMessage {
        self.prepare_with(vm, true).await
    }

    async fn prepare_with(&mut self, vm: VmDescription, tls: bool) -> AgentMessage {
        protocol::write_message(&mut self.wr, &SourceMessage::Prepare { vm, tls })
            .await
            .expect("prepare");
        protocol::read_message(&mut self.rd)
            .await
            .expect("the agent answers")
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|s| s.to_string()).collect()
}

/// One 1 MiB disk, defined by a `-blockdev` that is on the command line.
fn disk_description() -> DiskDescription {
    DiskDescription {
        name: "vda".into(),
        node_name: "vda".into(),
        device: String::new(),
        file: "/src/vda.raw".into(),
        format: "raw".into(),
        size: 1 << 20,
        allocated: None,
        read_only: false,
    }
}

const DISK_ARGS: &[&str] = &[
    "-blockdev",
    "driver=raw,node-name=vda,file.driver=file,file.filename=/src/vda.raw",
    "-device",
    "virtio-blk-pci,drive=vda",
];

fn vm(argv0: &str, extra: &[&str]) -> VmDescription {
    let mut words = vec![argv0, "-accel", "tcg", "-m", "64", "-display", "none"];
    words.extend_from_slice(DISK_ARGS);
    words.extend_from_slice(extra);
    VmDescription {
        argv: argv(&words),
        machine: None,
        disks: vec![disk_description()],
        running: true,
    }
}

/// Processes whose command line mentions `needle` (a QEMU started for the agent's storage would).
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.windows(needle.len()).any(|w| w == needle))
        // The agent itself names its storage directory.
        .filter(|c| !c.windows(6).any(|w| w == b"agent\0"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

struct Setup {
    _tmp: tempfile::TempDir,
    agent: AgentProc,
    allowed: PathBuf,
    root: PathBuf,
}

/// An agent that may load files from `ROOT/fw` only.
fn agent() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let token = token_file(&root, TOKEN);
    let allowed = root.join("fw");
    std::fs::create_dir_all(&allowed).expect("fw dir");
    std::fs::write(allowed.join("bios.bin"), b"not really a bios").expect("bios");
    std::fs::write(root.join("secret"), b"host secret").expect("secret");
    std::os::unix::fs::symlink(root.join("secret"), allowed.join("escape")).expect("symlink");
    let agent = FERRY.agent_bare(
        &root.join("storage"),
        &token,
        &["--allow-path".as_ref(), allowed.as_os_str()],
    );
    Setup {
        _tmp: tmp,
        agent,
        allowed,
        root,
    }
}

/// Sends `vm`; asserts the refusal names `words`, and that nothing was created or started.
async fn assert_refused(setup: &Setup, vm: VmDescription, words: &[&str]) -> String {
    let mut peer = Peer::connect(&setup.agent.addr).await;
    let label = vm.argv.join(" ");
    let reason = match peer.prepare(vm).await {
        AgentMessage::Refused { reason } => reason,
        other => panic!("{label}: expected a refusal, got {other:?}"),
    };
    for w in words {
        assert!(reason.contains(w), "{label}: {reason:?} should say {w:?}");
    }
    assert!(!reason.contains('\n'), "one line: {reason:?}");
    assert_eq!(
        setup.agent.leftovers(),
        Vec::<String>::new(),
        "{label}: nothing in the agent's storage"
    );
    assert_eq!(
        processes_mentioning(&setup.agent.storage),
        Vec::<String>::new(),
        "{label}: no QEMU started"
    );
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_is_never_the_sources_choice() {
    let setup = agent();
    for argv0 in [
        "sh",
        "/bin/sh",
        "/tmp/x/../../bin/qemu-img",
        "qemu-system-x86_64;sh",
    ] {
        assert_refused(&setup, vm(argv0, &[]), &["qemu-system-ARCH"]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_that_reach_the_host_are_refused_before_anything_is_created() {
    let setup = agent();
    let marker = setup.root.join("marker");
    let script = setup.root.join("marker-script");
    std::fs::write(&script, format!("#!/bin/sh\ntouch {}\n", marker.display())).expect("script");
    let tap = format!("tap,id=n0,script={},downscript=no", script.display());
    let escape = format!("{}/escape", setup.allowed.display());
    let dotdot = format!("{}/../secret", setup.allowed.display());
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["-netdev", &tap],
            vec!["-netdev tap", "no mapping of host networks"],
        ),
        (vec!["-nic", "tap,model=virtio-net-pci"], vec!["-nic tap"]),
        (
            vec!["-netdev", "user,id=n,hostfwd=tcp::2222-:22"],
            vec!["-netdev user", "hostfwd"],
        ),
        (
            vec!["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"],
            vec!["guestfwd"],
        ),
        (
            vec!["-device", "loader,file=/etc/shadow,addr=0x1000"],
            vec!["-device loader"],
        ),
        (
            vec!["-device", r#"{"driver":"e1000","romfile":"/etc/shadow"}"#],
            vec!["-device {", "romfile"],
        ),
        (
            vec!["-object", "secret,id=s,file=/etc/shadow"],
            vec!["-object secret", "file="],
        ),
        (
            vec![
                "-object",
                r#"{"qom-type":"memory-backend-file","id":"m","size":1048576,"mem-path":"/dev/shm/x"}"#,
            ],
            vec!["-object {", "backed by a file"],
        ),
        (
            vec![
                "-chardev",
                "socket,id=c,host=0.0.0.0,port=4444,server=on,wait=off",
            ],
            vec!["-chardev socket", "TCP"],
        ),
        (vec!["-serial", "/dev/ttyS0"], vec!["-serial /dev/ttyS0"]),
        (vec!["-serial", "stdio"], vec!["-serial stdio"]),
        (vec!["-display", "gtk"], vec!["-display gtk"]),
        (vec!["-vnc", "0.0.0.0:0"], vec!["-vnc 0.0.0.0:0"]),
        (vec!["-plugin", "/tmp/evil.so"], vec!["-plugin"]),
        (vec!["-set", "device.x.romfile=/etc/shadow"], vec!["-set"]),
        (
            vec!["-global", "e1000.romfile=/etc/shadow"],
            vec!["-global"],
        ),
        (vec!["-readconfig", "/etc/qemu.conf"], vec!["-readconfig"]),
        (vec!["-pflash", "/etc/shadow"], vec!["-pflash"]),
        (
            vec!["-fw_cfg", "name=opt/x,file=/etc/shadow"],
            vec!["-fw_cfg"],
        ),
        (
            vec![
                "-drive",
                "if=none,id=x,file.driver=file,file.filename=/etc/shadow",
            ],
            vec!["-drive", "file.driver"],
        ),
        (
            vec!["-machine", "pc,dumpdtb=/etc/passwd"],
            vec!["-machine", "dumpdtb"],
        ),
        (
            vec!["-frobnicate", "x"],
            vec!["-frobnicate", "does not know"],
        ),
        (
            vec!["-kernel", "/etc/shadow"],
            vec!["-kernel /etc/shadow", "--allow-path"],
        ),
        (vec!["-bios", &escape], vec!["-bios", "--allow-path"]),
        (vec!["-initrd", &dotdot], vec!["-initrd", "--allow-path"]),
    ];
    for (extra, words) in cases {
        assert_refused(&setup, vm("qemu-system-x86_64", &extra), &words).await;
    }
    // The tap script never ran, not even later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !marker.exists(),
        "the source's script ran on the destination"
    );
}

/// Outside the allowed directories and missing get the same answer: the agent is no oracle for
/// what exists on its host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_outside_and_missing_get_the_same_answer() {
    let setup = agent();
    let secret = setup.root.join("secret").display().to_string();
    let missing = setup.root.join("no-such-file").display().to_string();
    let a = assert_refused(
        &setup,
        vm("qemu-system-x86_64", &["-kernel", &secret]),
        &["-kernel"],
    )
    .await;
    let b = assert_refused(
        &setup,
        vm("qemu-system-x86_64", &["-kernel", &missing]),
        &["-kernel"],
    )
    .await;
    assert_eq!(a.replace(&secret, "PATH"), b.replace(&missing, "PATH"));
    // Inside: accepted (the dry run passes; the agent prepares storage).
    let bios = format!("{}/bios.bin", setup.allowed.display());
    let mut peer = Peer::connect(&setup.agent.addr).await;
    match peer
        .prepare(vm("qemu-system-x86_64", &["-bios", &bios]))
        .await
    {
        AgentMessage::Prepared { .. } => {}
        other => panic!("an allowed firmware file must be accepted: {other:?}"),
    }
}

/// Once prepared, the agent's NBD server lists nothing: the export names stay secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_list_on_the_agents_nbd_port_shows_nothing() {
    let setup = agent();
    let mut peer = Peer::connect(&setup.agent.addr).await;
    let (port, exports) = match peer.prepare(vm("qemu-system-x86_64", &[])).await {
        AgentMessage::Prepared {
            nbd_port, exports, ..
        } => (nbd_port, exports),
        other => panic!("expected prepared, got {other:?}"),
    };
    let (_, text) = run_output("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
    for e in &exports {
        assert!(!text.contains(&e.export), "export name leaked: {text}");
    }
    // Only the source's address is served: another one (127.0.0.2 is loopback too) gets no
    // greeting, just a close.
    let stranger =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let from: std::net::SocketAddr = "127.0.0.2:0".parse().expect("address");
    stranger.bind(&from.into()).expect("bind 127.0.0.2");
    let to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    stranger.connect(&to.into()).expect("connect");
    let mut stranger: std::net::TcpStream = stranger.into();
    stranger
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut first = Vec::new();
    let closed = std::io::Read::read_to_end(&mut stranger, &mut first);
    assert!(
        closed.is_ok() && first.is_empty(),
        "a stranger got {} bytes ({closed:?})",
        first.len()
    );
    let dir = std::fs::read_dir(&setup.agent.storage)
        .expect("storage")
        .flatten()
        .next()
        .expect("a migration directory")
        .path();
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions())
            & 0o777
    };
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("disk-vda.raw")), 0o600);
    // An abort removes everything.
    protocol::write_message(
        &mut peer.wr,
        &SourceMessage::Abort {
            reason: "test over".into(),
        },
    )
    .await
    .expect("abort");
    let mut left = setup.agent.leftovers();
    for _ in 0..50 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = setup.agent.leftovers();
    }
    assert_eq!(left, Vec::<String>::new());
}

/// `StartDestination` names how many RAM stream connections both QEMUs open; outside 1 to 16 the
/// agent refuses with the allowed range and removes the migration it had prepared, before any
/// QEMU starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ram_stream_counts_outside_1_to_16_are_refused_and_leave_nothing() {
    let setup = agent();
    for parallel in [0u32, 17] {
        let mut peer = Peer::connect(&setup.agent.addr).await;
        match peer.prepare(vm("qemu-system-x86_64", &[])).await {
            AgentMessage::Prepared { .. } => {}
            other => panic!("expected prepared, got {other:?}"),
        }
        assert_ne!(
            setup.agent.leftovers(),
            Vec::<String>::new(),
            "Prepare creates the migration's directory"
        );
        let start = SourceMessage::StartDestination {
            parallel,
            prealloc_ram: false,
        };
        protocol::write_message(&mut peer.wr, &start)
            .await
            .expect("start destination");
        let reason = match protocol::read_message(&mut peer.rd)
            .await
            .expect("the agent answers")
        {
            AgentMessage::Refused { reason } => reason,
            other => panic!("parallel {parallel}: expected a refusal, got {other:?}"),
        };
        assert!(
            reason.contains(&format!("{parallel} RAM stream connections"))
                && reason.contains("1 to 16"),
            "parallel {parallel}: {reason:?} should name the count and the allowed range"
        );
        assert!(!reason.contains('\n'), "one line: {reason:?}");
        wait_until(
            "the agent's storage empties",
            Duration::from_secs(10),
            || setup.agent.leftovers().is_empty(),
        );
        assert_eq!(
            processes_mentioning(&setup.agent.storage),
            Vec::<String>::new(),
            "parallel {parallel}: no QEMU started"
        );
    }
}

/// The agent's NBD server serves the source QEMU, which holds this migration's client
/// certificate, and nobody else: plaintext clients and clients without the certificate are
/// refused, the one with it reads the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_clients_without_the_migrations_certificate_are_refused() {
    let setup = agent();
    let mut peer = Peer::connect(&setup.agent.addr).await;
    let (port, exports, bundle) = match peer.prepare(vm("qemu-system-x86_64", &[])).await {
        AgentMessage::Prepared {
            nbd_port,
            exports,
            tls,
            ..
        } => (
            nbd_port,
            exports,
            tls.expect("a TLS migration gets certificates"),
        ),
        other => panic!("expected prepared, got {other:?}"),
    };
    let export = &exports[0].export;
    let run = |cmd: &mut std::process::Command| {
        let out = cmd.output().expect("run the NBD client");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // Plaintext: the server insists on TLS.
    let (ok, text) =
        run(std::process::Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/{export}")));
    assert!(!ok, "plaintext nbdinfo got in: {text}");
    assert!(text.to_lowercase().contains("tls"), "{text}");
    let (ok, text) = run(std::process::Command::new("qemu-img")
        .args(["info", &format!("nbd://127.0.0.1:{port}/{export}")]));
    assert!(!ok, "plaintext qemu-img got in: {text}");
    // TLS with a certificate of another CA (the agent's server certificate is checked, but
    // the client's is not this migration's): refused.
    let stranger = ferry::tls::migration::MigrationCredentials::generate().expect("creds");
    let mut other = stranger.client_bundle();
    other.ca_cert = bundle.ca_cert.clone();
    let qemu_img_with = |dir: &Path| {
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["info", "--object"])
            .arg(format!(
                "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                dir.display()
            ))
            .args(["--image-opts"])
            .arg(format!(
                "driver=nbd,host=127.0.0.1,port={port},export={export},tls-creds=tls0,tls-hostname={}",
                bundle.hostname
            ));
        cmd
    };
    let other_dir = setup.root.join("other-creds");
    other.write_qemu_dir(&other_dir).expect("write creds");
    let (ok, text) = run(&mut qemu_img_with(&other_dir));
    assert!(!ok, "a certificate of another CA got in: {text}");
    // With this migration's certificate: the disk is there (1 MiB).
    let own_dir = setup.root.join("own-creds");
    bundle.write_qemu_dir(&own_dir).expect("write creds");
    let (ok, text) = run(&mut qemu_img_with(&own_dir));
    assert!(
        ok && text.contains("1 MiB"),
        "the source's certificate must work: {text}"
    );
}

/// `--require-tls`: a source asking for plaintext disks and RAM is refused with the fix, and
/// nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_requires_tls_refuses_an_insecure_source() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let storage = tmp.path().join("storage");
    let agent = FERRY.agent_bare(&storage, &token, &["--require-tls".as_ref()]);
    let mut peer = Peer::connect(&agent.addr).await;
    match peer
        .prepare_with(vm("qemu-system-x86_64", &[]), false)
        .await
    {
        AgentMessage::Refused { reason } => assert!(
            reason.contains("--require-tls") && reason.contains("without --insecure"),
            "{reason}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_dir(&storage).expect("storage").count(),
        0,
        "nothing may be created"
    );
    // The same agent takes an encrypted migration.
    let mut peer = Peer::connect(&agent.addr).await;
    match peer.prepare(vm("qemu-system-x86_64", &[])).await {
        AgentMessage::Prepared { tls: Some(_), .. } => {}
        other => panic!("expected prepared with certificates, got {other:?}"),
    }
}

#[test]
fn a_token_file_others_can_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = FERRY
        .command()
        .args(["agent", "--listen", "127.0.0.1:0", "--storage"])
        .arg(tmp.path())
        .arg("--token-file")
        .arg(&token)
        .output()
        .expect("ferry agent");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("chmod 600 {}", token.display())),
        "{stderr}"
    );
}

/// A real source QEMU that runs fine with a TCP chardev: `ferry migrate` reports the agent's
/// refusal naming it, the guest keeps running on the source, nothing is left on the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_source_with_a_tcp_chardev_is_refused_and_keeps_running() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let image = tmp.path().join("vda.raw");
    raw_image(&image, 64 << 20, 0);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut spec = ferry_testkit::GuestSpec::new(guest_images()).disk(disk(
        &image,
        ferry_testkit::ImageFormat::Raw,
        "vda",
    ));
    spec.extra_qemu_args = [
        "-chardev",
        &format!("socket,id=dbg,host=127.0.0.1,port={port},server=on,wait=off"),
    ]
    .iter()
    .map(Into::into)
    .collect();
    let guest = boot_spec(
        &tmp.path().join("src"),
        &spec,
        Path::new(ferry_testkit::DEFAULT_QEMU),
    )
    .await;
    let agent = FERRY.agent(&tmp.path().join("storage"), &token, &[]);
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_eq!(run.code, 1, "{:?}", run.events.last());
    let error = run.last()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("-chardev socket"), "{error}");
    assert!(error.contains("TCP"), "{error}");
    assert_eq!(run.last()["source_running"], serde_json::Value::Bool(true));
    still_acking(guest.serial_log(), "vda", 5).await;
    assert_eq!(agent.leftovers(), Vec::<String>::new());
}

/// Idle connections that never authenticate, more than there are places for, do not keep a real
/// source out: the oldest pending handshake gives way to a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_unauthenticated_connections_do_not_stop_a_real_migration() {
    let mut setup = OneDisk::boot(TOKEN, 64 << 20, 4, 50).await;
    let agent = setup.agent(FERRY, &[]);
    let (token, guest) = (setup.token.clone(), &mut setup.guest);
    let idle: Vec<std::net::TcpStream> = (0..80)
        .map(|_| std::net::TcpStream::connect(&agent.addr).expect("an idle connection"))
        .collect();
    let run = FERRY.migrate(guest.qmp_socket(), &agent.addr, &token);
    assert_eq!(run.code, 0, "{:?}\n{}", run.events.last(), run.stderr);
    drop(idle);
    assert_on_destination(guest, &token, &agent).await;
}
