//! `ferry demo`: a real live migration on this machine, both ends on localhost.
//!
//! It starts an agent in-process on 127.0.0.1 in a temporary directory, boots the test guest with
//! two disks (a raw one holding data and a qcow2 one), waits until the guest acknowledges writes
//! on both, migrates it with live progress, proves from outside that no acknowledged write was lost
//! (source and destination consoles against the destination images), and prints the figures.
//! Everything it started is stopped and its directory removed at the end, success or not.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::policy::Policy;
use crate::agent::{Agent, AgentConfig};
use crate::human_bytes;
use crate::migrate::report::{HumanReporter, Progress, Reporter, Summary};
use crate::migrate::{migrate, MigrateOptions};
use ferry_testkit::{self as guest, Acks, DiskSpec, GuestImages, GuestSpec, ImageFormat};

/// The demo's disks: (guest name, file name, format, size, MiB of data written before boot).
const DISKS: &[(&str, &str, ImageFormat, u64, u64)] = &[
    ("vda", "vda.raw", ImageFormat::Raw, 1 << 30, 128),
    ("vdb", "vdb.qcow2", ImageFormat::Qcow2, 512 << 20, 0),
];

/// Runs the demo; the error is one line for the operator.
pub async fn run(qemu: &Path, cancel: &CancellationToken) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
    say(&format!("working in {}", tmp.path().display()));
    let result = run_in(tmp.path(), qemu, cancel).await;
    // Whatever happened: no QEMU of ours keeps running (the destination runs detached).
    if let Ok(pid) = std::fs::read_to_string(tmp.path().join("destination.pid")) {
        if let Ok(pid) = pid.trim().parse() {
            crate::agent::destination::kill_pid(pid);
        }
    }
    result
}

async fn run_in(dir: &Path, qemu: &Path, cancel: &CancellationToken) -> anyhow::Result<()> {
    // The destination: an agent on an ephemeral localhost port with a fresh token.
    let token = crate::protocol::new_nonce().into_bytes();
    let storage = dir.join("destination");
    std::fs::create_dir(&storage)?;
    // The agent runs the demo's QEMU and may load the test guest's kernel and initrd.
    let images = GuestImages::locate()?;
    let guest_dir: Vec<PathBuf> = images
        .kernel
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    let agent = Agent::bind(AgentConfig {
        listen: "127.0.0.1:0".parse()?,
        storage: storage.clone(),
        token: token.clone(),
        policy: Policy::new(&[qemu.to_path_buf()], &guest_dir)?,
        recover_window: std::time::Duration::from_secs(60),
        // A throwaway identity: the demo's agent lives as long as the demo.
        tls: crate::tls::server_config(
            &crate::tls::Identity::load_or_create(&dir.join("agent-state"))?.0,
            None,
        )?,
        require_tls: true,
        max_migrations: crate::agent::DEFAULT_MAX_MIGRATIONS.into(),
        space_check: crate::agent::space::SpaceCheck::Full,
        metrics: None,
        xl_binary: "xl".into(),
    })
    .await?;
    let agent_addr = agent.local_addr()?;
    let stop_agent = CancellationToken::new();
    tokio::spawn(agent.run(stop_agent.clone()));
    say(&format!(
        "agent listening on {agent_addr}, storing into {}",
        storage.display()
    ));

    // The source: the test guest with two disks, writing.
    let source_dir = dir.join("source");
    let mut spec = GuestSpec::new(images);
    for (name, file, format, size, data_mib) in DISKS {
        let path = source_dir.join(file);
        std::fs::create_dir_all(&source_dir)?;
        make_image(&path, *format, *size, *data_mib)?;
        spec = spec.disk(DiskSpec::new(path, *format, *name));
    }
    let mut source = guest::launch(&source_dir, &spec, qemu).await?;
    for (name, ..) in DISKS {
        source
            .wait_for_acks(name, 20, Duration::from_secs(120))
            .await?;
    }
    say(&format!(
        "guest booted (pid {}), acknowledging writes on vda and vdb",
        source.pid()
    ));

    // The migration.
    let opts = MigrateOptions::new(
        source.qmp_socket().to_path_buf(),
        agent_addr.to_string(),
        crate::migrate::control::AgentAuth::with_token(token),
    );
    let mut reporter = Tee {
        human: HumanReporter::default(),
        summary: None,
    };
    let outcome = migrate(&opts, &mut reporter, cancel).await;
    stop_agent.cancel();
    let summary = outcome
        .map_err(|f| anyhow::anyhow!("migration failed during {}: {}", f.phase, f.line()))?;
    std::fs::write(
        dir.join("destination.pid"),
        summary.destination.pid.to_string(),
    )?;

    // Proof from outside.
    let migration_dir = Path::new(&summary.destination.qmp)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no destination directory"))?;
    let dest_serial = migration_dir.join("serial.log");
    let mut acks = Acks::parse(&std::fs::read_to_string(source.serial_log())?);
    let before = DISKS.iter().map(|(n, ..)| acks.count(n)).sum::<usize>();
    for (name, ..) in DISKS {
        guest::wait_for_acks(&dest_serial, name, 20, Duration::from_secs(60)).await?;
    }
    say("guest keeps acknowledging writes on the destination");
    quit_destination(&summary).await;
    acks.merge(&Acks::parse(&std::fs::read_to_string(&dest_serial)?));
    let mut proof = String::new();
    for (name, ..) in DISKS {
        let image = migration_dir.join(crate::agent::storage::image_file_name(name));
        let report = guest::verify_disk(&image, ImageFormat::Raw, name, acks.seqs(name))?;
        let _ = write!(
            proof,
            " {name}: {} acknowledged records present;",
            report.acked
        );
    }
    say(&format!(
        "verified on the destination images:{} ({before} acknowledged before the switchover)",
        proof.trim_end_matches(';')
    ));
    print_figures(&summary);
    Ok(())
}

/// Progress to the terminal, and the summary kept for the figures.
struct Tee {
    human: HumanReporter,
    summary: Option<Summary>,
}

impl Reporter for Tee {
    fn report(&mut self, event: &Progress) {
        self.human.report(event);
        if let Progress::Completed(s) = event {
            self.summary = Some(s.clone());
        }
    }
}

fn make_image(path: &Path, format: ImageFormat, size: u64, data_mib: u64) -> anyhow::Result<()> {
    match format {
        ImageFormat::Raw => ferry_testkit::disk::raw_image(path, size, data_mib)?,
        ImageFormat::Qcow2 => ferry_testkit::disk::qcow2_image(path, size)?,
    }
    Ok(())
}

async fn quit_destination(summary: &Summary) {
    let path = PathBuf::from(&summary.destination.qmp);
    if let Ok(q) = qmp::Qmp::connect_unix(&path).await {
        let _ = q.execute_raw("quit", serde_json::Value::Null).await;
    }
}

fn print_figures(s: &Summary) {
    let p = &s.phases_ms;
    println!();
    println!("ferry demo: live migration of a 2-disk VM on localhost");
    println!(
        "  total time             {:>8.2} s",
        s.total_ms as f64 / 1000.0
    );
    println!(
        "    negotiation {} ms, mirror {} ms, ram {} ms, switchover {} ms",
        p.negotiation, p.mirror, p.ram, p.switchover
    );
    match s.downtime_ms {
        Some(d) => println!("  downtime (QEMU)        {d:>8} ms"),
        None => println!("  downtime (QEMU)        unknown"),
    }
    if let Some(d) = s.stop_to_resume_ms {
        println!("  STOP to RESUME         {d:>8.1} ms");
    }
    println!("  disk bytes sent        {:>12}", human_bytes(s.disk_bytes));
    println!("  RAM bytes sent         {:>12}", human_bytes(s.ram_bytes));
    println!(
        "  destination allocation {:>12}",
        human_bytes(s.destination_allocated_bytes)
    );
}

fn say(line: &str) {
    println!("demo: {line}");
}
