//! `ferry agent [--config FILE] --listen ADDR --storage DIR --token-file FILE
//! [--qemu-binary PATH]... [--allow-path DIR]... [--state-dir DIR] [--tls-cert FILE --tls-key FILE]
//! [--tls-ca FILE] [--require-tls] [--max-migrations N] [--space-check full|data]
//! [--metrics ADDR]`.
//!
//! Every option can also be set in a TOML file (`--config /etc/ferry/agent.toml`, what the
//! packaged systemd unit runs): a service's options belong in a conffile the package manager
//! keeps across upgrades, not in a unit file the operator would have to override.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::agent::policy::Policy;
use crate::agent::space::SpaceCheck;
use crate::agent::{Agent, AgentConfig};

/// Arguments of `ferry agent`; the same names, in kebab-case, are the keys of `--config FILE`.
///
/// Every option is optional here because it may come from the file: [`AgentArgs::resolve`]
/// merges the two (a flag given on the command line wins) and applies the defaults.
#[derive(clap::Args, serde::Deserialize, Debug, Default)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentArgs {
    /// A TOML file with the agent's options (keys named like the flags: `listen`, `storage`,
    /// `token-file`, ...). Flags given on the command line override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Address to accept sources on, e.g. `0.0.0.0:7800` (port 0 picks a free one). Required
    /// here or in --config.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for received disks: one subdirectory per migration. Required here or in
    /// --config.
    #[arg(long, value_name = "DIR")]
    storage: Option<PathBuf>,
    /// File holding the shared token (the same file content on the source). Required here or
    /// in --config.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// A QEMU system emulator destination VMs may run, named qemu-system-ARCH; repeatable. The
    /// one whose file name matches the source's binary is used. Default: qemu-system-* on PATH.
    #[arg(long, value_name = "PATH")]
    #[serde(default)]
    qemu_binary: Vec<PathBuf>,
    /// A directory `-kernel`, `-initrd`, `-bios`, `-dtb` files may come from; repeatable.
    /// Default: the distribution's firmware directories (/usr/share/qemu, /usr/share/seabios,
    /// /usr/share/ovmf, ...).
    #[arg(long, value_name = "DIR")]
    #[serde(default)]
    allow_path: Vec<PathBuf>,
    /// Seconds a paused destination is kept after its source's control connection dropped, for
    /// `ferry recover` on the source to settle it (one whose incoming migration completed is kept
    /// until the source settles it). Default: 300.
    #[arg(long, value_name = "SECS")]
    recover_window: Option<u64>,
    /// Where the agent keeps its TLS key and self-signed certificate (created on first start,
    /// kept afterwards so that its fingerprint does not change). Default: /var/lib/ferry.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The agent's certificate (PEM, chain leaf first) instead of the generated one; needs
    /// --tls-key.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Require sources to show a certificate signed by this CA (PEM), on top of the token.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Refuse migrations whose disks and RAM would travel in the clear (`ferry migrate
    /// --insecure`). On the command line it can only turn the check on.
    #[arg(long)]
    #[serde(default)]
    require_tls: bool,
    /// Migrations received at once (1 or more); more are refused with a message naming this
    /// limit. Each runs its own QEMU and NBD server and they share the disks and network.
    /// Default: 4.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    max_migrations: Option<u16>,
    /// How free space is judged, across the migrations in progress: `full` reserves the disks'
    /// full size; `data` the data the source reports plus a margin (thin storage, overcommitted
    /// on purpose). Default: full.
    #[arg(long, value_name = "POLICY", value_enum)]
    space_check: Option<SpaceCheck>,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. `127.0.0.1:9780`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// The `xl` to run `migrate-receive` with for `ferry xl migrate` sources. The source never
    /// chooses it. Default: `xl` on PATH.
    #[arg(long, value_name = "PATH")]
    xl_binary: Option<PathBuf>,
}

/// The agent's options once the command line and the config file are merged and the defaults
/// applied: what [`run`] works from.
#[derive(Debug)]
struct Settings {
    listen: SocketAddr,
    storage: PathBuf,
    token_file: PathBuf,
    qemu_binary: Vec<PathBuf>,
    allow_path: Vec<PathBuf>,
    recover_window: u64,
    state_dir: PathBuf,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    require_tls: bool,
    max_migrations: u16,
    space_check: SpaceCheck,
    metrics: Option<SocketAddr>,
    xl_binary: PathBuf,
}

/// `recover-window` when neither the command line nor the file sets it.
const DEFAULT_RECOVER_WINDOW: u64 = 300;
/// `state-dir` when neither the command line nor the file sets it.
const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";

impl AgentArgs {
    /// Reads `--config` (if given) and merges: a flag on the command line wins over the file, the
    /// file over the defaults. A repeatable flag given on the command line replaces the file's
    /// list rather than adding to it. Errors are one line naming the file or the missing option.
    fn resolve(self) -> Result<Settings, String> {
        let file = match &self.config {
            Some(path) => read_config(path)?,
            None => AgentArgs::default(),
        };
        let from = |what: &str| match &self.config {
            Some(path) => format!(
                "--{what} is missing: give it, or set `{what}` in {}",
                path.display()
            ),
            None => format!("--{what} is missing: give it, or set `{what}` in a --config FILE"),
        };
        let pick = |cli: Vec<PathBuf>, file: Vec<PathBuf>| if cli.is_empty() { file } else { cli };
        let settings = Settings {
            listen: self.listen.or(file.listen).ok_or_else(|| from("listen"))?,
            storage: self
                .storage
                .or(file.storage)
                .ok_or_else(|| from("storage"))?,
            token_file: self
                .token_file
                .or(file.token_file)
                .ok_or_else(|| from("token-file"))?,
            qemu_binary: pick(self.qemu_binary, file.qemu_binary),
            allow_path: pick(self.allow_path, file.allow_path),
            recover_window: self
                .recover_window
                .or(file.recover_window)
                .unwrap_or(DEFAULT_RECOVER_WINDOW),
            state_dir: self
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_ca: self.tls_ca.or(file.tls_ca),
            require_tls: self.require_tls || file.require_tls,
            max_migrations: self
                .max_migrations
                .or(file.max_migrations)
                .unwrap_or(crate::agent::DEFAULT_MAX_MIGRATIONS),
            space_check: self
                .space_check
                .or(file.space_check)
                .unwrap_or(SpaceCheck::Full),
            metrics: self.metrics.or(file.metrics),
            xl_binary: self
                .xl_binary
                .or(file.xl_binary)
                .unwrap_or_else(|| PathBuf::from("xl")),
        };
        if settings.max_migrations == 0 {
            return Err("max-migrations must be 1 or more".into());
        }
        match (&settings.tls_cert, &settings.tls_key) {
            (Some(_), None) => Err("--tls-cert needs --tls-key (or `tls-key` in --config)".into()),
            (None, Some(_)) => Err("--tls-key needs --tls-cert (or `tls-cert` in --config)".into()),
            _ => Ok(settings),
        }
    }
}

/// Parses an agent config file. Unknown keys are refused (a typo must not silently leave an
/// option at its default), and the error names the key and the line.
fn read_config(path: &Path) -> Result<AgentArgs, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    parse_config(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

/// The file's text as options; the error is one line.
fn parse_config(text: &str) -> Result<AgentArgs, String> {
    toml::from_str::<AgentArgs>(text).map_err(|e| {
        // toml's message spans several lines (the offending line, a caret): keep it to one.
        let message = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                format!("line {line}: {message}")
            }
            None => message,
        }
    })
}

/// The control link's TLS: the operator's certificate, or the agent's own from `state_dir`;
/// and the line to print once the agent listens.
fn control_tls(args: &Settings) -> Result<(std::sync::Arc<rustls::ServerConfig>, String), String> {
    use crate::tls::Identity;
    let identity = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Identity::load(cert, key).map_err(|e| e.to_string())?,
        _ => {
            let (identity, created) = Identity::load_or_create(&args.state_dir).map_err(|e| {
                format!(
                    "{e}: create the state directory or point --state-dir elsewhere (or pass --tls-cert/--tls-key)"
                )
            })?;
            if created {
                tracing::info!(dir = %args.state_dir.display(), "created this agent's TLS key and certificate");
            }
            identity
        }
    };
    let line = format!(
        "ferry: agent TLS certificate SHA-256 {}",
        identity.fingerprint()
    );
    let roots = match &args.tls_ca {
        Some(path) => Some(crate::tls::read_roots(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let config = crate::tls::server_config(&identity, roots)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    Ok((config, line))
}

/// Runs the agent until SIGINT/SIGTERM. Prints `listening on ADDR` once ready.
pub async fn run(args: AgentArgs) -> ExitCode {
    let args = match args.resolve() {
        Ok(settings) => settings,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let token = match super::read_token(&args.token_file) {
        Ok(t) => t,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let policy = match Policy::new(&args.qemu_binary, &args.allow_path) {
        Ok(p) => p,
        Err(e) => return super::fail(super::EXIT_USAGE, crate::error_chain(&e)),
    };
    // Bad input changes nothing: the storage is checked before an identity is created.
    if let Err(e) = crate::agent::check_storage(&args.storage) {
        return super::fail(super::EXIT_USAGE, crate::error_chain(&e));
    }
    let (tls, fingerprint) = match control_tls(&args) {
        Ok(tls) => tls,
        Err(e) => return super::fail(super::EXIT_USAGE, e),
    };
    let config = AgentConfig {
        tls,
        require_tls: args.require_tls,
        listen: args.listen,
        storage: args.storage,
        token,
        policy,
        recover_window: std::time::Duration::from_secs(args.recover_window),
        max_migrations: usize::from(args.max_migrations),
        space_check: args.space_check,
        metrics: args.metrics,
        xl_binary: args.xl_binary,
    };
    let agent = match Agent::bind(config).await {
        Ok(a) => a,
        Err(e) => return super::fail(super::EXIT_USAGE, crate::error_chain(&e)),
    };
    match agent.local_addr() {
        Ok(addr) => {
            eprintln!("{fingerprint}");
            println!("ferry agent listening on {addr}");
        }
        Err(e) => return super::fail(super::EXIT_FAILED, e),
    }
    match agent.metrics_addr() {
        Some(Ok(addr)) => println!("ferry agent metrics on http://{addr}/metrics"),
        Some(Err(e)) => return super::fail(super::EXIT_FAILED, e),
        None => {}
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        super::terminated().await;
        eprintln!("ferry: draining: no new migrations; waiting for those in progress (signal again to exit now)");
        signal.cancel();
        super::terminated().await;
        // Every migration is journaled: a restarted agent picks up where this one stopped.
        std::process::exit(i32::from(super::EXIT_FAILED));
    });
    agent.run(shutdown).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn with_file(text: &str, argv: &[&str]) -> Result<Settings, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).map_err(|e| e.to_string())?;
        let mut full = vec!["agent", "--config", path.to_str().ok_or("path")?];
        full.extend_from_slice(argv);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        cli.args.resolve()
    }

    #[test]
    fn every_option_can_come_from_the_file() {
        let s = with_file(
            r#"
listen = "0.0.0.0:7800"
storage = "/var/lib/ferry/images"
token-file = "/etc/ferry/token"
qemu-binary = ["/usr/bin/qemu-system-x86_64"]
allow-path = ["/usr/share/qemu", "/srv/kernels"]
recover-window = 60
state-dir = "/var/lib/ferry/state"
tls-cert = "/etc/ferry/cert.pem"
tls-key = "/etc/ferry/key.pem"
tls-ca = "/etc/ferry/ca.pem"
require-tls = true
max-migrations = 2
space-check = "data"
metrics = "127.0.0.1:9780"
"#,
            &[],
        )
        .expect("valid file");
        assert_eq!(s.listen.to_string(), "0.0.0.0:7800");
        assert_eq!(s.storage, Path::new("/var/lib/ferry/images"));
        assert_eq!(s.token_file, Path::new("/etc/ferry/token"));
        assert_eq!(s.qemu_binary, [Path::new("/usr/bin/qemu-system-x86_64")]);
        assert_eq!(s.allow_path.len(), 2);
        assert_eq!(s.recover_window, 60);
        assert_eq!(s.state_dir, Path::new("/var/lib/ferry/state"));
        assert_eq!(
            s.tls_cert.as_deref(),
            Some(Path::new("/etc/ferry/cert.pem"))
        );
        assert_eq!(s.tls_key.as_deref(), Some(Path::new("/etc/ferry/key.pem")));
        assert_eq!(s.tls_ca.as_deref(), Some(Path::new("/etc/ferry/ca.pem")));
        assert!(s.require_tls);
        assert_eq!(s.max_migrations, 2);
        assert_eq!(s.space_check, SpaceCheck::Data);
        assert_eq!(
            s.metrics.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.1:9780")
        );
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let s = with_file(
            "listen = \"0.0.0.0:7800\"\nstorage = \"/a\"\ntoken-file = \"/t\"\nallow-path = [\"/x\"]\n",
            &["--listen", "127.0.0.1:0", "--allow-path", "/y", "--allow-path", "/z"],
        )
        .expect("valid");
        assert_eq!(s.listen.to_string(), "127.0.0.1:0");
        assert_eq!(s.storage, Path::new("/a"));
        assert_eq!(
            s.allow_path,
            [Path::new("/y"), Path::new("/z")],
            "the flags replace the list"
        );
        assert_eq!(s.recover_window, DEFAULT_RECOVER_WINDOW);
        assert_eq!(s.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert!(!s.require_tls);
        assert_eq!(s.max_migrations, crate::agent::DEFAULT_MAX_MIGRATIONS);
        assert_eq!(s.space_check, SpaceCheck::Full);
        assert_eq!(s.metrics, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named_on_one_line() {
        let err = with_file("listen = \"0.0.0.0:1\"\nstorag = \"/a\"\n", &[])
            .expect_err("a typo is refused");
        assert!(
            err.contains("line 2") && err.contains("unknown field `storag`"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        let err =
            with_file("recover-window = \"soon\"\n", &[]).expect_err("a string is not a number");
        assert!(err.contains("line 1"), "{err}");
        let err = with_file("config = \"/etc/other.toml\"\n", &[])
            .expect_err("no config file names another");
        assert!(err.contains("unknown field `config`"), "{err}");
    }

    #[test]
    fn a_missing_required_option_names_the_flag_and_the_file() {
        let err = with_file("listen = \"0.0.0.0:1\"\n", &["--token-file", "/t"])
            .expect_err("storage is required");
        assert!(
            err.starts_with("--storage is missing: give it, or set `storage` in "),
            "{err}"
        );
        let err = with_file(
            "listen = \"0.0.0.0:1\"\ntls-cert = \"/c\"\n",
            &["--storage", "/s", "--token-file", "/t"],
        )
        .expect_err("a certificate without its key");
        assert!(err.contains("--tls-cert needs --tls-key"), "{err}");
    }
}
