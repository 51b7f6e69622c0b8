//! `ferry migrate` and `ferry recover` runs: to completion with their JSON events, or held at a
//! fault point.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::checks::wait_for_text;
use crate::Ferry;

/// The outcome of one `ferry migrate --json` run.
pub struct MigrateRun {
    pub code: i32,
    pub events: Vec<Value>,
    pub stderr: String,
}

impl MigrateRun {
    pub fn last(&self) -> &Value {
        self.events.last().expect("at least one event")
    }

    pub fn of(&self, name: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == name).collect()
    }
}

/// The source state directory of a test: beside its token file, so each test has its own.
pub fn state_dir(token_file: &Path) -> PathBuf {
    token_file.parent().expect("token dir").join("source-state")
}

/// Parses what `ferry migrate --json` printed: one JSON event a line.
pub fn collect(code: i32, stdout: &[u8], stderr: &[u8]) -> MigrateRun {
    let events = String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    MigrateRun {
        code,
        events,
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    }
}

/// `ferry migrate` held at a fault point (it says so on stderr, kept in a file).
pub struct HeldMigrate {
    child: Child,
    stderr: PathBuf,
}

impl HeldMigrate {
    pub fn wait_held(&self) {
        wait_for_text(&self.stderr, "holding at", Duration::from_secs(120));
    }

    /// Waits for it to finish; returns its exit code and what it said on stderr.
    pub fn wait(mut self) -> (i32, String) {
        let status = self.child.wait().expect("wait for ferry migrate");
        let said = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        (status.code().unwrap_or(-1), said)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ferry {
    /// `ferry migrate --json` of the VM behind `qmp` to the agent at `to`, with the test's own
    /// source state directory; output captured.
    pub fn migrate_command(self, qmp: &Path, to: &str, token_file: &Path) -> Command {
        let mut cmd = self.command();
        cmd.args(["migrate", "--json", "--qmp"])
            .arg(qmp)
            .args(["--to", to, "--token-file"])
            .arg(token_file)
            .env("FERRY_STATE_DIR", state_dir(token_file))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs `ferry migrate --json` to completion.
    pub fn migrate(self, qmp: &Path, to: &str, token_file: &Path) -> MigrateRun {
        self.migrate_with(qmp, to, token_file, &[])
    }

    /// [`migrate`](Self::migrate) with more flags.
    pub fn migrate_with(
        self,
        qmp: &Path,
        to: &str,
        token_file: &Path,
        extra: &[&str],
    ) -> MigrateRun {
        let out = self
            .migrate_command(qmp, to, token_file)
            .args(extra)
            .output()
            .expect("run ferry migrate");
        collect(out.status.code().unwrap_or(-1), &out.stdout, &out.stderr)
    }

    /// Starts `ferry migrate` with `FERRY_HOLD_AT=hold`; its stderr goes to a file in `dir`.
    pub fn held_migrate(
        self,
        qmp: &Path,
        to: &str,
        token: &Path,
        hold: &str,
        dir: &Path,
    ) -> HeldMigrate {
        self.held_migrate_with(qmp, to, token, hold, dir, &[])
    }

    /// [`held_migrate`](Self::held_migrate) with more flags.
    pub fn held_migrate_with(
        self,
        qmp: &Path,
        to: &str,
        token: &Path,
        hold: &str,
        dir: &Path,
        extra: &[&str],
    ) -> HeldMigrate {
        let stderr = dir.join("migrate.err");
        let child = self
            .migrate_command(qmp, to, token)
            .args(extra)
            .env("FERRY_HOLD_AT", hold)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("err"))
            .spawn()
            .expect("spawn migrate");
        HeldMigrate { child, stderr }
    }

    /// Runs `ferry recover --json`; returns (exit code, the JSON line, stderr).
    pub fn recover(self, qmp: &Path, token: &Path) -> (i32, Value, String) {
        let out = self
            .command()
            .args(["recover", "--json", "--qmp"])
            .arg(qmp)
            .arg("--token-file")
            .arg(token)
            .env("FERRY_STATE_DIR", state_dir(token))
            .output()
            .expect("run ferry recover");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = stdout
            .lines()
            .last()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
            .unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            json,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}
