//! What the agent lets a source run on this host: which QEMU binary, and which host files that
//! QEMU may load by path (`-kernel`, `-initrd`, `-bios`, `-dtb`, `-shim`).
//!
//! A token proves "may migrate here", not "may run anything here". So the binary is always the
//! agent's own choice: one of the QEMU system emulators it was configured with (`--qemu-binary`),
//! or by default a `qemu-system-*` on its PATH, picked by the *name* of the source's binary, never
//! by a path the source sent. Host files must lie under directories the operator allows
//! (`--allow-path`); a path outside them gets the same answer as a missing one, so a source cannot
//! use the agent to learn what exists on this host.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::vm::argv::{self, SANDBOX};
use crate::vm::VmDescription;

/// Where distributions install firmware and ROMs: the default `--allow-path`.
pub const DEFAULT_ALLOW_PATHS: &[&str] = &[
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/share/ovmf",
    "/usr/share/OVMF",
    "/usr/share/qemu-efi-aarch64",
    "/usr/share/AAVMF",
    "/usr/lib/ipxe/qemu",
];

/// A refusal or a configuration error; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A configured binary would never be chosen.
    #[error(
        "--qemu-binary {path}: the file name must be qemu-system-ARCH (sources are matched by it)"
    )]
    BinaryName {
        /// As given.
        path: String,
    },
    /// A configured binary does not exist.
    #[error("--qemu-binary {path}: no such program (give a path, or a name on PATH)")]
    BinaryMissing {
        /// As given.
        path: String,
    },
    /// A configured directory is unusable.
    #[error("--allow-path {path}: not a directory this agent can read")]
    AllowPath {
        /// As given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source's binary is not one this agent runs.
    #[error("the source's QEMU is `{wanted}`; this agent runs only QEMU system emulators it is configured for ({allowed})")]
    Binary {
        /// The source's argv\[0\] base name (or the whole argv\[0\] if it has none).
        wanted: String,
        /// What would have been accepted.
        allowed: String,
    },
    /// The binary cannot run sandboxed.
    #[error("{binary} does not accept `-sandbox {SANDBOX}` ({detail}): install a QEMU built with seccomp support")]
    NoSandbox {
        /// The binary.
        binary: String,
        /// What it said.
        detail: String,
    },
    /// A host file outside the allowed directories, or missing (the same answer on purpose).
    #[error("-{option} {path}: not a file under the directories this agent allows ({dirs}); put it under one of them on this host, or start the agent with --allow-path DIR")]
    HostFile {
        /// The option.
        option: String,
        /// The path as the source gave it.
        path: String,
        /// The allowed directories.
        dirs: String,
    },
}

/// A binary as it was when checked: its path and modification time.
type BinaryVersion = (PathBuf, Option<std::time::SystemTime>);

/// The agent's choices, fixed at start-up.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Configured binaries (absolute); empty: `qemu-system-*` on PATH.
    binaries: Vec<PathBuf>,
    /// Canonical directories host files may come from.
    allow_paths: Vec<PathBuf>,
    /// Binaries (by path and modification time) that accepted the sandbox already: the check
    /// runs QEMU, which costs tens of milliseconds a migration; an upgraded binary is checked
    /// again.
    sandboxed: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<BinaryVersion>>>,
}

impl Policy {
    /// Checks the configuration: every binary named `qemu-system-*` and found, every directory
    /// usable. No `allow_paths` means the distribution's firmware directories that exist here.
    pub fn new(binaries: &[PathBuf], allow_paths: &[PathBuf]) -> Result<Policy, PolicyError> {
        let mut resolved = Vec::new();
        for binary in binaries {
            let shown = binary.display().to_string();
            if !binary
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(is_system_emulator)
            {
                return Err(PolicyError::BinaryName { path: shown });
            }
            let found = if binary.components().count() > 1 {
                binary.is_file().then(|| binary.clone())
            } else {
                find_on_path(&shown)
            };
            resolved.push(found.ok_or(PolicyError::BinaryMissing { path: shown })?);
        }
        let mut dirs = Vec::new();
        if allow_paths.is_empty() {
            dirs.extend(
                DEFAULT_ALLOW_PATHS
                    .iter()
                    .filter_map(|d| std::fs::canonicalize(d).ok()),
            );
        }
        for dir in allow_paths {
            let canonical = std::fs::canonicalize(dir)
                .and_then(|c| match c.is_dir() {
                    true => Ok(c),
                    false => Err(std::io::ErrorKind::NotADirectory.into()),
                })
                .map_err(|source| PolicyError::AllowPath {
                    path: dir.display().to_string(),
                    source,
                })?;
            dirs.push(canonical);
        }
        Ok(Policy {
            binaries: resolved,
            allow_paths: dirs,
            sandboxed: Default::default(),
        })
    }

    /// The binary to run for `vm`: the configured (or PATH) emulator with the same file name as
    /// the source's, after checking it can run sandboxed.
    pub async fn binary_for(&self, vm: &VmDescription) -> Result<String, PolicyError> {
        let argv0 = vm.argv.first().map(String::as_str).unwrap_or("");
        let wanted = Path::new(argv0)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(argv0);
        let chosen = if !is_system_emulator(wanted) {
            None
        } else if self.binaries.is_empty() {
            find_on_path(wanted)
        } else {
            self.binaries
                .iter()
                .find(|b| b.file_name().and_then(|n| n.to_str()) == Some(wanted))
                .cloned()
        };
        let Some(binary) = chosen else {
            return Err(PolicyError::Binary {
                wanted: wanted.chars().take(64).collect(),
                allowed: self.allowed_binaries(),
            });
        };
        self.check_sandboxed(&binary).await?;
        Ok(binary.display().to_string())
    }

    /// Runs [`check_sandbox`] once per binary version.
    async fn check_sandboxed(&self, binary: &Path) -> Result<(), PolicyError> {
        let key = (
            binary.to_path_buf(),
            std::fs::metadata(binary).and_then(|m| m.modified()).ok(),
        );
        let known = |s: &Self| s.sandboxed.lock().is_ok_and(|set| set.contains(&key));
        if !known(self) {
            check_sandbox(binary).await?;
            if let Ok(mut set) = self.sandboxed.lock() {
                set.insert(key);
            }
        }
        Ok(())
    }

    /// Checks the binaries this agent will most likely start (the configured ones, else this
    /// host's own `qemu-system-ARCH` on PATH) now, so that the first migration's negotiation
    /// does not start QEMU once more for it (0.1 s here, more on a loaded host). Failures are
    /// left for the migration that needs the binary to report.
    pub async fn prewarm(&self) {
        let binaries = if self.binaries.is_empty() {
            find_on_path(&format!("qemu-system-{}", std::env::consts::ARCH))
                .into_iter()
                .collect()
        } else {
            self.binaries.clone()
        };
        for binary in binaries {
            let _ = self.check_sandboxed(&binary).await;
        }
    }

    /// Every file the destination QEMU would load by path must be under an allowed directory.
    pub fn check_host_files(&self, vm: &VmDescription) -> Result<(), PolicyError> {
        for (option, path) in argv::host_files(&vm.argv) {
            if !self.allows(Path::new(&path)) {
                return Err(PolicyError::HostFile {
                    option,
                    path,
                    dirs: self.allowed_dirs(),
                });
            }
        }
        Ok(())
    }

    /// Canonicalized first, so `..` and symlinks cannot lead out of an allowed directory.
    fn allows(&self, path: &Path) -> bool {
        if !path.is_absolute() {
            return false;
        }
        let Ok(canonical) = std::fs::canonicalize(path) else {
            return false;
        };
        canonical.is_file() && self.allow_paths.iter().any(|d| canonical.starts_with(d))
    }

    fn allowed_dirs(&self) -> String {
        if self.allow_paths.is_empty() {
            return "none".into();
        }
        let dirs: Vec<String> = self
            .allow_paths
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        dirs.join(", ")
    }

    fn allowed_binaries(&self) -> String {
        if self.binaries.is_empty() {
            let found = emulators_on_path();
            return format!(
                "qemu-system-ARCH on its PATH, here: {}",
                if found.is_empty() {
                    "none".to_string()
                } else {
                    found.join(", ")
                }
            );
        }
        let names: Vec<String> = self
            .binaries
            .iter()
            .map(|b| b.display().to_string())
            .collect();
        names.join(", ")
    }
}

/// `qemu-system-` followed by an architecture name (`[a-z0-9_]+`).
fn is_system_emulator(name: &str) -> bool {
    name.strip_prefix("qemu-system-").is_some_and(|arch| {
        !arch.is_empty()
            && arch
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    })
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    path_dirs()
        .into_iter()
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn emulators_on_path() -> Vec<String> {
    let mut names: Vec<String> = path_dirs()
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_system_emulator(n))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// QEMU parses `-sandbox` (and refuses it when built without seccomp, or an unknown key in it)
/// before it acts on `-version`, so this is a cheap, exact test.
async fn check_sandbox(binary: &Path) -> Result<(), PolicyError> {
    let output = tokio::process::Command::new(binary)
        .args(["-sandbox", SANDBOX, "-version"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await;
    let detail = match output {
        Ok(out) if out.status.success() => return Ok(()),
        Ok(out) => String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("no output")
            .trim()
            .to_string(),
        Err(e) => e.to_string(),
    };
    Err(PolicyError::NoSandbox {
        binary: binary.display().to_string(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(argv: &[&str]) -> VmDescription {
        VmDescription {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            machine: None,
            disks: vec![],
            running: true,
        }
    }

    #[test]
    fn emulator_names() {
        assert!(is_system_emulator("qemu-system-x86_64"));
        assert!(is_system_emulator("qemu-system-aarch64"));
        assert!(!is_system_emulator("qemu-system-"));
        assert!(!is_system_emulator("qemu-img"));
        assert!(!is_system_emulator("sh"));
        assert!(!is_system_emulator("qemu-system-x86_64 -x"));
        assert!(!is_system_emulator("qemu-system-../sh"));
    }

    #[test]
    fn configured_binaries_must_be_emulators() {
        let err = Policy::new(&[PathBuf::from("/bin/sh")], &[]).expect_err("sh");
        assert!(err.to_string().contains("qemu-system-ARCH"), "{err}");
    }

    #[tokio::test]
    async fn the_source_never_picks_a_path() {
        let policy = Policy::new(&[], &[]).expect("defaults");
        for argv0 in ["sh", "/bin/sh", "/tmp/qemu-system-x86_64/../../bin/sh", ""] {
            let err = policy.binary_for(&vm(&[argv0])).await.expect_err(argv0);
            assert!(err.to_string().contains("qemu-system-ARCH"), "{err}");
        }
        // A path from the source is reduced to its name and looked up here.
        let chosen = policy
            .binary_for(&vm(&["/nonexistent/dir/qemu-system-x86_64"]))
            .await
            .expect("qemu-system-x86_64 on PATH");
        assert!(
            chosen.starts_with('/') && !chosen.starts_with("/nonexistent"),
            "{chosen}"
        );
    }

    #[test]
    fn host_files_stay_under_allowed_directories() {
        let root = tempfile::tempdir().expect("tempdir");
        let allowed = root.path().join("fw");
        std::fs::create_dir(&allowed).expect("dir");
        std::fs::write(allowed.join("bios.bin"), b"x").expect("file");
        std::fs::write(root.path().join("secret"), b"x").expect("file");
        std::os::unix::fs::symlink(root.path().join("secret"), allowed.join("link"))
            .expect("symlink");
        let policy = Policy::new(&[], std::slice::from_ref(&allowed)).expect("policy");
        let ok = format!("{}/bios.bin", allowed.display());
        policy
            .check_host_files(&vm(&["q", "-bios", &ok]))
            .expect("inside");
        let outside = root.path().join("secret").display().to_string();
        let dotdot = format!("{}/../secret", allowed.display());
        let link = format!("{}/link", allowed.display());
        let missing = format!("{}/missing", allowed.display());
        let mut messages = Vec::new();
        for path in [&outside, &dotdot, &link, &missing, &"bios.bin".to_string()] {
            let err = policy
                .check_host_files(&vm(&["q", "-kernel", path]))
                .expect_err(path);
            messages.push(err.to_string().replace(path.as_str(), "PATH"));
        }
        messages.dedup();
        assert_eq!(
            messages.len(),
            1,
            "one answer for outside and missing: {messages:?}"
        );
        assert!(messages[0].contains("--allow-path"), "{}", messages[0]);
    }
}
