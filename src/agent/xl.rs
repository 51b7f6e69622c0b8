//! The agent's half of `ferry xl migrate`: storage for a Xen domain's qdisk disks, then
//! `xl migrate-receive` fed with the stream the source relays.
//!
//! ```text
//!  source                                   agent                         xl migrate-receive
//!  PrepareXl{disks, tls} ─────────────────► images, NBD exports
//!          ◄──────────────── Prepared, XlPrepared{image paths}
//!  ... mirrors into the exports ...
//!  Synced ────────────────────────────────► background fdatasync
//!  XlReceive{options} ────────────────────► checks options, spawns --xl-binary OPTIONS ─► (runs)
//!          ◄──────────────── XlReceiving   (stream mode from here, see crate::xl::wire)
//!          ◄═══ Data: banner, "domain received", report ═════════════ its stdout
//!  Data ══ xl header, config, libxl records ══════════════════════════► its stdin
//!  Final ─────────────────────────────────► fdatasync images, stop serving them (beside the
//!                                           stream: the final sync may end mid-record)
//!  Barrier ───────────────────────────────► waits for that
//!  Data ══ END record ════════════════════════════════════════════════► opens the images
//!  Go ────────────────────────────────────► journal `running`: the images are the domain's
//!  Data ══ "domain is yours, you are cleared to unpause" ═════════════►
//! ```
//!
//! The agent never starts a program the source names: it runs its own `--xl-binary` with
//! `migrate-receive` and only the options xl itself puts in its transport command. Before `Go`
//! a broken link or stream ends `xl migrate-receive` (its stdin closes, so it fails the restore
//! and destroys what it created; killed if it does not exit) and the migration is rolled back.
//! After `Go` the domain owns the images: they are kept, unless the receiver's report says it
//! could not start the domain (it then destroyed its copy and lets the source resume).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, Command};
use tracing::{error, info, warn};

use super::received::Received;
use super::session::SessionError;
use super::AgentConfig;
use crate::protocol::{self, AgentMessage, SourceMessage};
use crate::xl::wire::{self, Chunk};

/// How long `xl migrate-receive` may take to exit once its stdin closed.
const EXIT_WAIT: Duration = Duration::from_secs(20);
/// Receiver output kept to find the report (xl's messages are a few hundred bytes).
const KEEP_OUTPUT: usize = 4096;

/// Checks the options `xl migrate` put in its transport command (after `HOST xl`): xl's global
/// `-t`, `-T`, `-v...`, then `migrate-receive` and its `-e`, `-d`, `-p`, `-F`
/// (`tools/xl/xl_migrate.c`, `main_migrate` and `main_migrate_receive`). Anything else is
/// refused: the source may not choose what runs here.
pub fn check_options(options: &[String]) -> Result<(), String> {
    let at = options
        .iter()
        .position(|o| o == "migrate-receive")
        .ok_or("the transport command has no migrate-receive")?;
    let global_ok = |o: &String| {
        o == "-t"
            || o == "-T"
            || (o.len() > 1 && o.starts_with('-') && o[1..].bytes().all(|b| b == b'v'))
    };
    if let Some(bad) = options[..at].iter().find(|o| !global_ok(o)) {
        return Err(format!(
            "xl option {bad:?} before migrate-receive is not one xl migrate passes; this agent runs \
             only `xl [-t] [-T] [-v...] migrate-receive [-e] [-d] [-p] [-F]`"
        ));
    }
    if let Some(bad) = options[at + 1..]
        .iter()
        .find(|o| !matches!(o.as_str(), "-e" | "-d" | "-p" | "-F"))
    {
        return Err(format!(
            "migrate-receive option {bad:?} is not one xl migrate passes; this agent runs only \
             `xl [-t] [-T] [-v...] migrate-receive [-e] [-d] [-p] [-F]`"
        ));
    }
    Ok(())
}

/// Serves a `PrepareXl` to its end. `received` is this migration's storage, already created.
pub async fn serve<R, W>(
    rd: &mut R,
    wr: &mut W,
    mut received: Received,
    config: &AgentConfig,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let id = received.dir.id.clone();
    let result = run(rd, wr, &mut received, config).await;
    match result {
        Ok(Ended::Kept) => {
            info!(migration = %id, "the domain runs on this host; its images stay");
            Ok(())
        }
        Ok(Ended::ReceiverGaveUp) => {
            warn!(migration = %id, "xl migrate-receive could not start the domain and destroyed it; removing its images");
            received.remove_after_receiver_gave_up();
            Err(SessionError::Refused(
                "xl migrate-receive could not start the domain".into(),
            ))
        }
        Ok(Ended::Undecided) => {
            error!(migration = %id, dir = %received.dir.path.display(), "past the point of no return, xl migrate-receive gave no report; the images are kept: check the domain on both hosts");
            Ok(())
        }
        Err(err) => {
            if let SessionError::Refused(reason) = &err {
                let _ = protocol::write_message(
                    wr,
                    &AgentMessage::Refused {
                        reason: reason.clone(),
                    },
                )
                .await;
            }
            received.rollback().await;
            Err(err)
        }
    }
}

/// How a stream that passed `Go` ended.
enum Ended {
    /// The receiver reported success (status 0).
    Kept,
    /// The receiver reported failure: it destroyed its copy.
    ReceiverGaveUp,
    /// No report (the receiver or the link died after the go message).
    Undecided,
}

async fn run<R, W>(
    rd: &mut R,
    wr: &mut W,
    received: &mut Received,
    config: &AgentConfig,
) -> Result<Ended, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    protocol::write_message(wr, &received.prepared()).await?;
    protocol::write_message(
        wr,
        &AgentMessage::XlPrepared {
            images: received.image_paths(),
        },
    )
    .await?;
    // The mirror may take hours: no timeout on these reads; TCP keepalive notices a dead source.
    let options = loop {
        match protocol::read_message(rd).await? {
            SourceMessage::Synced => received.flush_in_background(),
            SourceMessage::XlReceive { options } => break options,
            SourceMessage::Abort { reason } => return Err(SessionError::Aborted(reason)),
            other => {
                return Err(SessionError::Refused(format!(
                    "expected Synced or XlReceive, got {}",
                    other.kind()
                )))
            }
        }
    };
    check_options(&options).map_err(SessionError::Refused)?;
    let mut child = spawn(&config.xl_binary, &options, &received.dir.path)?;
    protocol::write_message(wr, &AgentMessage::XlReceiving).await?;
    info!(migration = %received.dir.id, xl = %config.xl_binary.display(), "xl migrate-receive started; stream mode");

    let (Some(stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        kill(&mut child).await;
        return Err(SessionError::Refused(
            "xl migrate-receive has no pipes".into(),
        ));
    };
    // Owned, so that dropping it closes the receiver's stdin.
    let mut stdin = Some(stdin);
    let mut output: Vec<u8> = Vec::new();
    let mut up_done = false;
    let mut down_done = false;
    let mut went = false;
    let mut buf = vec![0u8; 64 * 1024];
    let mut failure: Option<SessionError> = None;
    let mut finishing: Option<tokio::task::JoinHandle<Result<(), String>>> = None;
    while !(up_done && down_done) {
        tokio::select! {
            n = stdout.read(&mut buf), if !up_done => {
                match n {
                    Ok(0) | Err(_) => {
                        up_done = true;
                        let _ = wire::write_chunk(wr, &Chunk::Eof).await;
                    }
                    Ok(n) => {
                        if output.len() < KEEP_OUTPUT {
                            output.extend_from_slice(&buf[..n]);
                        }
                        if let Err(e) = wire::write_chunk(wr, &Chunk::Data(buf[..n].to_vec())).await {
                            if !went {
                                failure = Some(e.into());
                                break;
                            }
                            // Past the go message the stream carries only the report.
                            down_done = true;
                        }
                    }
                }
            }
            chunk = wire::read_chunk(rd), if !down_done => {
                match chunk {
                    Ok(Chunk::Data(bytes)) => {
                        if let Some(input) = stdin.as_mut() {
                            if let Err(e) = input.write_all(&bytes).await {
                                // The receiver stopped reading: its stdout says why, and the
                                // source hears it from xl; the chunks that follow are dropped.
                                warn!(error = %e, "xl migrate-receive stopped reading its stdin");
                                stdin = None;
                            }
                        }
                    }
                    Ok(Chunk::Final) => {
                        // Flush and stop serving beside the stream; the barrier waits for it.
                        let images = received.images().to_vec();
                        let release = received.release_nbd_later();
                        let id = received.dir.id.clone();
                        finishing = Some(tokio::spawn(async move {
                            let started = std::time::Instant::now();
                            let (flushed, ()) = tokio::join!(crate::agent::storage::sync_files(images), release);
                            info!(migration = %id, ms = started.elapsed().as_secs_f64() * 1000.0, "disks final: images flushed, exports closed");
                            flushed.map_err(|e| format!("cannot flush the images: {}", crate::error_chain(&e)))
                        }));
                    }
                    Ok(Chunk::Barrier) => {
                        let done = match finishing.take() {
                            Some(task) => task.await.map_err(|e| e.to_string()).and_then(|r| r),
                            None => Err("the source sent the barrier before its disks were final".into()),
                        };
                        done.map_err(SessionError::Refused)?;
                    }
                    Ok(Chunk::Go) => {
                        received.hand_over_to_domain().map_err(SessionError::Refused)?;
                        went = true;
                    }
                    Ok(Chunk::Eof) => {
                        stdin = None;
                        down_done = true;
                    }
                    Err(e) => {
                        if !went {
                            failure = Some(e.into());
                            break;
                        }
                        stdin = None;
                        down_done = true;
                    }
                }
            }
        }
    }
    drop(stdin);
    if let Some(failure) = failure {
        // Before the go message: the receiver must not keep anything.
        kill(&mut child).await;
        return Err(failure);
    }
    let status = tokio::time::timeout(EXIT_WAIT, child.wait()).await;
    if status.is_err() {
        kill(&mut child).await;
    }
    if !went {
        return Err(SessionError::Refused(
            "the xl stream ended before the point of no return".into(),
        ));
    }
    Ok(match crate::xl::stream::receiver_report(&output) {
        Some(0) => Ended::Kept,
        Some(_) => Ended::ReceiverGaveUp,
        None => Ended::Undecided,
    })
}

fn spawn(binary: &Path, options: &[String], dir: &Path) -> Result<Child, SessionError> {
    let stderr = std::fs::File::create(dir.join("xl.stderr")).map_err(|e| {
        SessionError::Refused(format!("cannot create {}/xl.stderr: {e}", dir.display()))
    })?;
    Command::new(binary)
        .args(options)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .current_dir("/")
        .process_group(0)
        .spawn()
        .map_err(|e| {
            SessionError::Refused(format!(
                "cannot run {} (--xl-binary): {e}",
                binary.display()
            ))
        })
}

/// Ends `xl migrate-receive` before the point of no return: its stdin is closed already, so it
/// normally exits by itself, destroying the domain it was creating; killed if it does not.
async fn kill(child: &mut Child) {
    if tokio::time::timeout(EXIT_WAIT, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn only_xls_own_options() {
        assert!(check_options(&s(&["migrate-receive"])).is_ok());
        assert!(check_options(&s(&["-t", "-vvv", "migrate-receive", "-e", "-p"])).is_ok());
        let e =
            check_options(&s(&["migrate-receive", "-C", "/etc/passwd"])).expect_err("must fail");
        assert!(e.contains("\"-C\""), "{e}");
        assert!(check_options(&s(&["destroy", "vm1"])).is_err());
        assert!(check_options(&s(&["-f", "migrate-receive"])).is_err());
    }

    #[test]
    fn reads_the_report() {
        let mut out = b"xl migration receiver ready, send binary domain data.\n".to_vec();
        out.extend_from_slice(b"domain received, ready to unpause\0");
        let report = crate::xl::stream::receiver_report;
        assert_eq!(report(&out), None);
        out.extend_from_slice(crate::xl::stream::REPORT);
        assert_eq!(report(&out), None);
        out.push(0);
        assert_eq!(report(&out), Some(0));
    }
}
