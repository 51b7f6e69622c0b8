//! The final sync, run while xl's stream flows (see [`super::migrate`]): back on the device
//! model's QMP socket once libxl is done with it, stop a device model that still runs, complete
//! every mirror; then, off the critical path, remove the NBD nodes and let go
//! of the socket before libxl needs it again (after the go message).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::migrate::error::{at, Failure, MigrateError};
use crate::migrate::mirror;
use crate::migrate::source::SourceQemu;
use crate::migrate::PhaseName;

/// How long the final sync may take (the guest is stopped meanwhile).
const FINAL_SYNC_TIMEOUT: Duration = Duration::from_secs(120);

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Connects to the device model again; waits while another client (libxl) holds the socket.
pub async fn reconnect(socket: &Path) -> Result<SourceQemu, Failure> {
    let qmp = qmp::Qmp::connect_unix_timeout(socket, Duration::from_secs(30))
        .await
        .map_err(|e| {
            super::migrate::xl_err(
                PhaseName::Switchover,
                format!(
                    "cannot reach the device model at {} again: {e}",
                    socket.display()
                ),
            )
        })?;
    Ok(SourceQemu::new(qmp))
}

/// What the final sync did.
pub struct Finished {
    /// The QMP connection, for [`remove_nodes`] (dropped after it: libxl needs the socket once
    /// the go message went).
    pub qemu: SourceQemu,
    /// Whether ferry stopped the device model (it still ran: PV/PVH).
    pub stopped: bool,
    pub final_sync_ms: f64,
    /// When the disks were final (µs since the epoch).
    pub final_at_us: u64,
}

/// The final sync, from the moment the guest is suspended ([`super::stream::SenderStream::suspended`]): back
/// on the device model's QMP socket (libxl is done with it until the go message), stop the
/// device model if it still runs (PV/PVH: nothing else stops the qdisk-only QEMU) and complete
/// every mirror. For HVM it runs while the emulator records flow; END waits for it.
pub async fn finish_disks(
    socket: PathBuf,
    jobs: Vec<mirror::MirrorJob>,
) -> Result<Finished, Failure> {
    let fail = at::<MigrateError>(PhaseName::Switchover);
    let started = Instant::now();
    let qemu = reconnect(&socket).await?;
    let connected_ms = started.elapsed().as_secs_f64() * 1000.0;
    let mut events = qemu.events();
    let (running, _) = qemu.status().await.map_err(|e| fail(e.into()))?;
    if running {
        qemu.stop().await.map_err(|e| fail(e.into()))?;
    }
    info!(
        connected_ms,
        stopped = running,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "back on the device model for the final sync"
    );
    let sync = Instant::now();
    mirror::final_sync(&qemu, &jobs, &mut events, FINAL_SYNC_TIMEOUT).await?;
    let final_sync_ms = sync.elapsed().as_secs_f64() * 1000.0;
    let final_at_us = now_us();
    Ok(Finished {
        qemu,
        stopped: running,
        final_sync_ms,
        final_at_us,
    })
}

/// After the final sync: the NBD nodes (idle since) leave the device model,
/// then ferry lets go of its QMP socket. Beside the stream, not in its way.
pub async fn remove_nodes(qemu: SourceQemu, jobs: Vec<mirror::MirrorJob>) {
    let left = mirror::remove_nodes(&qemu, &jobs).await;
    if !left.is_empty() {
        warn!(left = %left.join(", "), "NBD nodes left in the device model");
    }
}
