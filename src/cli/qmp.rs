//! `ferry qmp SOCKET COMMAND [ARGS_JSON]` and `ferry qmp SOCKET --events`.
//!
//! A thin shell over the `qmp` crate for scripts and people: the command's `return` as one JSON
//! line on stdout (exit 0); QEMU's error as `CLASS: desc` on stderr (exit 1); or, with
//! `--events`, one JSON line per event until QEMU closes the socket (exit 0). Bad input — a
//! missing socket, a socket that is not QMP, ARGS_JSON that is not a JSON object — is one line on
//! stderr and exit 2, before anything was sent.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use qmp::{Error, Qmp};
use serde_json::Value;

use super::{fail, EXIT_FAILED, EXIT_USAGE};

/// Arguments of `ferry qmp`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  ferry qmp /run/vm1/qmp.sock query-status\n  \
                        ferry qmp /run/vm1/qmp.sock query-block-jobs\n  \
                        ferry qmp /run/vm1/qmp.sock migrate-set-parameters '{\"max-bandwidth\": 0}'\n  \
                        ferry qmp /run/vm1/qmp.sock --events"
)]
pub struct QmpArgs {
    /// QEMU's QMP unix socket (QEMU started with -qmp unix:PATH,server=on,wait=off).
    socket: PathBuf,
    /// The QMP command to run, e.g. query-status.
    #[arg(required_unless_present = "events", conflicts_with = "events")]
    command: Option<String>,
    /// The command's arguments as a JSON object, e.g. '{"device": "drive0"}'.
    #[arg(value_name = "ARGS_JSON")]
    args_json: Option<String>,
    /// Print each event as one JSON line as it arrives, until QEMU closes the socket.
    #[arg(long)]
    events: bool,
}

/// Runs `ferry qmp`.
pub async fn run(args: QmpArgs) -> ExitCode {
    // Checked before connecting: bad input must not reach QEMU.
    let arguments = match args.args_json.as_deref().map(parse_arguments).transpose() {
        Ok(arguments) => arguments.unwrap_or(Value::Null),
        Err(message) => return fail(EXIT_USAGE, message),
    };
    let qmp = match Qmp::connect_unix(&args.socket).await {
        Ok(qmp) => qmp,
        Err(e) => return connect_failed(&args.socket, &e),
    };
    match args.command {
        Some(command) => execute(&qmp, &command, arguments).await,
        None => follow_events(&qmp).await,
    }
}

fn parse_arguments(text: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(format!(
            "ARGS_JSON must be a JSON object like '{{\"device\": \"drive0\"}}', got {text}"
        )),
        Err(e) => Err(format!("ARGS_JSON is not valid JSON ({e}): {text}")),
    }
}

fn connect_failed(socket: &std::path::Path, e: &Error) -> ExitCode {
    let path = socket.display();
    match e {
        Error::Connect { source, .. } => fail(
            EXIT_USAGE,
            format_args!("cannot connect to QMP socket {path}: {source}"),
        ),
        Error::NotQmp { detail } => fail(
            EXIT_USAGE,
            format_args!("{path} is not a QMP socket: {detail}"),
        ),
        Error::LineTooLong { .. } | Error::Malformed { .. } => fail(
            EXIT_USAGE,
            format_args!("{path} is not a QMP socket: {}", crate::error_chain(e)),
        ),
        Error::Timeout { .. } => fail(
            EXIT_USAGE,
            format_args!("{path}: {}", crate::error_chain(e)),
        ),
        _ => fail(
            EXIT_FAILED,
            format_args!("{path}: QMP handshake failed: {}", crate::error_chain(e)),
        ),
    }
}

async fn execute(qmp: &Qmp, command: &str, arguments: Value) -> ExitCode {
    match qmp.execute_raw(command, arguments).await {
        Ok(value) => match print_line(&value.to_string()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => stdout_failed(&e),
        },
        Err(e @ Error::Qmp { .. }) => {
            // Exactly QEMU's words, without the `ferry:` prefix: scripts match on the class.
            eprintln!("{e}");
            ExitCode::from(EXIT_FAILED)
        }
        Err(Error::Disconnected) => fail(
            EXIT_FAILED,
            format_args!(
                "{command}: no reply: {}",
                qmp.close_reason()
                    .map_or_else(|| "connection closed".into(), |r| r.to_string())
            ),
        ),
        Err(e) => fail(
            EXIT_FAILED,
            format_args!("{command}: {}", crate::error_chain(&e)),
        ),
    }
}

async fn follow_events(qmp: &Qmp) -> ExitCode {
    let mut events = qmp.events();
    loop {
        match events.next().await {
            Ok(event) => {
                let line = match serde_json::to_string(&event) {
                    Ok(line) => line,
                    Err(e) => {
                        return fail(
                            EXIT_FAILED,
                            format_args!("cannot encode event {}: {e}", event.name),
                        )
                    }
                };
                if let Err(e) = print_line(&line) {
                    return stdout_failed(&e);
                }
            }
            Err(Error::EventsLagged { missed }) => {
                // Keep following: the lines that do come are still true, and the gap is said.
                tracing::warn!(missed, "output too slow, events dropped");
                eprintln!("ferry: missed {missed} events: stdout was read too slowly");
            }
            Err(Error::Disconnected) => {
                return match qmp.close_reason() {
                    Some(reason) if !reason.is_clean() => fail(EXIT_FAILED, reason),
                    _ => ExitCode::SUCCESS,
                };
            }
            Err(e) => return fail(EXIT_FAILED, crate::error_chain(&e)),
        }
    }
}

/// One compact JSON line on stdout, flushed so that a reader sees events as they happen.
fn print_line(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

/// A closed pipe (`| head -n1`) means the reader has what it wanted: end quietly.
fn stdout_failed(e: &std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        ExitCode::SUCCESS
    } else {
        fail(EXIT_FAILED, format_args!("cannot write to stdout: {e}"))
    }
}
