//! The reference migration: what libvirt's `virsh migrate --live --copy-storage-all` asks of QEMU,
//! done here by hand with the qmp crate, against the same guest and QEMU options as ferry's run.
//!
//! ```text
//!  destination QEMU (-incoming defer -S)        source QEMU
//!  migrate-set-capabilities late-block-activate,
//!    return-path
//!  nbd-server-start 127.0.0.1:P
//!  block-export-add nbd vda writable
//!  migrate-incoming tcp:127.0.0.1:0
//!                                               blockdev-add nbd (discard/detect-zeroes unmap)
//!                                               blockdev-mirror sync=full ... BLOCK_JOB_READY
//!                                               migrate-set-capabilities events, pause-before-switchover,
//!                                                 return-path (libvirt sets it on every migration
//!                                                 that is not tunnelled)
//!                                               migrate-set-parameters max-bandwidth 0 (unlimited,
//!                                                 libvirt's default)
//!                                               migrate tcp:... ... MIGRATION pre-switchover
//!                                               block-job-cancel (final sync) ... BLOCK_JOB_COMPLETED
//!                                               migrate-continue ... MIGRATION completed
//!  (incoming completed) nbd-server-stop, cont   blockdev-del, quit
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_testkit::{self as guest, DiskSpec, ImageFormat};
use serde_json::{json, Value};

use crate::acks::AckWatch;
use crate::link::Link;
use crate::migration::{boot_source, finish_acks, quit, verify, MigrationRun, Setup};
use crate::mirror::wait_job;
use crate::servers::free_port;

/// Runs the QEMU-only migration of a freshly booted guest; with `tls`, the NBD connection and
/// the migration stream use one migration's x509 credentials (as libvirt's `--tls` does), with
/// the same cipher priority ferry gives QEMU. With `link`, the destination QEMU runs in its
/// namespace and everything goes through the shaped link.
pub async fn run(
    dir: &Path,
    setup: &Setup,
    tls: bool,
    link: Option<&Link>,
) -> Result<MigrationRun> {
    let mut run = MigrationRun {
        flow: if tls { "native --tls" } else { "native" }.into(),
        ..Default::default()
    };
    let source = boot_source(dir, setup).await?;
    run.disk_bytes = crate::image::allocated(&dir.join("vda.raw"))?;
    let watch = AckWatch::start(source.guest.serial_log().to_path_buf(), "vda");
    // A second of the guest's normal rhythm before anything happens.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dest_image = dir.join("dest-vda.raw");
    let started = Instant::now();
    let ctx = Ctx {
        dir,
        setup,
        source: &source,
        dest_image: &dest_image,
        watch: &watch,
        tls,
        link,
    };
    let result = steps(&ctx, &mut run).await;
    let (switch_at, done_at, dest) = match result {
        Ok(marks) => marks,
        Err(e) => {
            run.error = Some(format!("{e:#}"));
            (None, None, None)
        }
    };
    if run.completed {
        run.total_s = done_at.map_or(0.0, |d| (d - started).as_secs_f64());
    }
    finish_acks(&mut run, watch, started, switch_at, done_at).await;
    if let Some(dest) = &dest {
        quit(dest.qmp_socket()).await;
    }
    drop(dest);
    if run.completed {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let mut acks = guest::Acks::parse(&read(source.guest.serial_log()));
        acks.merge(&guest::Acks::parse(&read(&dir.join("dst/serial.log"))));
        run.acks_verified = Some(verify(&dest_image, acks.seqs("vda"))?);
    }
    Ok(run)
}

/// When the switchover started, when the guest ran again, and the destination QEMU.
type Marks = (
    Option<Instant>,
    Option<Instant>,
    Option<guest::RunningGuest>,
);

/// What the steps work with.
struct Ctx<'a> {
    dir: &'a Path,
    setup: &'a Setup,
    source: &'a crate::migration::Source,
    dest_image: &'a Path,
    watch: &'a AckWatch,
    tls: bool,
    link: Option<&'a Link>,
}

async fn steps(ctx: &Ctx<'_>, run: &mut MigrationRun) -> Result<Marks> {
    let Ctx {
        dir,
        setup,
        source,
        dest_image,
        watch,
        tls,
        link,
    } = *ctx;
    let host = link.map_or("127.0.0.1", |l| l.dest_ip.as_str());
    // libvirt pre-creates the destination image (sparse, same size) and starts QEMU paused.
    std::fs::File::create(dest_image)?.set_len(setup.disk)?;
    let mut spec = source.spec.clone();
    spec.disks = vec![DiskSpec::new(dest_image, ImageFormat::Raw, "vda")];
    spec.extra_qemu_args = ["-incoming", "defer", "-S"]
        .iter()
        .map(Into::into)
        .collect();
    let dest_dir = dir.join("dst");
    let qemu = match link {
        Some(link) => in_namespace(dir, link)?,
        None => guest::DEFAULT_QEMU.into(),
    };
    let dest = guest::launch(&dest_dir, &spec, &qemu).await?;
    watch.add(dest.serial_log().to_path_buf());
    let dq = crate::servers::connect_qmp(&dest.qmp_socket().to_path_buf()).await?;
    let sq = qmp::Qmp::connect_unix(source.guest.qmp_socket()).await?;
    let caps = |names: &[&str]| {
        let list: Vec<Value> = names
            .iter()
            .map(|n| json!({"capability": n, "state": true}))
            .collect();
        json!({ "capabilities": list })
    };

    dq.execute_raw(
        "migrate-set-capabilities",
        caps(&["late-block-activate", "return-path"]),
    )
    .await?;
    let tls_object = |endpoint: &str, dir: &Path| {
        json!({"qom-type": "tls-creds-x509", "id": "tls0", "dir": dir.display().to_string(),
               "endpoint": endpoint, "verify-peer": true,
               "priority": ferry::tls::migration::QEMU_TLS_PRIORITY})
    };
    let hostname = ferry::tls::migration::TLS_HOSTNAME;
    if tls {
        let creds = ferry::tls::migration::MigrationCredentials::generate()?;
        let (server_dir, client_dir) = (dir.join("tls-server"), dir.join("tls-client"));
        creds.write_qemu_server_dir(&server_dir)?;
        creds.client_bundle().write_qemu_dir(&client_dir)?;
        dq.execute_raw("object-add", tls_object("server", &server_dir))
            .await
            .context("destination tls-creds-x509")?;
        dq.execute_raw("migrate-set-parameters", json!({"tls-creds": "tls0"}))
            .await?;
        sq.execute_raw("object-add", tls_object("client", &client_dir))
            .await
            .context("source tls-creds-x509")?;
        sq.execute_raw(
            "migrate-set-parameters",
            json!({"tls-creds": "tls0", "tls-hostname": hostname}),
        )
        .await?;
    }
    let nbd_port = free_port()?;
    let mut nbd_args =
        json!({"addr": {"type": "inet", "data": {"host": host, "port": nbd_port.to_string()}}});
    if tls {
        nbd_args["tls-creds"] = json!("tls0");
    }
    dq.execute_raw("nbd-server-start", nbd_args)
        .await
        .context("nbd-server-start")?;
    dq.execute_raw(
        "block-export-add",
        json!({"type": "nbd", "id": "drive-vda", "node-name": "vda", "name": "vda", "writable": true}),
    )
    .await
    .context("block-export-add")?;
    dq.execute_raw("migrate-incoming", json!({"uri": format!("tcp:{host}:0")}))
        .await?;
    let info = dq.execute_raw("query-migrate", Value::Null).await?;
    let ram_port: u16 = info["socket-address"]
        .as_array()
        .and_then(|a| a.iter().find_map(|x| x["port"].as_str()?.parse().ok()))
        .context("destination did not report its incoming port")?;

    // Source: mirror into the destination's own NBD server.
    let mut events = sq.events();
    let mut target = json!({"driver": "nbd", "node-name": "mig-vda", "export": "vda",
           "server": {"type": "inet", "host": host, "port": nbd_port.to_string()},
           "discard": "unmap", "detect-zeroes": "unmap"});
    if tls {
        target["tls-creds"] = json!("tls0");
        target["tls-hostname"] = json!(hostname);
    }
    sq.execute_raw("blockdev-add", target).await?;
    let mirror_start = Instant::now();
    sq.execute_raw(
        "blockdev-mirror",
        json!({"job-id": "mig-vda", "device": "vda", "target": "mig-vda", "sync": "full"}),
    )
    .await?;
    if let Err(e) = wait_job(&mut events, "BLOCK_JOB_READY", setup.mirror_timeout).await {
        let _ = sq
            .execute_raw(
                "block-job-cancel",
                json!({"device": "mig-vda", "force": true}),
            )
            .await;
        bail!("mirror: {e:#}");
    }
    run.mirror_ready_s = Some(mirror_start.elapsed().as_secs_f64());

    // RAM, paused before the switchover so the mirror can finish with the guest stopped.
    sq.execute_raw(
        "migrate-set-capabilities",
        caps(&["events", "pause-before-switchover", "return-path"]),
    )
    .await?;
    // libvirt lifts QEMU's default 128 MiB/s cap on every migration unless told a bandwidth
    // (it sets its maximum); 0 is "no limit" to QEMU, as ferry sets it.
    sq.execute_raw("migrate-set-parameters", json!({"max-bandwidth": 0}))
        .await?;
    sq.execute_raw("migrate", json!({"uri": format!("tcp:{host}:{ram_port}")}))
        .await?;
    let stop_us = wait_migration(&mut events, "pre-switchover").await?;
    let switch_at = Instant::now();
    sq.execute_raw("block-job-cancel", json!({"device": "mig-vda"}))
        .await?;
    wait_job(&mut events, "BLOCK_JOB_COMPLETED", Duration::from_secs(120)).await?;
    sq.execute_raw("migrate-continue", json!({"state": "pre-switchover"}))
        .await?;
    wait_migration(&mut events, "completed").await?;

    // Destination: wait for the incoming side, stop the NBD server, resume.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = dq.execute_raw("query-migrate", Value::Null).await?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => bail!("incoming migration {}", info["status"]),
            _ if Instant::now() > deadline => bail!("incoming migration did not complete"),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let mut dest_events = dq.events();
    dq.execute_raw("nbd-server-stop", Value::Null).await?;
    dq.execute_raw("cont", Value::Null).await?;
    let done_at = Instant::now();
    run.completed = true;
    let resume = dest_events
        .wait_for(|e| e.name == "RESUME", Duration::from_secs(5))
        .await
        .ok();
    let info = sq.execute_raw("query-migrate", Value::Null).await?;
    run.downtime_ms = info["downtime"].as_u64();
    run.ram_bytes = info["ram"]["transferred"].as_u64();
    run.set_link_limit(link);
    let _ = sq
        .execute_raw("blockdev-del", json!({"node-name": "mig-vda"}))
        .await;
    let _ = sq.execute_raw("quit", Value::Null).await;
    if let (Some(resume), Some(stop)) = (resume, stop_us) {
        run.stop_to_resume_ms = Some((resume.timestamp.as_micros() - stop) as f64 / 1000.0);
    }
    Ok((Some(switch_at), Some(done_at), Some(dest)))
}

/// A script that runs QEMU inside `link`'s namespace (`ip netns exec` keeps the process id, so
/// the launcher's process is QEMU's).
fn in_namespace(dir: &Path, link: &Link) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("qemu-in-netns");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
            link.netns,
            guest::DEFAULT_QEMU
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Waits for a MIGRATION event with `status`, failing on `failed`/`cancelled`; returns the
/// timestamp (µs) of the last STOP event seen on the way.
async fn wait_migration(events: &mut qmp::Events, status: &str) -> Result<Option<i64>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut stop = None;
    loop {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("no MIGRATION {status} in 600 s"))??;
        if e.name == "STOP" {
            stop = Some(e.timestamp.as_micros());
        }
        if e.name == "MIGRATION" {
            match e.data["status"].as_str().unwrap_or("") {
                s if s == status => return Ok(stop),
                "failed" | "cancelled" => bail!("migration {}", e.data["status"]),
                _ => {}
            }
        }
    }
}
