//! The source's RAM relay: the source QEMU migrates to a unix socket; each connection it opens
//! (the main channel, then one per multifd channel) goes to the agent's RAM listener inside
//! mutual TLS, one after the other in the order QEMU opened them.
//!
//! A connection is handed to its splice only once the agent said [`READY`](super::READY), i.e.
//! once the agent connected it to the destination QEMU; only then is the next one opened. A
//! connection the relay cannot carry is closed: the source QEMU sees its migration fail and
//! keeps the VM.

use std::path::Path;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use tracing::{debug, warn, Instrument};

use super::{timed, Client, Running, TunnelError};

/// The RAM relay's accept loop.
pub struct Relay;

impl Relay {
    /// Listens on `path` and carries up to `connections` connections to the agent's RAM port
    /// `host:port`; more are refused (QEMU opens exactly as many as it was told).
    pub fn start(
        path: &Path,
        client: Arc<Client>,
        host: String,
        port: u16,
        connections: u32,
    ) -> Result<Running, TunnelError> {
        let listener = super::listen_unix(path)?;
        let failure = super::Failure::default();
        let failed = failure.clone();
        let task = tokio::spawn(
            async move {
                let mut streams = JoinSet::new();
                let mut opened = 0u32;
                loop {
                    let qemu = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((qemu, _)) => qemu,
                            Err(e) => {
                                warn!(error = %e, "RAM relay cannot accept; it stops");
                                break;
                            }
                        },
                        Some(_) = streams.join_next() => continue,
                    };
                    if opened >= connections {
                        warn!(connections, "the source QEMU opened more RAM connections than asked for; closed");
                        continue;
                    }
                    opened += 1;
                    // In order: the next connection waits until this one is connected through.
                    match open(&client, &host, port).await {
                        Ok(tls) => {
                            streams.spawn(async move {
                                match super::splice(qemu, tls).await {
                                    Ok((sent, returned)) => debug!(sent, returned, "RAM connection closed"),
                                    Err(e) => warn!(error = %e, "RAM connection cut"),
                                }
                            });
                        }
                        Err(e) => {
                            let why = crate::error_chain(&e);
                            warn!(error = %why, "cannot carry a RAM connection to the agent; the source QEMU's migration fails");
                            super::record(&failed, why);
                        }
                    }
                }
                while streams.join_next().await.is_some() {}
            }
            .instrument(tracing::info_span!("ram-relay")),
        );
        Ok(Running {
            task,
            path: path.to_path_buf(),
            failure,
        })
    }
}

/// TCP, TLS with the client certificate, and the agent's READY.
async fn open(
    client: &Client,
    host: &str,
    port: u16,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, TunnelError> {
    let tcp = super::connect_tcp(host, port).await?;
    let mut tls = client.handshake(tcp).await?;
    let ready = timed("waiting for the agent to connect the RAM stream", async {
        tls.read_u8()
            .await
            .map_err(super::io("waiting for the agent's READY"))
    })
    .await?;
    if ready != super::READY {
        return Err(TunnelError::Protocol(format!(
            "the agent's RAM port sent {ready:#04x} instead of READY"
        )));
    }
    Ok(tls)
}
