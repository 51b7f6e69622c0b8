//! The RAM relay's keeper: a small process beside `ferry migrate` that holds a second copy of
//! every RAM connection the source QEMU opened to the relay, so that a `ferry migrate` killed
//! outright (SIGKILL, OOM) still ends a multifd migration the safe way.
//!
//! Without it, the kernel closes all of QEMU's connections at once when the relay's process
//! dies, and QEMU 10.0 may then hang for good with the guest paused (see [`super::ram`]: a
//! multifd thread that finds its channel broken during the switchover can exit without
//! confirming the sync its migration thread waits for, holding QEMU's big lock). The keeper
//! does nothing while `ferry migrate` lives. When its control socket ends without the "done"
//! byte (its parent died), it does what the live relay would: it shuts down the main channel,
//! so that QEMU fails the migration there and resumes the guest, and reads and drops what QEMU
//! still writes on the multifd channels until QEMU closes them. Then it exits.
//!
//! The connections travel to it as file descriptors over a unix socketpair (`SCM_RIGHTS`), each
//! after a one-byte tag (rustix: its `recvmsg` hands received descriptors over as `OwnedFd`,
//! with no `unsafe` here). It runs in its own process group, so a terminal's Ctrl-C meant for
//! `ferry migrate` does not reach it; its own death changes nothing (`ferry migrate` still
//! holds every connection).

use std::io::{IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// The hidden subcommand that runs [`run`].
pub const SUBCOMMAND: &str = "keep-ram-channels";

/// Tag: the main channel's descriptor follows.
const MAIN: u8 = b'M';
/// Tag: a multifd channel's descriptor follows.
const CHANNEL: u8 = b'C';
/// Tag: the migration is settled; close everything and exit.
const DONE: u8 = b'D';

/// How long an orphaned keeper drains before it gives up on a QEMU that never closes.
const DRAIN_LIMIT: Duration = Duration::from_secs(600);

/// The parent's handle on a running keeper. Dropping it tells the keeper the migration is
/// settled (it closes its copies and exits).
#[derive(Debug)]
pub struct Keeper {
    control: UnixStream,
    child: Child,
}

impl Keeper {
    /// Starts `program keep-ram-channels` (the ferry binary) with one end of a socketpair as
    /// its stdin.
    pub fn spawn(program: &Path) -> std::io::Result<Keeper> {
        let (ours, theirs) = UnixStream::pair()?;
        let child = Command::new(program)
            .arg(SUBCOMMAND)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        Ok(Keeper {
            control: ours,
            child,
        })
    }

    /// Hands the keeper a copy of one of QEMU's RAM connections (`main`: the first, the main
    /// channel).
    pub fn hold(&self, connection: BorrowedFd<'_>, main: bool) -> std::io::Result<()> {
        send(
            self.control.as_fd(),
            if main { MAIN } else { CHANNEL },
            connection,
        )
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = std::io::Write::write_all(&mut self.control, &[DONE]);
        let _ = self.control.shutdown(Shutdown::Both);
        // It exits at once on DONE; reaped here so that no zombie stays behind.
        let _ = self.child.wait();
    }
}

/// The keeper process: collects descriptors until DONE (exit) or the end of its stdin (its
/// parent died: tear down as the module doc says). Synchronous on purpose: a few blocking
/// reads, no runtime.
pub fn run() -> std::process::ExitCode {
    // Stdin is the socketpair end `Keeper::spawn` gave.
    match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(control) => {
            keep(control.as_fd(), DRAIN_LIMIT);
            std::process::ExitCode::SUCCESS
        }
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

/// The keeper's work on its control socket; returns once the migration is settled or the
/// teardown is done.
fn keep(control: BorrowedFd<'_>, limit: Duration) {
    let mut main: Option<OwnedFd> = None;
    let mut channels: Vec<OwnedFd> = Vec::new();
    loop {
        match receive(control) {
            Ok(Some((MAIN, Some(fd)))) => main = Some(fd),
            Ok(Some((CHANNEL, Some(fd)))) => channels.push(fd),
            Ok(Some((DONE, _))) => return,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    if let Some(main) = &main {
        let _ = rustix::net::shutdown(main, rustix::net::Shutdown::Both);
    }
    drain(channels, limit);
}

/// Sends `tag` with a copy of `fd`.
fn send(control: BorrowedFd<'_>, tag: u8, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = SendAncillaryBuffer::new(&mut space);
    let fds = [fd];
    ancillary.push(SendAncillaryMessage::ScmRights(&fds));
    sendmsg(
        control,
        &[IoSlice::new(&[tag])],
        &mut ancillary,
        SendFlags::empty(),
    )?;
    Ok(())
}

/// One message: its tag and the descriptor that came with it; `None` at the end of the stream.
fn receive(control: BorrowedFd<'_>) -> std::io::Result<Option<(u8, Option<OwnedFd>)>> {
    let mut tag = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut ancillary = RecvAncillaryBuffer::new(&mut space);
    let msg = recvmsg(
        control,
        &mut [IoSliceMut::new(&mut tag)],
        &mut ancillary,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    if msg.bytes == 0 {
        return Ok(None);
    }
    let mut fd = None;
    for message in ancillary.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            for owned in fds {
                fd.get_or_insert(owned);
            }
        }
    }
    Ok(Some((tag[0], fd)))
}

/// Reads each channel to its end (or an error), dropping the bytes, at most `limit` in all.
fn drain(channels: Vec<OwnedFd>, limit: Duration) {
    let deadline = Instant::now() + limit;
    let (done, finished) = std::sync::mpsc::channel();
    let count = channels.len();
    for fd in channels {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut stream = UnixStream::from(fd);
            let mut sink = vec![0u8; 256 * 1024];
            while let Ok(1..) = stream.read(&mut sink) {}
            let _ = done.send(());
        });
    }
    for _ in 0..count {
        let left = deadline.saturating_duration_since(Instant::now());
        if finished.recv_timeout(left).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor sent with its tag arrives as a working copy of the same socket.
    #[test]
    fn a_connection_travels_with_its_tag_and_stays_the_same_socket() {
        let (parent, child) = UnixStream::pair().expect("pair");
        let keeper_side = OwnedFd::from(child);
        let (mut qemu, relay) = UnixStream::pair().expect("pair");
        send(parent.as_fd(), MAIN, relay.as_fd()).expect("send");
        let (got, fd) = receive(keeper_side.as_fd())
            .expect("receive")
            .expect("a message");
        assert_eq!(got, MAIN);
        let copy = UnixStream::from(fd.expect("a descriptor"));
        // The relay's own copy closes: the connection stays open through the keeper's.
        drop(relay);
        std::io::Write::write_all(&mut qemu, b"still open").expect("write");
        let mut buf = [0u8; 10];
        (&copy).read_exact(&mut buf).expect("read through the copy");
        assert_eq!(&buf, b"still open");
        drop(parent);
        assert!(matches!(receive(keeper_side.as_fd()), Ok(None)));
    }

    /// Its parent gone (the control socket ends without DONE), the keeper closes the main
    /// channel and takes what QEMU still writes on a multifd channel until QEMU closes it.
    #[test]
    fn an_orphaned_keeper_closes_the_main_channel_and_drains_the_others() {
        let (parent, child) = UnixStream::pair().expect("pair");
        let (mut qemu_main, relay_main) = UnixStream::pair().expect("pair");
        let (mut qemu_channel, relay_channel) = UnixStream::pair().expect("pair");
        send(parent.as_fd(), MAIN, relay_main.as_fd()).expect("send");
        send(parent.as_fd(), CHANNEL, relay_channel.as_fd()).expect("send");
        let keeper = std::thread::spawn(move || keep(child.as_fd(), Duration::from_secs(60)));
        // The relay's process dies: its copies and the control socket close at once.
        drop((parent, relay_main, relay_channel));
        let mut rest = Vec::new();
        qemu_main
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        assert_eq!(
            qemu_main
                .read_to_end(&mut rest)
                .expect("the main channel ends"),
            0
        );
        qemu_channel
            .set_write_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        for _ in 0..16 {
            std::io::Write::write_all(&mut qemu_channel, &[1u8; 1 << 20])
                .expect("a multifd channel keeps taking writes");
        }
        drop(qemu_channel);
        keeper
            .join()
            .expect("the keeper ends once QEMU closed the channel");
    }

    /// DONE: the migration is settled, the keeper leaves at once.
    #[test]
    fn done_ends_the_keeper() {
        let (mut parent, child) = UnixStream::pair().expect("pair");
        let (_qemu, relay) = UnixStream::pair().expect("pair");
        send(parent.as_fd(), CHANNEL, relay.as_fd()).expect("send");
        std::io::Write::write_all(&mut parent, &[DONE]).expect("done");
        let started = Instant::now();
        keep(child.as_fd(), Duration::from_secs(60));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// Draining stops when the peer closes, and at the limit when it does not.
    #[test]
    fn draining_ends_with_the_peer_or_at_the_limit() {
        let (mut writer, reader) = UnixStream::pair().expect("pair");
        let (_silent, stuck) = UnixStream::pair().expect("pair");
        let t = std::thread::spawn(move || {
            std::io::Write::write_all(&mut writer, &vec![7u8; 4 << 20]).expect("write");
        });
        let started = Instant::now();
        drain(vec![OwnedFd::from(reader)], Duration::from_secs(30));
        t.join().expect("writer");
        assert!(started.elapsed() < Duration::from_secs(10));
        let started = Instant::now();
        drain(vec![OwnedFd::from(stuck)], Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
