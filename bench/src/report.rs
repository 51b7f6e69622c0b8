//! The rows a run produces, the table printed from them, and the targets checked against them.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};

use crate::migration::MigrationRun;
use crate::mirror::MirrorRun;
use crate::physical::Limit;

mod targets;

/// The migration sections, in the order they are printed, with their titles.
const MIGRATION_SECTIONS: [(&str, &str); 5] = [
    ("migration", "Whole migration of the test guest (median of completed runs)"),
    ("filled", "Whole migration of the 2 GiB guest, 1.5 GiB of its RAM non-zero (median of completed runs)"),
    ("shaped-400", "Over a link shaped to 400 Mbit/s (tbf; median of completed runs; link limit: (disk data + RAM sent) / rate)"),
    ("shaped-2000", "Over a link shaped to 2 Gbit/s (tbf; median of completed runs; link limit: (disk data + RAM sent) / rate)"),
    ("convergence", "Convergence: the guest writing as fast as it can (median of completed runs)"),
];

/// The mirror sections, in the order they are printed, with their titles.
const MIRROR_SECTIONS: [(&str, &str); 3] = [
    ("mirror", "Mirror throughput, many 4 MiB chunks (median)"),
    ("extents", "Mirror throughput, few large extents (median)"),
    ("giant", "Sparse giant (median)"),
];

/// A mirror row: medians over the runs.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorRow {
    pub section: &'static str,
    pub server: String,
    /// TLS required (compared with the TLS references only).
    pub tls: bool,
    pub runs: usize,
    /// MiB of source data per second to BLOCK_JOB_READY.
    pub mib_s: Option<f64>,
    pub ready_s: Option<f64>,
    /// MiB of source data per second until the copy was on disk (server stopped, fdatasync).
    pub durable_mib_s: Option<f64>,
    pub flush_s: Option<f64>,
    /// Server CPU seconds per GiB of data.
    pub cpu_s_per_gib: Option<f64>,
    /// The source QEMU's CPU seconds per GiB of data.
    pub source_cpu_s_per_gib: Option<f64>,
    pub dest_allocated: Option<u64>,
    pub source_allocated: u64,
    /// Bytes identical in the verified run.
    pub identical: Option<bool>,
}

/// A migration row: medians over the completed runs of one flow.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationRow {
    pub section: &'static str,
    pub flow: String,
    pub runs: usize,
    pub completed: usize,
    pub errors: Vec<String>,
    pub total_s: Option<f64>,
    pub mirror_ready_s: Option<f64>,
    pub downtime_ms: Option<f64>,
    pub stop_to_resume_ms: Option<f64>,
    pub ack_gap_ms: Option<f64>,
    pub ack_gap_normal_ms: Option<f64>,
    /// Every completed run's acks were all found on the destination image.
    pub acks_verified: Option<bool>,
    /// Runs whose mirror ferry switched to write-blocking.
    pub write_blocking: usize,
    /// ferry's phases, median of each.
    pub phases_ms: Option<Value>,
    /// MiB of RAM sent.
    pub ram_mib: Option<f64>,
    /// Seconds the shaped link needs at least (see [`MigrationRun::link_limit_s`]).
    pub link_limit_s: Option<f64>,
    /// Total time over that floor, median of the runs' ratios.
    pub x_link_limit: Option<f64>,
}

/// Everything a run measured.
pub struct Report {
    quick: bool,
    limits: Vec<Limit>,
    mirrors: Vec<MirrorRow>,
    migrations: Vec<(&'static str, MigrationRun)>,
    elapsed: Duration,
}

fn med(mut v: Vec<f64>) -> Option<f64> {
    crate::median(&mut v)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.digits$}"))
}

/// `a / b` with two decimals, or `-`.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

impl Report {
    pub fn new(quick: bool) -> Self {
        Report {
            quick,
            limits: Vec::new(),
            mirrors: Vec::new(),
            migrations: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    pub fn limit(&mut self, limit: Limit) {
        eprintln!(
            "  {:<13} {:>8.0} MiB/s  ({})",
            limit.name, limit.mib_s, limit.how
        );
        self.limits.push(limit);
    }

    pub fn mirror(
        &mut self,
        section: &'static str,
        server: &str,
        tls: bool,
        data: u64,
        source_allocated: u64,
        runs: &[MirrorRun],
    ) {
        let gib = data as f64 / (1u64 << 30) as f64;
        let mib = data as f64 / (1u64 << 20) as f64;
        let row = MirrorRow {
            section,
            server: server.into(),
            tls,
            runs: runs.len(),
            mib_s: med(runs.iter().map(|r| mib / r.ready_s).collect()),
            ready_s: med(runs.iter().map(|r| r.ready_s).collect()),
            durable_mib_s: med(runs.iter().map(|r| mib / r.durable_s).collect()),
            flush_s: med(runs.iter().map(|r| r.flush_s).collect()),
            cpu_s_per_gib: med(runs.iter().map(|r| r.cpu_s / gib).collect()),
            source_cpu_s_per_gib: med(runs.iter().map(|r| r.source_cpu_s / gib).collect()),
            dest_allocated: med(runs.iter().map(|r| r.allocated as f64).collect())
                .map(|x| x as u64),
            source_allocated,
            identical: runs.first().map(|r| r.identical),
        };
        self.mirrors.push(row);
    }

    pub fn migration(&mut self, section: &'static str, flow: &str, run: Result<MigrationRun>) {
        let run = run.unwrap_or_else(|e| MigrationRun {
            flow: flow.into(),
            error: Some(format!("{e:#}")),
            ..Default::default()
        });
        if let Some(e) = &run.error {
            eprintln!("  {section} {}: {e}", run.flow);
        }
        self.migrations.push((section, run));
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
        print!("{}", self.table());
    }

    fn migration_rows(&self, section: &'static str) -> Vec<MigrationRow> {
        let mut flows: Vec<&str> = Vec::new();
        for (s, r) in &self.migrations {
            if *s == section && !flows.contains(&r.flow.as_str()) {
                flows.push(&r.flow);
            }
        }
        flows
            .into_iter()
            .map(|flow| {
                let all: Vec<&MigrationRun> = self
                    .migrations
                    .iter()
                    .filter(|(s, r)| *s == section && r.flow == flow)
                    .map(|(_, r)| r)
                    .collect();
                let ok: Vec<&MigrationRun> = all.iter().copied().filter(|r| r.completed).collect();
                let m = |f: &dyn Fn(&MigrationRun) -> Option<f64>| {
                    med(ok.iter().filter_map(|r| f(r)).collect())
                };
                let phases = ok.iter().any(|r| r.phases_ms.is_some()).then(|| {
                    let mut out = serde_json::Map::new();
                    for key in ["negotiation", "mirror", "ram", "switchover"] {
                        let v = m(&|r| r.phases_ms.as_ref()?.get(key)?.as_f64());
                        out.insert(key.into(), json!(v));
                    }
                    Value::Object(out)
                });
                MigrationRow {
                    section,
                    flow: flow.into(),
                    runs: all.len(),
                    completed: ok.len(),
                    errors: all.iter().filter_map(|r| r.error.clone()).collect(),
                    total_s: m(&|r| Some(r.total_s)),
                    mirror_ready_s: m(&|r| r.mirror_ready_s),
                    downtime_ms: m(&|r| r.downtime_ms.map(|d| d as f64)),
                    stop_to_resume_ms: m(&|r| r.stop_to_resume_ms),
                    ack_gap_ms: m(&|r| r.ack_gap_ms),
                    ack_gap_normal_ms: m(&|r| r.ack_gap_normal_ms),
                    acks_verified: (!ok.is_empty())
                        .then(|| ok.iter().all(|r| r.acks_verified == Some(true))),
                    write_blocking: all.iter().filter(|r| r.write_blocking).count(),
                    phases_ms: phases,
                    ram_mib: m(&|r| r.ram_bytes.map(|b| b as f64 / (1u64 << 20) as f64)),
                    link_limit_s: m(&|r| r.link_limit_s),
                    x_link_limit: m(&|r| r.link_limit_s.map(|l| r.total_s / l)),
                }
            })
            .collect()
    }

    /// The fastest and the leanest reference (not ferry) of a section, among the rows with
    /// the same `tls`.
    fn mirror_best(&self, section: &str, tls: bool) -> (Option<f64>, Option<f64>) {
        let refs = self.references(section, tls);
        let fastest = refs.clone().filter_map(|r| r.mib_s).reduce(f64::max);
        let leanest = refs.filter_map(|r| r.cpu_s_per_gib).reduce(f64::min);
        (fastest, leanest)
    }

    /// The fastest reference to durable (MiB/s until the copy is on disk).
    fn durable_best(&self, section: &str, tls: bool) -> Option<f64> {
        self.references(section, tls)
            .filter_map(|r| r.durable_mib_s)
            .reduce(f64::max)
    }

    fn references<'a>(
        &'a self,
        section: &'a str,
        tls: bool,
    ) -> impl Iterator<Item = &'a MirrorRow> + Clone + 'a {
        self.mirrors
            .iter()
            .filter(move |r| r.section == section && r.tls == tls && !r.server.starts_with("ferry"))
    }

    /// The table, as printed and pasted into BENCHMARKS.md.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mode = if self.quick { "quick" } else { "full" };
        let _ = writeln!(
            t,
            "\nferry-bench ({mode} run, {:.0} s)\n",
            self.elapsed.as_secs_f64()
        );
        if !self.limits.is_empty() {
            let _ = writeln!(t, "Machine limits (same run)\n");
            let _ = writeln!(t, "| limit | MiB/s | how |\n|---|---:|---|");
            for l in &self.limits {
                let _ = writeln!(t, "| {} | {:.0} | {} |", l.name, l.mib_s, l.how);
            }
            t.push('\n');
        }
        for (section, title) in MIRROR_SECTIONS {
            let rows: Vec<&MirrorRow> = self
                .mirrors
                .iter()
                .filter(|r| r.section == section)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(t, "{title}\n");
            if rows.iter().any(|r| r.tls) {
                let _ = writeln!(
                    t,
                    "`-tls` rows: TLS required, client certificate checked; their ratios are to the TLS references.\n"
                );
            }
            let _ = writeln!(
                t,
                "| server | runs | MiB/s to READY | x fastest ref | ready s | MiB/s on disk | x fastest ref on disk | CPU s/GiB | x leanest ref | final flush s | dest alloc MiB | source alloc MiB | identical |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for r in &rows {
                let (fastest, leanest) = self.mirror_best(section, r.tls);
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.server,
                    r.runs,
                    opt(r.mib_s, 0),
                    ratio(r.mib_s, fastest),
                    opt(r.ready_s, 2),
                    opt(r.durable_mib_s, 0),
                    ratio(r.durable_mib_s, self.durable_best(section, r.tls)),
                    opt(r.cpu_s_per_gib, 2),
                    ratio(r.cpu_s_per_gib, leanest),
                    opt(r.flush_s, 2),
                    r.dest_allocated
                        .map_or("-".into(), |a| (a >> 20).to_string()),
                    r.source_allocated >> 20,
                    r.identical.map_or("-", |b| if b { "yes" } else { "NO" }),
                );
            }
            t.push('\n');
            self.tls_cost(&mut t, &rows);
        }
        for (section, title) in MIGRATION_SECTIONS {
            let rows = self.migration_rows(section);
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(t, "{title}\n");
            let _ = writeln!(
                t,
                "| flow | completed | total s | link limit s | x link limit | RAM MiB sent | mirror READY s | downtime ms | STOP→RESUME ms | ack gap ms | normal ack gap ms | acks verified | write-blocking |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
            );
            for r in &rows {
                let _ = writeln!(
                    t,
                    "| {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.flow,
                    r.completed,
                    r.runs,
                    opt(r.total_s, 2),
                    opt(r.link_limit_s, 2),
                    opt(r.x_link_limit, 2),
                    opt(r.ram_mib, 0),
                    opt(r.mirror_ready_s, 2),
                    opt(r.downtime_ms, 0),
                    opt(r.stop_to_resume_ms, 1),
                    opt(r.ack_gap_ms, 1),
                    opt(r.ack_gap_normal_ms, 1),
                    r.acks_verified
                        .map_or("-", |b| if b { "yes" } else { "NO" }),
                    r.write_blocking,
                );
            }
            for r in &rows {
                for e in &r.errors {
                    let _ = writeln!(t, "\n{} failed: {e}", r.flow);
                }
            }
            t.push('\n');
        }
        let phases: Vec<MigrationRow> = MIGRATION_SECTIONS
            .into_iter()
            .flat_map(|(s, _)| self.migration_rows(s))
            .filter(|r| r.phases_ms.is_some())
            .collect();
        if !phases.is_empty() {
            let _ = writeln!(
                t,
                "Where ferry's time goes (ms, median, from its own events)\n"
            );
            let _ = writeln!(
                t,
                "| run | negotiation | mirror | ram | switchover |\n|---|---:|---:|---:|---:|"
            );
            for r in phases {
                let p = r.phases_ms.unwrap_or_default();
                let f = |k: &str| opt(p[k].as_f64(), 0);
                let _ = writeln!(
                    t,
                    "| {} | {} | {} | {} | {} |",
                    r.section,
                    f("negotiation"),
                    f("mirror"),
                    f("ram"),
                    f("switchover")
                );
            }
            t.push('\n');
        }
        let targets = self.targets();
        if !targets.is_empty() {
            let _ = writeln!(t, "Targets\n");
            let _ = writeln!(t, "| target | measured | |\n|---|---|---|");
            for (name, measured, ok) in targets {
                let _ = writeln!(
                    t,
                    "| {name} | {measured} | {} |",
                    if ok { "met" } else { "MISSED" }
                );
            }
            t.push('\n');
        }
        t
    }

    /// What TLS costs each server: its TLS row next to its plaintext row.
    fn tls_cost(&self, t: &mut String, rows: &[&MirrorRow]) {
        let pairs: Vec<(&MirrorRow, &MirrorRow)> = rows
            .iter()
            .filter(|r| r.tls)
            .filter_map(|tls| {
                let plain = tls.server.strip_suffix("-tls")?;
                let plain = rows.iter().find(|r| !r.tls && r.server == plain)?;
                Some((*plain, *tls))
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let _ = writeln!(
            t,
            "TLS against plaintext, same server (median; source CPU: the mirroring QEMU's, whose one main-loop thread also encrypts, or for ferry-tls QEMU's plus ferry's relay)\n"
        );
        let _ = writeln!(
            t,
            "| server | MiB/s plain | MiB/s TLS | TLS / plain | CPU s/GiB plain | CPU s/GiB TLS | TLS CPU / plain | source CPU s/GiB plain | source CPU s/GiB TLS |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (plain, tls) in pairs {
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                plain.server,
                opt(plain.mib_s, 0),
                opt(tls.mib_s, 0),
                ratio(tls.mib_s, plain.mib_s),
                opt(plain.cpu_s_per_gib, 2),
                opt(tls.cpu_s_per_gib, 2),
                ratio(tls.cpu_s_per_gib, plain.cpu_s_per_gib),
                opt(plain.source_cpu_s_per_gib, 2),
                opt(tls.source_cpu_s_per_gib, 2),
            );
        }
        t.push('\n');
    }

    /// Every row as JSON.
    pub fn json(&self) -> Result<String> {
        let rows: Vec<MigrationRow> = MIGRATION_SECTIONS
            .into_iter()
            .flat_map(|(s, _)| self.migration_rows(s))
            .collect();
        let migrations: Vec<Value> = self
            .migrations
            .iter()
            .map(|(s, r)| {
                let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
                v["section"] = json!(s);
                v
            })
            .collect();
        let limits: Vec<Value> = self
            .limits
            .iter()
            .map(|l| json!({"section": "limits", "name": l.name, "mib_s": l.mib_s, "how": l.how}))
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .into_iter()
            .map(|(t, m, ok)| json!({"target": t, "measured": m, "met": ok}))
            .collect();
        Ok(serde_json::to_string_pretty(&json!({
            "quick": self.quick,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "limits": limits,
            "mirror": self.mirrors,
            "migration_rows": rows,
            "migration_runs": migrations,
            "targets": targets,
        }))?)
    }
}
