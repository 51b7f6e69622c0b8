//! Encryption end to end (issue 11): what crosses the network, seen from outside.
//!
//! - The control handshake is bound to its TLS session: a relay that terminates TLS on both
//!   sides and forwards every byte does not get through, and a plaintext (older) source is told
//!   which side to upgrade.
//! - A whole migration of the test guest to a destination in its own network namespace, with a
//!   packet capture of the link: a marker written on the guest's disk beforehand and one in its
//!   RAM (the kernel command line) never appear in the captured bytes; with `--insecure` both
//!   do, so the check can fail.
//! - Strangers on the agent's NBD and RAM ports during a migration (no client certificate,
//!   plaintext, idle connections) get nothing, and the migration completes through them.

use std::path::Path;
use std::process::{Command, Stdio};

use ferry::migrate::control::{self, AgentAuth, AgentLink, ControlError};
use ferry::protocol::{self, AgentMessage, SourceMessage};
use ferry_harness::*;
use ferry_testkit::ImageFormat;

const FERRY: Ferry = Ferry::new(env!("CARGO_BIN_EXE_ferry"));

const TOKEN: &str = "tls-test-token-0123456789abcdef";

fn auth() -> AgentAuth {
    AgentAuth::with_token(TOKEN.as_bytes().to_vec())
}

/// A man in the middle with its own certificate towards the source and its own TLS session to
/// the agent, forwarding the plaintext between them: the proofs, bound to each session's
/// exporter value, do not verify across it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_control_handshake_fails_authentication() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let agent = FERRY.agent_bare(&tmp.path().join("storage"), &token, &[]);

    let (identity, _) =
        ferry::tls::Identity::load_or_create(&tmp.path().join("relay")).expect("relay identity");
    let acceptor = tokio_rustls::TlsAcceptor::from(
        ferry::tls::server_config(&identity, None).expect("relay TLS"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("relay listens");
    let relay = listener.local_addr().expect("relay address").to_string();
    let agent_addr = agent.addr.clone();
    let relaying = tokio::spawn(async move {
        let (tcp, _) = listener
            .accept()
            .await
            .expect("the source reaches the relay");
        let mut source = acceptor.accept(tcp).await.expect("TLS with the source");
        let tls = ferry::tls::client_config(None, None).expect("TLS config");
        let (mut agent, _) = control::dial(&agent_addr, &tls)
            .await
            .expect("TLS with the agent");
        let _ = tokio::io::copy_bidirectional(&mut source, &mut agent).await;
    });

    let error = match AgentLink::connect(&relay, &auth()).await {
        Ok(_) => panic!("a relayed handshake authenticated"),
        Err(e) => e,
    };
    let text = error.to_string();
    assert!(
        matches!(error, ControlError::Refused(_)) && text.contains("authentication failed"),
        "{text}"
    );
    relaying.abort();
    // The same source straight to the agent gets through: the relay was the only difference.
    AgentLink::connect(&agent.addr, &auth())
        .await
        .map(|_| ())
        .expect("a direct connection authenticates");
}

/// A source of protocol version 2 spoke plaintext: it gets a plaintext refusal it can print,
/// naming the side to upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_source_is_told_to_upgrade() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let agent = FERRY.agent_bare(&tmp.path().join("storage"), &token, &[]);
    let stream = tokio::net::TcpStream::connect(&agent.addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = stream.into_split();
    let hello = SourceMessage::Hello {
        versions: vec![2],
        software: "ferry 0.0.9".into(),
    };
    protocol::write_message(&mut wr, &hello)
        .await
        .expect("hello");
    match protocol::read_message(&mut rd).await.expect("an answer") {
        AgentMessage::Refused { reason } => {
            assert!(
                reason.contains("upgrade ferry on the source")
                    && reason.contains("ferry 0.0.9")
                    && reason.contains("[2]"),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A guest whose disk holds `disk_marker` (near its end, where the workload never writes) and
/// whose RAM holds `ram_marker` (kernel command line words), migrated to an agent in `ns` while
/// tcpdump captures the link. Returns the capture.
async fn captured_migration(
    ns: &Netns,
    extra: &[&str],
    disk_marker: &str,
    ram_marker: &str,
) -> Vec<u8> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let token = token_file(tmp.path(), TOKEN);
    let image = tmp.path().join("vda.raw");
    let size = 64 << 20;
    raw_image(&image, size, 8);
    {
        use std::os::unix::fs::FileExt;
        let block = disk_marker.repeat((256 << 10) / disk_marker.len());
        std::fs::File::options()
            .write(true)
            .open(&image)
            .expect("image")
            .write_all_at(block.as_bytes(), size - (1 << 20))
            .expect("write the disk marker");
    }
    let mut spec =
        ferry_testkit::GuestSpec::new(guest_images()).disk(disk(&image, ImageFormat::Raw, "vda"));
    spec.extra_kernel_args = (0..8)
        .map(|i| format!("ferry.mark{i}={ram_marker}"))
        .collect();
    let guest = boot_spec(
        &tmp.path().join("src"),
        &spec,
        Path::new(ferry_testkit::DEFAULT_QEMU),
    )
    .await;

    let storage = tmp.path().join("storage");
    let agent = FERRY.spawn_agent_in(
        Some(&ns.name),
        &storage,
        &token,
        &format!("{}:0", ns.dest_ip),
        &[],
        &[],
    );
    let pcap = tmp.path().join("link.pcap");
    let mut tcpdump = Command::new("tcpdump")
        .args([
            "-i",
            &ns.host_if,
            "-s",
            "0",
            "-B",
            "65536",
            "-U",
            "-n",
            "-w",
        ])
        .arg(&pcap)
        .args(["host", &ns.dest_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump (scripts/setup installs it)");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(tcpdump.stderr.as_mut().expect("tcpdump stderr"))
            .read_line(&mut line)
            .expect("tcpdump says it listens");
        assert!(line.contains("listening on"), "tcpdump: {line}");
    }

    let run = FERRY.migrate_with(guest.qmp_socket(), &agent.addr, &token, extra);
    let _ = Command::new("kill")
        .args(["-INT", &tcpdump.id().to_string()])
        .status();
    let _ = tcpdump.wait();
    assert_eq!(run.code, 0, "migration failed: {}", run.stderr);
    let done = run.last();
    assert_eq!(done["event"], "completed", "{done}");
    assert_eq!(done["encrypted"], extra.is_empty(), "{done}");
    let dest_qmp = done["destination"]["qmp"]
        .as_str()
        .expect("destination QMP");
    quit(Path::new(dest_qmp)).await;
    drop(agent);
    let captured = std::fs::read(&pcap).expect("the capture");
    // Sanity: the capture holds the migration (the disk's data alone is 8 MiB).
    assert!(
        captured.len() > 8 << 20,
        "captured only {} bytes",
        captured.len()
    );
    captured
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_disk_nor_ram_crosses_the_link_in_the_clear() {
    let ns = Netns::create(11);
    let id = protocol::new_nonce();
    let (disk_marker, ram_marker) = (
        format!("FERRYDISK{}", &id[..16]),
        format!("FERRYRAM{}", &id[16..32]),
    );

    let encrypted = captured_migration(&ns, &[], &disk_marker, &ram_marker).await;
    assert!(
        !contains(&encrypted, &disk_marker),
        "the disk marker crossed in the clear"
    );
    assert!(
        !contains(&encrypted, &ram_marker),
        "the RAM marker crossed in the clear"
    );

    let clear = captured_migration(&ns, &["--insecure"], &disk_marker, &ram_marker).await;
    assert!(
        contains(&clear, &disk_marker),
        "--insecure: the disk marker must be visible (else this check proves nothing)"
    );
    assert!(
        contains(&clear, &ram_marker),
        "--insecure: the RAM marker must be visible (else this check proves nothing)"
    );
}

/// The link goes down between two of the RAM stream's connections (the multifd channels open
/// one after another while the RAM already flows): the relay finds no route to the agent and
/// waits the cut out, as TCP does under a connection that is open, and the migration completes
/// on the destination. Without that patience the open failed at once with "Network is
/// unreachable" and the migration went back to the source (CI, fault matrix: RAM / link down 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_while_the_ram_connections_open_is_waited_out() {
    let ns = Netns::create(12);
    let mut setup = OneDisk::boot(TOKEN, 64 << 20, 4, 50).await;
    let storage = setup.tmp.path().join("storage");
    let agent = FERRY.spawn_agent_in(
        Some(&ns.name),
        &storage,
        &setup.token,
        &format!("{}:0", ns.dest_ip),
        &[],
        &[],
    );
    let held = FERRY.held_migrate_with(
        setup.guest.qmp_socket(),
        &agent.addr,
        &setup.token,
        "source-ram-channel:1",
        setup.tmp.path(),
        &["--parallel", "4"],
    );
    held.wait_held();
    // Down for 4 s from the first multifd channel's hold of 1 s: its open finds no route.
    let cut = ns.partition(4);
    let (code, said) = held.wait();
    cut.join().expect("partition thread");
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("holding at source-ram-channel"), "{said}");
    assert_on_destination(&mut setup.guest, &setup.token, &agent).await;
}

/// The agent's listening ports other than its control port, from `ss`.
fn data_ports(agent: &AgentProc) -> Vec<u16> {
    let out = Command::new("ss")
        .args(["-Htlnp"])
        .output()
        .expect("ss (iproute2)");
    let control: u16 = agent
        .addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("control port");
    let pid = format!("pid={},", agent.child.id());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&pid))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .filter(|p| *p != control)
        .collect()
}

/// While `ferry migrate` waits to start the RAM stream (the destination listens, the disks are
/// in sync and still served), strangers try the agent's NBD port (plaintext nbdinfo, idle
/// connections) and its RAM port (TLS without the migration's client certificate, idle
/// connections, more than the agent lets wait): none gets a byte of the VM, and the migration
/// completes through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_on_the_nbd_and_ram_ports_get_nothing_and_the_migration_completes() {
    use tokio::io::AsyncReadExt;
    let mut setup = OneDisk::boot(TOKEN, 64 << 20, 4, 50).await;
    let agent = setup.agent(FERRY, &[]);
    let held = FERRY.held_migrate(
        setup.guest.qmp_socket(),
        &agent.addr,
        &setup.token,
        "source-ram:10",
        setup.tmp.path(),
    );
    held.wait_held();
    let ports = data_ports(&agent);
    assert_eq!(ports.len(), 2, "the NBD and the RAM port: {ports:?}");
    let mut idle = Vec::new();
    let (mut nbd, mut ram) = (None, None);
    for port in ports {
        for _ in 0..24 {
            idle.push(std::net::TcpStream::connect(("127.0.0.1", port)).expect("idle"));
        }
        // The NBD server greets first; the RAM listener waits for a TLS client hello.
        let mut probe = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("probe");
        let mut magic = [0u8; 8];
        let greeted = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            probe.read_exact(&mut magic),
        )
        .await;
        if matches!(greeted, Ok(Ok(_))) && &magic == b"NBDMAGIC" {
            nbd = Some(port);
        } else {
            ram = Some(port);
        }
    }
    let (nbd, ram) = (nbd.expect("an NBD port"), ram.expect("a RAM port"));

    let text = run_fails(
        "nbdinfo",
        &[&format!("nbd://127.0.0.1:{nbd}/a-guessed-export")],
    );
    assert!(!text.contains("export-size"), "{text}");

    let no_cert = tokio_rustls::TlsConnector::from(
        ferry::tls::client_config(None, None).expect("client config"),
    );
    let name =
        rustls::pki_types::ServerName::try_from(ferry::tls::migration::TLS_HOSTNAME).expect("name");
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", ram))
        .await
        .expect("connect");
    if let Ok(mut stranger) = no_cert.connect(name, tcp).await {
        let mut byte = [0u8; 1];
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(5), stranger.read(&mut byte)).await;
        assert!(
            !matches!(read, Ok(Ok(1))),
            "a RAM client without the certificate was answered"
        );
    }

    let (code, said) = held.wait();
    assert_eq!(code, 0, "the migration must complete: {said}");
    drop(idle);
    assert_on_destination(&mut setup.guest, &setup.token, &agent).await;
}
