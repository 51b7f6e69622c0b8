//! `ferry xl relay --via SOCKET HOST xl ... migrate-receive ...`: the transport `xl migrate`
//! runs in place of ssh (`-s`). xl runs its transport as `sh -c "exec CMD HOST xl [-t] [-T]
//! [-v...] migrate-receive [-e] [-d] [-p]"` with its stream on the transport's stdin and stdout
//! (`tools/xl/xl_migrate.c`: `create_migration_child`, `main_migrate`).
//!
//! The relay does nothing but carry bytes: it connects to `ferry xl migrate`'s private unix
//! socket, sends its own arguments as one JSON line (so that `ferry xl migrate` learns the
//! options xl wants the receiver to get), then copies stdin to the socket and the socket to
//! stdout, each direction on its own thread with no buffering beyond one read. The parsing, the
//! final disk sync and the link to the agent all live in the long-lived `ferry xl migrate`,
//! which already holds the QMP connection, the mirror jobs and the agent link.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The longest first line `ferry xl migrate` reads from a relay.
pub const MAX_HELLO: usize = 4096;

/// Runs the relay to the end of both directions. Errors say what failed, on one line.
pub fn run(via: &Path, args: &[String]) -> Result<(), String> {
    let mut socket = UnixStream::connect(via).map_err(|e| {
        format!(
            "cannot reach ferry xl migrate at {}: {e}; the relay is only run by `ferry xl migrate`",
            via.display()
        )
    })?;
    let mut hello = serde_json::to_vec(args).map_err(|e| e.to_string())?;
    hello.push(b'\n');
    if hello.len() > MAX_HELLO {
        return Err("the transport's arguments are too long".into());
    }
    socket
        .write_all(&hello)
        .map_err(|e| format!("cannot write to {}: {e}", via.display()))?;
    let mut up = socket
        .try_clone()
        .map_err(|e| format!("cannot use {}: {e}", via.display()))?;
    let down = std::thread::spawn(move || -> std::io::Result<()> {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                // xl closed its end: so does the relay, and the far end sees the stream end.
                return socket.shutdown(Shutdown::Write);
            }
            socket.write_all(&buf[..n])?;
        }
    });
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let result = loop {
        match up.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = stdout.write_all(&buf[..n]).and_then(|()| stdout.flush()) {
                    break Err(format!("cannot write to xl: {e}"));
                }
            }
            Err(e) => break Err(format!("lost ferry xl migrate: {e}")),
        }
    };
    // The receiver's side ended, so the stream is over: the process exits without waiting for
    // the stdin thread (xl may keep its end open until it exits itself).
    drop(stdout);
    let _ = up.shutdown(Shutdown::Both);
    drop(down);
    result
}
