//! `ferry-bench [--quick] [--json FILE]`: measures ferry against the alternatives on this machine,
//! every comparison in the same run (the machines are noisy: the ratios are what count).
//!
//! 1. machine limits: disk write, sparse local copy, TCP loopback ([`physical`]);
//! 2. mirror throughput into ferry, qemu-nbd (page cache and direct), nbdkit and QEMU's built-in
//!    server ([`mirror`]), each in plaintext and with TLS (per-migration-style x509 credentials,
//!    client certificate required);
//! 3. the same with the few-large-extents layout (`extents`: eight 128 MiB extents in 4 GiB);
//! 4. a sparse giant (20 GiB, 256 MiB of data) into each;
//! 5. a whole migration of the test guest, ferry vs QEMU alone the libvirt way ([`migration`],
//!    [`native`]); then of a guest with 2 GiB of RAM, 1.5 GiB of it non-zero (`filled`); then
//!    over a link shaped to 400 Mbit/s and 2 Gbit/s (`shaped`, [`link`]);
//! 6. the same with the guest writing as fast as it can (convergence);
//! 7. ferry's own phase times.
//!
//! Prints a table, checks the targets of BENCHMARKS.md, and with `--json` writes every row.

mod acks;
mod image;
mod link;
mod migration;
mod mirror;
mod native;
mod physical;
mod report;
mod servers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

use migration::Setup;
use report::Report;
use servers::{Target, TlsDirs};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark ferry against qemu-nbd, nbdkit, QEMU's NBD server and a QEMU-only migration"
)]
struct Args {
    /// Smaller images and fewer repeats, without the filled and shaped sections unless named
    /// with --section: under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Also write every row as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The ferry binary (default: `ferry` next to this one).
    #[arg(long, value_name = "PATH")]
    ferry: Option<PathBuf>,
    /// Scratch directory (default: a new one under /var/tmp, removed at the end).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Run ferry's NBD server under `perf record -g` in the mirror sections, writing FILE (the
    /// last run's profile; ferry's CPU column is not valid then).
    #[arg(long, value_name = "FILE")]
    perf: Option<PathBuf>,
    /// Sections to skip: physical (the machine limits, measured within mirror), mirror, tls (the
    /// mirror section's TLS rows), extents, giant, migration, filled, shaped, convergence
    /// (repeatable).
    #[arg(long, value_name = "SECTION")]
    skip: Vec<String>,
    /// Run only these sections (repeatable; same names as --skip), e.g. `--section shaped`;
    /// `shaped-400` and `shaped-2000` name one link of `shaped`.
    #[arg(long, value_name = "SECTION")]
    section: Vec<String>,
    /// Only these mirror rows (repeatable), e.g. `--only ferry --only ferry-tls`: for quick
    /// comparisons while working on one server. The targets then compare with what ran.
    #[arg(long, value_name = "ROW")]
    only: Vec<String>,
    /// The source mirror's `buf-size` in the mirror sections (default: QEMU's 16 MiB, which
    /// sends 1 MiB requests; the requests grow with it, `BYTES / 16`).
    #[arg(long, value_name = "BYTES")]
    mirror_buf_size: Option<u64>,
    /// The flows of the migration sections that run, instead of their own (repeatable, in
    /// order), e.g. `--flow "ferry --insecure" --flow "ferry --insecure --max-downtime 50"
    /// --flow native`: `native`, `native --tls`, or `ferry` followed by `ferry migrate` flags.
    #[arg(long, value_name = "FLOW")]
    flow: Vec<String>,
    /// Rounds of each migration section (default: 3, quick: 1). Even rounds run the flows in
    /// reverse order, so that neither flow always follows the other (cold memory, caches).
    #[arg(long, value_name = "N")]
    rounds: Option<usize>,
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The sizes of one run.
struct Plan {
    mirror_size: u64,
    mirror_data: u64,
    repeats: usize,
    /// The few-large-extents image: size, extents, bytes per extent.
    extents: (u64, u64, u64),
    migration_repeats: usize,
    giant_size: u64,
    giant_data: u64,
    migration: Setup,
    /// The 2 GiB guest with its RAM filled.
    filled: Setup,
    convergence: Setup,
    /// The flows of each migration section, in the order they run within a round.
    flows: Flows,
}

/// Which flows each migration section runs.
struct Flows {
    migration: &'static [&'static str],
    filled: &'static [&'static str],
    shaped: &'static [&'static str],
    convergence: &'static [&'static str],
}

/// The shaped links, Mbit/s.
const LINKS: [u32; 2] = [400, 2000];

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                mirror_size: 2 * GIB,
                mirror_data: 512 * MIB,
                repeats: 3,
                extents: (2 * GIB, 8, 64 * MIB),
                migration_repeats: 1,
                giant_size: 20 * GIB,
                giant_data: 256 * MIB,
                migration: Setup::guest(GIB, 128 * MIB, 100, 120),
                filled: Setup::filled(GIB, 128 * MIB),
                convergence: Setup::guest(GIB, 128 * MIB, 0, 30),
                // One round of the flows the targets compare; the full run has the rest.
                flows: Flows {
                    migration: &["ferry", "ferry --insecure", "native"],
                    filled: &["ferry --insecure", "native"],
                    shaped: &["ferry", "ferry --insecure", "native"],
                    convergence: &["ferry", "native"],
                },
            }
        } else {
            Plan {
                mirror_size: 8 * GIB,
                mirror_data: 2 * GIB,
                repeats: 3,
                extents: (4 * GIB, 8, 128 * MIB),
                migration_repeats: 3,
                giant_size: 20 * GIB,
                giant_data: 256 * MIB,
                migration: Setup::guest(2 * GIB, 512 * MIB, 100, 300),
                filled: Setup::filled(2 * GIB, 512 * MIB),
                convergence: Setup::guest(2 * GIB, 512 * MIB, 0, 120),
                flows: Flows {
                    migration: &[
                        "ferry",
                        "ferry --insecure",
                        "ferry --parallel 2",
                        "native",
                        "native --tls",
                    ],
                    filled: &["ferry", "ferry --insecure", "native"],
                    shaped: &["ferry", "ferry --insecure", "native"],
                    convergence: &["ferry", "ferry --insecure", "native"],
                },
            }
        }
    }
}

/// A flow's scratch directory name: the section and the flow's place in it. Not the flow's
/// own text: the QMP sockets of the QEMUs below it must fit in a socket address (108 bytes),
/// and a flow with a few flags was already too long.
fn flow_dir(section: &str, flows: &[&str], flow: &str) -> String {
    let i = flows.iter().position(|f| *f == flow).unwrap_or(0);
    format!("{section}-{i}")
}

/// The median of some values (the upper one of the middle two).
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ferry = match &args.ferry {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("ferry"),
    };
    anyhow::ensure!(
        ferry.exists(),
        "no ferry binary at {}: build it (`cargo build --release`) or pass --ferry",
        ferry.display()
    );
    let (dir, owned) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => (scratch_dir()?, true),
    };
    std::fs::create_dir_all(&dir)?;
    let plan = Plan::new(args.quick);
    let started = Instant::now();
    let mut report = Report::new(args.quick);
    let result = run_all(&args, &plan, &ferry, &dir, &mut report).await;
    report.finish(started.elapsed());
    if let Some(path) = &args.json {
        std::fs::write(path, report.json()?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    if owned {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn scratch_dir() -> Result<PathBuf> {
    let dir = PathBuf::from(format!("/var/tmp/ferry-bench.{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn note(text: &str) {
    eprintln!("ferry-bench: {text}");
}

async fn run_all(
    args: &Args,
    plan: &Plan,
    ferry: &Path,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let named = |s: &str| args.section.iter().any(|x| x == s);
    // The filled guest and the shaped links take about three minutes each here: the quick run
    // (under three minutes in all) leaves them out unless named with --section.
    let heavy = |s: &str| args.quick && ["filled", "shaped"].contains(&s);
    let on = |s: &str| {
        !args.skip.iter().any(|x| x == s)
            && if args.section.is_empty() {
                !heavy(s)
            } else {
                named(s)
            }
    };
    let server_cmd = servers::FerryCmd {
        bin: ferry.to_path_buf(),
        perf: args.perf.clone(),
    };
    let source = dir.join("mirror-src.raw");
    if on("mirror") {
        note(&format!(
            "creating a {} GiB image with {} MiB of random data",
            plan.mirror_size / GIB,
            plan.mirror_data / MIB
        ));
        image::create(&source, plan.mirror_size, plan.mirror_data)?;
    }
    if on("mirror") {
        let (mut targets, tls) = if on("tls") {
            (Target::plain_and_tls(), Some(TlsDirs::ensure(dir)?))
        } else {
            (Target::plain(), None)
        };
        if !args.only.is_empty() {
            targets.retain(|t| args.only.contains(&t.name()));
        }
        let case = MirrorCase {
            section: "mirror",
            limits: on("physical"),
            repeats: plan.repeats,
            source: &source,
            data: plan.mirror_data,
            targets,
            tls: tls.as_ref(),
            buf_size: args.mirror_buf_size,
        };
        mirror_section(case, &server_cmd, dir, report).await?;
    }
    let _ = std::fs::remove_file(&source);
    if on("extents") {
        let (size, count, extent) = plan.extents;
        let source = dir.join("extents-src.raw");
        note(&format!(
            "creating a {} GiB image with {count} extents of {} MiB of random data",
            size / GIB,
            extent / MIB
        ));
        image::create_extents(&source, size, count, extent)?;
        let mut targets = Target::plain();
        if !args.only.is_empty() {
            targets.retain(|t| args.only.contains(&t.name()));
        }
        // Like the giant, one round in a quick run, unless the section is asked for by name.
        let repeats = if args.quick && !named("extents") {
            1
        } else {
            plan.repeats
        };
        let case = MirrorCase {
            section: "extents",
            limits: false,
            repeats,
            source: &source,
            data: count * extent,
            targets,
            tls: None,
            buf_size: args.mirror_buf_size,
        };
        let result = mirror_section(case, &server_cmd, dir, report).await;
        let _ = std::fs::remove_file(&source);
        result?;
    }
    if on("giant") {
        let giant = dir.join("giant-src.raw");
        note(&format!(
            "creating a {} GiB image with {} MiB of data",
            plan.giant_size / GIB,
            plan.giant_data / MIB
        ));
        image::create(&giant, plan.giant_size, plan.giant_data)?;
        let repeats = if args.quick { 1 } else { plan.repeats };
        let case = MirrorCase {
            section: "giant",
            limits: false,
            repeats,
            source: &giant,
            data: plan.giant_data,
            targets: Target::plain(),
            tls: None,
            buf_size: args.mirror_buf_size,
        };
        mirror_section(case, &server_cmd, dir, report).await?;
        let _ = std::fs::remove_file(&giant);
    }
    let shaped: [(&'static str, u32); 2] = [("shaped-400", LINKS[0]), ("shaped-2000", LINKS[1])];
    let mut sections: Vec<MigrationSection> = Vec::new();
    if on("migration") {
        sections.push(MigrationSection::local(
            "migration",
            &plan.migration,
            plan.flows.migration,
        ));
    }
    if on("filled") {
        sections.push(MigrationSection::local(
            "filled",
            &plan.filled,
            plan.flows.filled,
        ));
    }
    // `--section shaped-400` (or `shaped-2000`) runs one link only.
    if on("shaped") || shaped.iter().any(|(name, _)| named(name)) {
        for (name, mbit) in shaped {
            if !on("shaped") && !named(name) {
                continue;
            }
            sections.push(MigrationSection {
                name,
                setup: &plan.migration,
                flows: plan.flows.shaped,
                link_mbit: Some(mbit),
            });
        }
    }
    if on("convergence") {
        sections.push(MigrationSection::local(
            "convergence",
            &plan.convergence,
            plan.flows.convergence,
        ));
    }
    for (n, section) in sections.iter().enumerate() {
        // Made before the section's first run and removed (by drop, errors included) after
        // its last.
        let link = match section.link_mbit {
            Some(mbit) => Some(link::Link::create(n as u8, mbit)?),
            None => None,
        };
        let flows: Vec<&str> = if args.flow.is_empty() {
            section.flows.to_vec()
        } else {
            args.flow.iter().map(String::as_str).collect()
        };
        let rounds = args.rounds.unwrap_or(plan.migration_repeats);
        for round in 0..rounds {
            // Both orders: a flow that always ran right after another would always meet the
            // memory and caches that one left (cold memory on this VM slows the next QEMU).
            let order: Vec<&str> = if round % 2 == 1 {
                flows.iter().rev().copied().collect()
            } else {
                flows.clone()
            };
            for flow in order {
                note(&format!(
                    "{}: {flow} flow (round {} of {rounds})",
                    section.name,
                    round + 1,
                ));
                let run = migrate(
                    flow,
                    ferry,
                    &dir.join(flow_dir(section.name, &flows, flow)),
                    section.setup,
                    link.as_ref(),
                )
                .await;
                report.migration(section.name, flow, run);
            }
        }
    }
    Ok(())
}

/// A migration section: which guest, which flows, and whether through a shaped link.
struct MigrationSection<'a> {
    name: &'static str,
    setup: &'a Setup,
    flows: &'static [&'static str],
    link_mbit: Option<u32>,
}

impl<'a> MigrationSection<'a> {
    fn local(name: &'static str, setup: &'a Setup, flows: &'static [&'static str]) -> Self {
        MigrationSection {
            name,
            setup,
            flows,
            link_mbit: None,
        }
    }
}

async fn migrate(
    flow: &str,
    ferry: &Path,
    dir: &Path,
    setup: &Setup,
    link: Option<&link::Link>,
) -> Result<migration::MigrationRun> {
    let run = match flow {
        "native" => native::run(dir, setup, false, link).await,
        "native --tls" => native::run(dir, setup, true, link).await,
        _ => {
            let flags: Vec<&str> = flow.split_whitespace().skip(1).collect();
            migration::ferry(ferry, dir, setup, &flags, link).await
        }
    };
    let _ = std::fs::remove_dir_all(dir);
    run
}

/// Mirrors `source` into every server `repeats` times, servers interleaved within each round so
/// that a noisy minute hits all of them alike.
/// One mirror section: which image, how often, and whether the machine limits are measured
/// alongside.
struct MirrorCase<'a> {
    section: &'static str,
    limits: bool,
    repeats: usize,
    source: &'a Path,
    data: u64,
    /// The rows, in the order they run within a round.
    targets: Vec<Target>,
    /// Credentials for the TLS rows.
    tls: Option<&'a TlsDirs>,
    /// The mirror's `buf-size`, if not QEMU's default.
    buf_size: Option<u64>,
}

async fn mirror_section(
    case: MirrorCase<'_>,
    ferry: &servers::FerryCmd,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let MirrorCase {
        section,
        limits,
        repeats,
        source,
        data,
        targets,
        tls,
        buf_size,
    } = case;
    let src_alloc = image::allocated(source)?;
    let mut runs: Vec<(Target, Vec<mirror::MirrorRun>)> =
        targets.into_iter().map(|t| (t, Vec::new())).collect();
    let mut machine: Vec<Vec<physical::Limit>> = Vec::new();
    for round in 0..repeats {
        if limits {
            // The page cache and the other tenants make these swing by 5x within minutes:
            // measured in every round, next to the servers.
            note("machine limits: dd write, TCP loopback");
            machine.push(vec![
                physical::disk_write(dir, data)?,
                physical::loopback(data * 2)?,
            ]);
        }
        for (target, list) in &mut runs {
            note(&format!(
                "{section}: {} (round {} of {repeats})",
                target.name(),
                round + 1
            ));
            // Verify the bytes on the first round only: a full compare of each run costs as
            // much as the mirror itself.
            let dest = dir.join("mirror-dst.raw");
            let opts = mirror::Options {
                verify: round == 0,
                buf_size,
            };
            match mirror::run(*target, tls, ferry, source, &dest, dir, opts).await {
                Ok(run) => list.push(run),
                Err(e) => note(&format!("{section}: {} failed: {e:#}", target.name())),
            }
        }
    }
    for i in 0..machine.first().map_or(0, Vec::len) {
        let mut speeds: Vec<f64> = machine.iter().map(|round| round[i].mib_s).collect();
        let mut limit = machine[0][i].clone();
        limit.mib_s = median(&mut speeds).unwrap_or(0.0);
        limit.how = format!("{}; median of {} rounds", limit.how, speeds.len());
        report.limit(limit);
    }
    for (target, list) in runs {
        report.mirror(section, &target.name(), target.tls, data, src_alloc, &list);
    }
    Ok(())
}
