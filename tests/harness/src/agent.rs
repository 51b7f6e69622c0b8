//! `ferry agent` subprocesses on an address of the test's choosing, killed when dropped, and the
//! token files and state directories they read.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::guest::guest_images;
use crate::Ferry;

/// A `ferry agent` subprocess; killed on drop.
pub struct AgentProc {
    pub child: Child,
    /// The address it printed it listens on.
    pub addr: String,
    pub storage: PathBuf,
}

impl AgentProc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Entries left in the storage directory (a refused or rolled-back migration leaves none).
    pub fn leftovers(&self) -> Vec<String> {
        std::fs::read_dir(&self.storage)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Ferry {
    /// Starts an agent on 127.0.0.1 with a random port that may load the test guest's kernel and
    /// initrd (`--allow-path` their directory), plus `extra` flags; its log goes to the test's
    /// stderr.
    pub fn agent(self, storage: &Path, token_file: &Path, extra: &[&str]) -> AgentProc {
        let kernel = guest_images().kernel;
        let guest_dir = kernel.parent().expect("guest image directory");
        let mut args: Vec<&OsStr> = vec!["--allow-path".as_ref(), guest_dir.as_os_str()];
        args.extend(extra.iter().map(|e| OsStr::new(*e)));
        self.agent_bare(storage, token_file, &args)
    }

    /// Starts an agent on 127.0.0.1 with exactly these flags besides listen, storage and token.
    pub fn agent_bare(self, storage: &Path, token_file: &Path, extra: &[&OsStr]) -> AgentProc {
        std::fs::create_dir_all(storage).expect("create storage");
        let mut cmd = self.command();
        cmd.args(["agent", "--listen", "127.0.0.1:0", "--storage"])
            .arg(storage)
            .arg("--token-file")
            .arg(token_file)
            .arg("--state-dir")
            .arg(agent_state_dir(storage))
            .args(extra)
            .env("FERRY_LOG", "ferry=info")
            .stderr(Stdio::inherit());
        started(cmd, storage, "127.0.0.1:")
    }

    /// An agent with its stderr in a file beside its storage (to see where it holds) on a given
    /// address.
    pub fn spawn_agent(
        self,
        storage: &Path,
        token: &Path,
        listen: &str,
        env: &[(&str, &str)],
    ) -> AgentProc {
        self.spawn_agent_with(storage, token, listen, &[], env)
    }

    /// [`spawn_agent`](Self::spawn_agent) with more arguments.
    pub fn spawn_agent_with(
        self,
        storage: &Path,
        token: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        self.spawn_agent_in(None, storage, token, listen, args, env)
    }

    /// [`spawn_agent_with`](Self::spawn_agent_with) inside network namespace `netns` (when
    /// given).
    pub fn spawn_agent_in(
        self,
        netns: Option<&str>,
        storage: &Path,
        token: &Path,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        std::fs::create_dir_all(storage).expect("storage");
        let log = storage.with_extension("log");
        let stderr = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("agent log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(self.path());
                cmd
            }
            None => self.command(),
        };
        cmd.args(["agent", "--listen", listen, "--storage"])
            .arg(storage)
            .arg("--token-file")
            .arg(token)
            .arg("--state-dir")
            .arg(agent_state_dir(storage))
            .args(["--recover-window", "20"])
            .arg("--allow-path")
            .arg(
                guest_images()
                    .kernel
                    .parent()
                    .expect("guest image directory"),
            )
            .args(args)
            .envs(env.iter().copied())
            .env("FERRY_LOG", "ferry=info")
            .stderr(stderr);
        let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
        started(cmd, storage, host)
    }
}

/// Spawns the agent `cmd` describes and waits for the line where it says its address, which must
/// start with `host`.
fn started(mut cmd: Command, storage: &Path, host: &str) -> AgentProc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ferry agent");
    let stdout = child.stdout.take().expect("agent stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("agent prints its address");
    let addr = line.trim().rsplit(' ').next().expect("address").to_string();
    assert!(addr.starts_with(host), "agent said {line:?}");
    AgentProc {
        child,
        addr,
        storage: storage.to_path_buf(),
    }
}

/// The agent's own state directory (its TLS identity) beside its storage.
pub fn agent_state_dir(storage: &Path) -> PathBuf {
    storage.with_extension("agent-state")
}

/// A token file as the README says to make one: readable by its owner only.
pub fn token_file(dir: &Path, content: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(format!("token-{}", content.len()));
    std::fs::write(&path, content).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path
}
