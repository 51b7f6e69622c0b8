//! The source's end of the control connection to `ferry agent` (see [`crate::protocol`]).
//!
//! After the handshake a reader task owns the read half and forwards every message to a channel,
//! so the driver can wait for "the agent said something or hung up" alongside QMP events and
//! Ctrl-C without cancelling a half-read frame.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::protocol::{self, AgentMessage, ProtocolError, Signer, SourceMessage};
use crate::vm::VmDescription;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// The source's end of a control connection: TLS 1.3 over TCP.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// What the source needs to reach an agent: the shared token and the control link's TLS
/// configuration (see [`crate::tls::client_config`]).
#[derive(Clone)]
pub struct AgentAuth {
    /// The shared secret (never sent over the wire).
    pub token: Vec<u8>,
    /// TLS for the control link.
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for AgentAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentAuth { .. }")
    }
}

impl AgentAuth {
    /// The token, with TLS that authenticates the agent by the token alone (no `--tls-ca`).
    pub fn with_token(token: Vec<u8>) -> AgentAuth {
        AgentAuth {
            token,
            tls: crate::tls::client_config(None, None)
                .expect("the default TLS client configuration is valid"),
        }
    }
}

/// A control-connection failure, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No TCP connection.
    #[error("cannot reach the agent at {to}: {source}; is `ferry agent` running there and the port open?")]
    Connect {
        /// `HOST:PORT`.
        to: String,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS handshake with the agent failed.
    #[error("TLS with the agent at {to} failed: {detail}; if its ferry is older than this one (plaintext control protocol), upgrade it")]
    Tls {
        /// `HOST:PORT`.
        to: String,
        /// What rustls said.
        detail: String,
    },
    /// The agent said no (its words).
    #[error("agent refused: {0}")]
    Refused(String),
    /// The agent did not prove it holds the token.
    #[error(
        "the agent at {0} could not prove it holds the token: check --token-file on both hosts"
    )]
    AgentNotAuthentic(String),
    /// The connection broke or the agent went silent.
    #[error("lost the agent: {0}")]
    Lost(String),
    /// The agent sent something out of order.
    #[error("agent sent an unexpected {0}")]
    Unexpected(String),
}

impl From<ProtocolError> for ControlError {
    fn from(e: ProtocolError) -> Self {
        ControlError::Lost(crate::error_chain(&e))
    }
}

/// An authenticated control connection.
pub struct AgentLink {
    /// None only once handed over to stream mode.
    writer: Option<WriteHalf<ClientStream>>,
    incoming: mpsc::Receiver<Result<AgentMessage, String>>,
    /// Reads messages into `incoming`; hands the read half back after `XlReceiving` (stream
    /// mode follows, see [`crate::xl::wire`]).
    reader: tokio::task::JoinHandle<Option<ReadHalf<ClientStream>>>,
    /// The agent's host as given by the operator (NBD and RAM connect there too).
    pub host: String,
    /// This end's address on the control connection: the relays' connections leave from it
    /// too (the agent takes the RAM stream only from the source's address, and a route that
    /// vanishes for a moment must not pick another one).
    pub local_ip: Option<std::net::IpAddr>,
    /// The destination's RAM port, when `DestinationReady` came during the mirror.
    ready_port: Option<u16>,
    /// Whether `StartDestination` was sent.
    destination_asked: bool,
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl AgentLink {
    /// Connects to `to` (`HOST:PORT`) and authenticates both ways.
    pub async fn connect(to: &str, auth: &AgentAuth) -> Result<AgentLink, ControlError> {
        let token = &auth.token[..];
        let (stream, binding) = dial(to, &auth.tls).await?;
        let host = host_of(to);
        let local_ip = stream.get_ref().0.local_addr().ok().map(|a| a.ip());
        let (mut rd, mut writer) = tokio::io::split(stream);

        let hello = SourceMessage::Hello {
            versions: protocol::SUPPORTED_VERSIONS.to_vec(),
            software: format!("ferry {}", env!("CARGO_PKG_VERSION")),
        };
        protocol::write_message(&mut writer, &hello).await?;
        let nonce = match read_timeout(&mut rd).await? {
            AgentMessage::Challenge { nonce, .. } => nonce,
            other => return Err(unexpected(other)),
        };
        let my_nonce = protocol::new_nonce();
        let auth = SourceMessage::Auth {
            mac: protocol::sign(token, Signer::Source, &binding, &nonce),
            nonce: my_nonce.clone(),
        };
        protocol::write_message(&mut writer, &auth).await?;
        match read_timeout(&mut rd).await? {
            AgentMessage::Authenticated { mac }
                if protocol::verify(token, Signer::Agent, &binding, &my_nonce, &mac) => {}
            AgentMessage::Authenticated { .. } => {
                return Err(ControlError::AgentNotAuthentic(to.to_string()))
            }
            other => return Err(unexpected(other)),
        }

        let (tx, incoming) = mpsc::channel(8);
        let reader = tokio::spawn(async move {
            loop {
                let msg = protocol::read_message::<_, AgentMessage>(&mut rd).await;
                let stop = msg.is_err();
                let stream_mode = matches!(msg, Ok(AgentMessage::XlReceiving));
                if tx
                    .send(msg.map_err(|e| crate::error_chain(&e)))
                    .await
                    .is_err()
                    || stop
                {
                    return None;
                }
                if stream_mode {
                    return Some(rd);
                }
            }
        });
        Ok(AgentLink {
            writer: Some(writer),
            incoming,
            reader,
            host,
            local_ip,
            ready_port: None,
            destination_asked: false,
        })
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &SourceMessage) -> Result<(), ControlError> {
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| ControlError::Lost("the link is in stream mode".into()))?;
        protocol::write_message(writer, msg)
            .await
            .map_err(Into::into)
    }

    /// The next message from the agent; `Refused` and a closed connection become errors.
    pub async fn recv(&mut self) -> Result<AgentMessage, ControlError> {
        match self.incoming.recv().await {
            Some(Ok(AgentMessage::Refused { reason })) => Err(ControlError::Refused(reason)),
            Some(Ok(msg)) => Ok(msg),
            Some(Err(e)) => Err(ControlError::Lost(e)),
            None => Err(ControlError::Lost("connection closed".into())),
        }
    }

    /// Like [`recv`](Self::recv) with a deadline.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<AgentMessage, ControlError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Lost(format!(
                "no answer within {} s",
                timeout.as_secs()
            ))),
        }
    }

    /// Asks for the migrations the agent holds (`ferry status`); the link is done after.
    pub async fn status(
        &mut self,
    ) -> Result<(Vec<crate::agent::inventory::MigrationSummary>, usize), ControlError> {
        self.send(&SourceMessage::Status).await?;
        match self.recv_timeout(REPLY_TIMEOUT).await? {
            AgentMessage::StatusReport { migrations, more } => Ok((migrations, more)),
            other => Err(unexpected(other)),
        }
    }

    /// Sends the VM, asking for encrypted disks and RAM when `tls`; returns what the agent
    /// prepared. An agent that ignores the request for TLS is an error, never a silent downgrade.
    pub async fn prepare(
        &mut self,
        vm: &VmDescription,
        tls: bool,
    ) -> Result<Prepared, ControlError> {
        self.send(&SourceMessage::Prepare {
            vm: vm.clone(),
            tls,
        })
        .await?;
        self.prepared(tls).await
    }

    /// Asks for storage for a Xen domain's disks (`ferry xl migrate`); returns what the agent
    /// prepared and where each disk's image is on its host.
    pub async fn prepare_xl(
        &mut self,
        vm: &VmDescription,
        tls: bool,
    ) -> Result<(Prepared, Vec<protocol::ImageInfo>), ControlError> {
        self.send(&SourceMessage::PrepareXl {
            vm: vm.clone(),
            tls,
        })
        .await?;
        // Protocol 3 agents that predate `ferry xl migrate` cannot decode `prepare_xl` and hang
        // up: say so rather than "connection closed".
        let older = |e: ControlError| match e {
            ControlError::Lost(why) => ControlError::Lost(format!(
                "{why}; if the agent's ferry predates `ferry xl migrate`, upgrade it"
            )),
            other => other,
        };
        let prepared = self.prepared(tls).await.map_err(older)?;
        match self.recv_timeout(REPLY_TIMEOUT).await? {
            AgentMessage::XlPrepared { images } => Ok((prepared, images)),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the agent to run `xl migrate-receive OPTIONS`; once it does, returns the link's two
    /// halves for stream mode ([`crate::xl::wire`]).
    pub async fn xl_receive(
        mut self,
        options: Vec<String>,
    ) -> Result<(ReadHalf<ClientStream>, WriteHalf<ClientStream>), ControlError> {
        self.send(&SourceMessage::XlReceive { options }).await?;
        match self.recv_timeout(REPLY_TIMEOUT).await? {
            AgentMessage::XlReceiving => {}
            other => return Err(unexpected(other)),
        }
        let lost = || ControlError::Lost("the control link closed as stream mode began".into());
        let writer = self.writer.take().ok_or_else(lost)?;
        // The reader task ends by itself after `XlReceiving`, handing back the read half.
        let reader = std::mem::replace(&mut self.reader, tokio::spawn(async { None }));
        match reader.await {
            Ok(Some(rd)) => Ok((rd, writer)),
            _ => Err(lost()),
        }
    }

    async fn prepared(&mut self, tls: bool) -> Result<Prepared, ControlError> {
        match self.recv_timeout(REPLY_TIMEOUT).await? {
            AgentMessage::Prepared {
                migration_id,
                nbd_port,
                exports,
                tls: bundle,
            } => {
                if tls && bundle.is_none() {
                    return Err(ControlError::Unexpected(
                        "Prepared without the certificates for an encrypted migration".into(),
                    ));
                }
                Ok(Prepared {
                    migration_id,
                    nbd_port,
                    exports,
                    tls: bundle.filter(|_| tls),
                })
            }
            other => Err(unexpected(other)),
        }
    }

    /// `ferry migrate --dry-run`: asks the agent to run the checks of a `Prepare` for `vm`
    /// without creating anything; returns its `Checked` (or its refusal as an error).
    pub async fn check(&mut self, vm: &VmDescription, tls: bool) -> Result<Checked, ControlError> {
        self.send(&SourceMessage::Check {
            vm: vm.clone(),
            tls,
        })
        .await?;
        match self.recv_timeout(REPLY_TIMEOUT).await {
            Ok(AgentMessage::Checked {
                argv,
                storage,
                free_bytes,
            }) => Ok(Checked {
                argv,
                storage,
                free_bytes,
            }),
            Ok(other) => Err(unexpected(other)),
            // An agent that predates `Check` cannot decode it and hangs up.
            Err(ControlError::Lost(why)) => Err(ControlError::Lost(format!(
                "{why} (an agent older than this ferry does not know dry runs: upgrade it)"
            ))),
            Err(e) => Err(e),
        }
    }

    /// Asks for the destination QEMU, expecting `parallel` RAM connections, its RAM
    /// preallocated if `prealloc_ram`. The answer,
    /// `DestinationReady`, comes while the disks copy (see [`destination_ready`]).
    ///
    /// [`destination_ready`]: Self::destination_ready
    pub async fn start_destination(
        &mut self,
        parallel: u32,
        prealloc_ram: bool,
    ) -> Result<(), ControlError> {
        self.destination_asked = true;
        self.send(&SourceMessage::StartDestination {
            parallel,
            prealloc_ram,
        })
        .await
    }

    /// The answer to [`start_destination`](Self::start_destination): the port the destination
    /// QEMU listens on for the RAM (kept by [`watch`](Self::watch), or waited for).
    pub async fn destination_ready(&mut self) -> Result<u16, ControlError> {
        match self.ready_port.take() {
            Some(port) => Ok(port),
            None => destination_port(self.recv_timeout(REPLY_TIMEOUT).await?),
        }
    }

    /// Whether `StartDestination` was sent and its answer has not come yet.
    pub fn awaiting_destination(&self) -> bool {
        self.destination_asked && self.ready_port.is_none()
    }

    /// Watches the link while the disks copy: keeps `DestinationReady` and goes on; returns
    /// only on anything else (out of turn) or a hang-up. Cancel-safe.
    pub async fn watch(&mut self) -> ControlError {
        loop {
            match self.recv().await.and_then(destination_port) {
                Ok(port) if self.ready_port.is_none() => self.ready_port = Some(port),
                Ok(_) => return ControlError::Unexpected("a second DestinationReady".into()),
                Err(error) => return error,
            }
        }
    }

    /// Reports that the source QEMU completed; returns the agent's verdict, `Running` or
    /// `Abandoned`.
    pub async fn commit(&mut self) -> Result<AgentMessage, ControlError> {
        self.send(&SourceMessage::Commit).await?;
        verdict(self.recv_timeout(REPLY_TIMEOUT).await?)
    }

    /// Tells the agent to roll back and waits (up to 15 s) for it to hang up, which it does once
    /// the destination QEMU is dead and its storage removed.
    pub async fn abort(mut self, reason: &str) {
        let abort = SourceMessage::Abort {
            reason: reason.to_string(),
        };
        if self.send(&abort).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(15), async {
                while self.recv().await.is_ok() {}
            })
            .await;
        }
    }
}

/// What the agent prepared for a migration.
#[derive(Debug)]
pub struct Prepared {
    /// The agent's name for the migration.
    pub migration_id: String,
    /// Its NBD server's port.
    pub nbd_port: u16,
    /// One export per disk.
    pub exports: Vec<protocol::ExportInfo>,
    /// The source QEMU's certificates, when the migration is encrypted.
    pub tls: Option<Box<crate::tls::migration::ClientBundle>>,
}

/// What the agent would do with a VM (`ferry migrate --dry-run`).
#[derive(Debug)]
pub struct Checked {
    /// The destination command line, [`protocol::CHECK_DIR`] standing for the migration
    /// directory.
    pub argv: Vec<String>,
    /// The agent's storage directory.
    pub storage: String,
    /// Its free bytes.
    pub free_bytes: u64,
}

/// TCP, then TLS, to `to`; returns the stream and the session's exporter value.
pub async fn dial(
    to: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<(ClientStream, [u8; crate::tls::EXPORTER_LEN]), ControlError> {
    let connect = TcpStream::connect(to);
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => {
            return Err(ControlError::Connect {
                to: to.to_string(),
                source,
            })
        }
        Err(_) => {
            let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10 s");
            return Err(ControlError::Connect {
                to: to.to_string(),
                source,
            });
        }
    };
    crate::protocol::tune_socket(&stream);
    let host = host_of(to);
    let name = ServerName::try_from(host.clone()).map_err(|e| ControlError::Tls {
        to: to.to_string(),
        detail: format!("{host:?} is not a host name or address: {e}"),
    })?;
    let tls_failed = |detail: String| ControlError::Tls {
        to: to.to_string(),
        detail,
    };
    let handshake = tokio_rustls::TlsConnector::from(tls.clone()).connect(name, stream);
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(tls_failed(e.to_string())),
        Err(_) => return Err(tls_failed("no TLS answer within 10 s".into())),
    };
    let binding =
        crate::tls::exporter(stream.get_ref().1).map_err(|e| tls_failed(e.to_string()))?;
    Ok((stream, binding))
}

/// A recovering source's verdict on migration `migration_id`, on a fresh connection: `commit`
/// when the source QEMU completed it. Returns the agent's `Running` or `Abandoned`.
pub async fn resolve(
    to: &str,
    auth: &AgentAuth,
    migration_id: &str,
    commit: bool,
) -> Result<AgentMessage, ControlError> {
    let mut link = AgentLink::connect(to, auth).await?;
    link.send(&SourceMessage::Resolve {
        migration_id: migration_id.to_string(),
        commit,
    })
    .await?;
    verdict(link.recv_timeout(REPLY_TIMEOUT).await?)
}

/// The RAM port out of `DestinationReady`; anything else is out of turn.
pub fn destination_port(msg: AgentMessage) -> Result<u16, ControlError> {
    match msg {
        AgentMessage::DestinationReady { migration_port } => Ok(migration_port),
        other => Err(unexpected(other)),
    }
}

fn verdict(msg: AgentMessage) -> Result<AgentMessage, ControlError> {
    match msg {
        msg @ (AgentMessage::Running { .. } | AgentMessage::Abandoned { .. }) => Ok(msg),
        other => Err(unexpected(other)),
    }
}

async fn read_timeout<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> Result<AgentMessage, ControlError> {
    match tokio::time::timeout(REPLY_TIMEOUT, protocol::read_message::<_, AgentMessage>(rd)).await {
        Ok(Ok(AgentMessage::Refused { reason })) => Err(ControlError::Refused(reason)),
        Ok(Ok(msg)) => Ok(msg),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ControlError::Lost("no answer during the handshake".into())),
    }
}

fn unexpected(msg: AgentMessage) -> ControlError {
    ControlError::Unexpected(msg.kind().to_string())
}

/// The host part of `HOST:PORT` / `[V6]:PORT`, without brackets.
pub fn host_of(to: &str) -> String {
    let host = match to.rsplit_once(':') {
        Some((h, _)) => h,
        None => to,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_is_split_from_port() {
        assert_eq!(host_of("10.0.0.2:7000"), "10.0.0.2");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("agent.example:7000"), "agent.example");
    }
}
