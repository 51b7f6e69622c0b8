//! Starting `xl migrate` with ferry's relay as its transport, and meeting the relay: the
//! command line (`-s` is run by `sh -c`, so every word is quoted), the private files in
//! `--state-dir`, and the relay's first line (its arguments, which carry the options xl wants
//! the receiver to get).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::migrate::xl_err;
use crate::migrate::error::{Failure, MigrateError};
use crate::migrate::PhaseName;

/// How long xl may take to start its transport.
const RELAY_WAIT: Duration = Duration::from_secs(60);

/// What `xl migrate` is run with.
pub struct XlCommand<'a> {
    /// The `xl` binary.
    pub xl: &'a Path,
    /// The relay's words (this program, `xl`, `relay`).
    pub relay: &'a [String],
    /// Options passed on to `xl migrate`.
    pub flags: &'a [String],
    /// The domain.
    pub domain: &'a str,
    /// xl's HOST: the agent's address.
    pub host: &'a str,
    /// The rewritten config (`-C`).
    pub config: &'a Path,
}

/// Runs `xl migrate -s "RELAY --via SOCKET" -C CONFIG FLAGS DOMAIN HOST` (into `slot`, so that the
/// caller can wait for it whatever happens) and waits for its relay on `listener`; returns the
/// relay's two halves and the options xl gave `migrate-receive`.
pub async fn start(
    cmd: XlCommand<'_>,
    listener: UnixListener,
    socket: &Path,
    slot: &mut Option<Child>,
    cancel: &CancellationToken,
) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf, Vec<String>), Failure> {
    let fail = |what: String| xl_err(PhaseName::Ram, what);
    let mut transport: Vec<String> = cmd.relay.iter().map(|w| shell_word(w)).collect();
    transport.push("--via".into());
    transport.push(shell_word(&socket.display().to_string()));
    let mut command = Command::new(cmd.xl);
    command
        .arg("migrate")
        .arg("-s")
        .arg(transport.join(" "))
        .arg("-C")
        .arg(cmd.config)
        .args(cmd.flags)
        .arg(cmd.domain)
        .arg(cmd.host)
        .stdin(Stdio::null());
    info!(?command, "running xl migrate");
    let xl = command
        .spawn()
        .map_err(|e| fail(format!("cannot run {} migrate: {e}", cmd.xl.display())))?;
    let xl = slot.insert(xl);
    let accepted = tokio::select! {
        _ = cancel.cancelled() => return Err(Failure::new(PhaseName::Ram, MigrateError::Cancelled)),
        status = xl.wait() => {
            return Err(fail(format!(
                "xl migrate exited ({}) before it started its transport: see its messages above",
                status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string())
            )));
        }
        _ = tokio::time::sleep(RELAY_WAIT) => {
            return Err(fail("xl migrate did not start its transport within 60 s".into()));
        }
        accepted = listener.accept() => accepted,
    };
    let (relay, _) = accepted.map_err(|e| fail(format!("relay: {e}")))?;
    drop(listener);
    let (relay_rd, relay_wr) = relay.into_split();
    let mut relay_rd = BufReader::new(relay_rd);
    let options = relay_options(&mut relay_rd, cmd.host).await.map_err(fail)?;
    Ok((relay_rd, relay_wr, options))
}

/// Shell-quotes one word for the `-s` command xl gives to `sh -c`.
fn shell_word(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Reads the relay's arguments: `HOST xl [global options] migrate-receive [options]`; returns
/// what follows `xl` (the agent checks it again).
async fn relay_options<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    host: &str,
) -> Result<Vec<String>, String> {
    let mut line = Vec::new();
    let mut limited = (&mut *rd).take(super::relay::MAX_HELLO as u64);
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the relay's arguments: {e}"))?;
    let args: Vec<String> = serde_json::from_slice(&line)
        .map_err(|e| format!("the relay's arguments are not what ferry xl relay sends: {e}"))?;
    match args.as_slice() {
        [h, xl, rest @ ..] if h == host && xl == "xl" => {
            crate::agent::xl::check_options(rest)?;
            Ok(rest.to_vec())
        }
        _ => Err(format!(
            "xl ran its transport with {args:?}, not `{host} xl ... migrate-receive`"
        )),
    }
}

pub fn private_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("cannot create {}: {e}; check --state-dir", dir.display()))
}

pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::os::unix::fs::OpenOptionsExt::mode(
        std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true),
        0o600,
    )
    .open(path)
    .and_then(|mut f| f.write_all(bytes).map(|()| f))
    .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_for_sh() {
        assert_eq!(shell_word("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[tokio::test]
    async fn relay_arguments() {
        let mut ok = &b"[\"h:1\",\"xl\",\"-t\",\"migrate-receive\",\"-e\"]\n"[..];
        assert_eq!(
            relay_options(&mut ok, "h:1").await.expect("must succeed"),
            vec!["-t", "migrate-receive", "-e"]
        );
        let mut other_host = &b"[\"evil\",\"xl\",\"migrate-receive\"]\n"[..];
        assert!(relay_options(&mut other_host, "h:1").await.is_err());
        let mut bad = &b"[\"h:1\",\"xl\",\"destroy\",\"vm\"]\n"[..];
        assert!(relay_options(&mut bad, "h:1").await.is_err());
    }
}
