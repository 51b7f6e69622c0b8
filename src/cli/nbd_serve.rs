//! `ferry nbd-serve --listen ADDR --export NAME=PATH ... [--read-only]`: serves existing raw
//! files or block devices over NBD until SIGINT/SIGTERM, then stops gracefully (in-flight
//! requests finish, files are flushed).
//!
//! Once serving, stdout gets one line per export, `nbd://HOST:PORT/NAME`, with the port actually
//! bound (so `--listen 127.0.0.1:0` is usable from scripts).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

use crate::nbd::{Export, NbdError, NbdServer, ServerConfig};

/// Arguments of `ferry nbd-serve`.
#[derive(clap::Args, Debug)]
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
    // The operator chose these names; listing them is a convenience, not a leak.
    let config = ServerConfig {
        list_exports: true,
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
        println!("nbd://{addr}/{name}");
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
