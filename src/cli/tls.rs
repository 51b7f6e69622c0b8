//! The TLS options `ferry migrate` and `ferry recover` share: how the source checks the agent
//! and which certificate it shows, for sites with a PKI. Without them the shared token alone
//! authenticates both ends (its proofs are bound to the TLS session, see `crate::tls`).

use std::path::PathBuf;

use crate::migrate::control::AgentAuth;

/// Source-side TLS options.
#[derive(clap::Args, Debug, Clone)]
pub struct SourceTlsArgs {
    /// Check the agent's certificate against this CA (PEM) and the host name in --to, on top of
    /// the token. Default: the token alone authenticates the agent.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) to show an agent started with --tls-ca; needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl SourceTlsArgs {
    /// The token with the control link's TLS configuration; a one-line error for bad files.
    pub fn auth(&self, token: Vec<u8>) -> Result<AgentAuth, String> {
        let roots = match &self.tls_ca {
            Some(path) => Some(crate::tls::read_roots(path).map_err(|e| e.to_string())?),
            None => None,
        };
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                Some(crate::tls::Identity::load(cert, key).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        let tls = crate::tls::client_config(roots, identity.as_ref())
            .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
        Ok(AgentAuth { token, tls })
    }
}
