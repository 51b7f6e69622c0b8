//! `ferry nbd-serve --listen ADDR --export NAME=PATH ... [--read-only] [--tls-cert FILE
//! --tls-key FILE [--tls-ca FILE]]`: serves existing raw files or block devices over NBD until
//! SIGINT/SIGTERM, then stops gracefully (in-flight requests finish, files are flushed).
//!
//! Once serving, stdout gets one line per export, `nbd://HOST:PORT/NAME` (`nbds://` with TLS,
//! the scheme libnbd reads as "TLS required"), with the port actually bound (so `--listen
//! 127.0.0.1:0` is usable from scripts).
//!
//! TLS files are read before anything is bound or opened: a bad one is a usage error that
//! changes nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};

use crate::nbd::{Export, NbdError, NbdServer, ServerConfig};
use crate::tls::{self, Identity, TlsError};

/// Arguments of `ferry nbd-serve`.
#[derive(clap::Args, Debug)]
#[command(after_help = "\
With --tls-cert and --tls-key every client must use TLS (NBD_OPT_STARTTLS); --tls-ca also \
makes every client present a certificate that CA signed. QEMU connects with a \
tls-creds-x509 object (endpoint=client, its directory holding ca-cert.pem, client-cert.pem, \
client-key.pem) and tls-creds=ID on its nbd node; libnbd tools with \
nbds://HOST:PORT/NAME?tls-certificates=DIR. The server certificate must name the host \
clients dial (or their tls-hostname).")]
pub struct NbdServeArgs {
    /// Address to listen on, e.g. 0.0.0.0:10809 or [::1]:0 (port 0: the system picks one).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// An export: NAME=PATH of an existing raw file or block device. Repeat for more exports.
    #[arg(long = "export", value_name = "NAME=PATH", required = true, value_parser = parse_export)]
    exports: Vec<(String, PathBuf)>,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Require TLS: the server's certificate (PEM, leaf first, chain after).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM); needs --tls-cert and --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
}

/// Why the TLS options cannot be used; the cause names the file to fix.
#[derive(Debug, thiserror::Error)]
enum TlsSetupError {
    #[error("cannot use --tls-cert/--tls-key")]
    Identity(#[source] TlsError),
    #[error("cannot use --tls-ca")]
    Ca(#[source] TlsError),
    #[error("--tls-key {key} and --tls-cert {cert} do not make a usable pair (is it the certificate's key?)")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: TlsError,
    },
}

/// The TLS configuration the options ask for, if any.
fn tls_config(args: &NbdServeArgs) -> Result<Option<Arc<rustls::ServerConfig>>, TlsSetupError> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let identity = Identity::load(cert, key).map_err(TlsSetupError::Identity)?;
    let roots = args
        .tls_ca
        .as_deref()
        .map(tls::read_roots)
        .transpose()
        .map_err(TlsSetupError::Ca)?;
    let pair = |source| TlsSetupError::Pair {
        cert: cert.clone(),
        key: key.clone(),
        source,
    };
    tls::server_config(&identity, roots).map(Some).map_err(pair)
}

/// `nbd://` or, with TLS, `nbds://` for `name` on `addr`.
fn url(addr: SocketAddr, name: &str, tls: bool) -> String {
    let scheme = if tls { "nbds" } else { "nbd" };
    format!("{scheme}://{addr}/{name}")
}

fn parse_export(spec: &str) -> Result<(String, PathBuf), String> {
    match spec.split_once('=') {
        Some((name, path)) if !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("expected NAME=PATH, got {spec:?}")),
    }
}

/// Runs `ferry nbd-serve`.
pub async fn run(args: NbdServeArgs) -> ExitCode {
    // Handlers first: from the moment the URLs are printed a signal means "stop cleanly".
    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(i), Ok(t)) => (i, t),
        (Err(e), _) | (_, Err(e)) => {
            return super::fail(
                super::EXIT_FAILED,
                format_args!("cannot handle signals: {e}"),
            )
        }
    };
    let tls = match tls_config(&args) {
        Ok(tls) => tls,
        Err(e) => return super::fail(super::EXIT_USAGE, crate::error_chain(&e)),
    };
    let tls_on = tls.is_some();
    // The operator chose these names; listing them is a convenience, not a leak.
    let config = ServerConfig {
        list_exports: true,
        tls,
        ..ServerConfig::default()
    };
    let server = match NbdServer::bind(args.listen, config).await {
        Ok(server) => server,
        Err(e) => return super::fail(super::EXIT_FAILED, crate::error_chain(&e)),
    };
    let names: Vec<String> = args.exports.iter().map(|(name, _)| name.clone()).collect();
    for (name, path) in args.exports {
        let export = Export {
            name,
            path,
            read_only: args.read_only,
        };
        if let Err(e) = server.add_export(export) {
            let code = match e {
                NbdError::Open { .. }
                | NbdError::DuplicateExport { .. }
                | NbdError::InvalidName { .. } => super::EXIT_USAGE,
                _ => super::EXIT_FAILED,
            };
            let _ = server.shutdown().await;
            return super::fail(code, crate::error_chain(&e));
        }
    }
    let addr = server.local_addr();
    for name in &names {
        println!("{}", url(addr, name, tls_on));
    }
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    match server.shutdown().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => super::fail(super::EXIT_FAILED, crate::error_chain(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_specs() {
        assert_eq!(
            parse_export("a=/x/y"),
            Ok(("a".into(), PathBuf::from("/x/y")))
        );
        // Only the first '=' separates: paths may contain more.
        assert_eq!(
            parse_export("a=/x=y"),
            Ok(("a".into(), PathBuf::from("/x=y")))
        );
        assert_eq!(
            parse_export("=/x"),
            Ok((String::new(), PathBuf::from("/x")))
        );
        assert!(parse_export("noequals").is_err());
        assert!(parse_export("a=").is_err());
    }

    #[test]
    fn default_handshake_timeout_is_ten_seconds() {
        assert_eq!(
            ServerConfig::default().handshake_timeout,
            std::time::Duration::from_secs(10)
        );
    }
}
