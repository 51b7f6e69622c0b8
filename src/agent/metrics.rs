//! The agent's Prometheus metrics (`ferry agent --metrics ADDR`, served by [`super::scrape`]).
//!
//! Exposed (all prefixed `ferry_`):
//! - `migrations_total{outcome}`: `completed`, `rolled_back` (admitted, then undone: aborted,
//!   failed, abandoned, timed out), `refused` (never admitted: space, limit, command line...),
//!   `failed` (the hand-over failed after the guest may have started here: kept for the operator).
//! - `migration_phase_seconds{phase}`: how long migrations spent in each journaled phase
//!   (`receiving`: disks copying, before the destination QEMU; `started`: until the hand-over;
//!   `resuming`: the hand-over itself), a histogram.
//! - `migration_received_bytes{migration}`: bytes written into each migration in progress (gone
//!   once it ends, so the series do not pile up over months); `received_bytes_total` over all.
//! - `nbd_requests_total`, `nbd_errors_total`: every NBD server of the agent.
//! - `sessions_active` (authenticated control connections), `migrations_active`.
//!
//! Built on `prometheus-client`, the Prometheus project's own Rust client: it writes the text
//! format exactly (escaping, `_total` suffixes, histogram buckets), has no global registry and
//! no HTTP stack of its own, and its collectors read live values at scrape time, which is what
//! per-migration NBD counters need.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::storage::Phase;
use crate::nbd::NbdStats;

type Labels = [(&'static str, String); 1];

/// How a migration ended, for `migrations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM runs here.
    Completed,
    /// Admitted, then undone.
    RolledBack,
    /// Never admitted.
    Refused,
    /// The hand-over failed after the guest may have started here (kept, not undone).
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::RolledBack => "rolled_back",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    outcomes: Family<Labels, Counter>,
    phases: Family<Labels, Histogram, fn() -> Histogram>,
    sessions: Gauge,
    live: Arc<Live>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics { .. }")
    }
}

/// What is read at scrape time: the NBD counters, overall and per migration in progress.
#[derive(Debug, Default)]
struct Live {
    nbd: Arc<NbdStats>,
    migrations: Mutex<BTreeMap<String, Arc<NbdStats>>>,
}

fn phase_histogram() -> Histogram {
    // 0.1 s to about 7 h, by factors of 4: a phase lasts from a blink (the hand-over) to hours
    // (the copy of a large disk).
    Histogram::new(exponential_buckets(0.1, 4.0, 10))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Fresh metrics, every series at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ferry");
        let outcomes = Family::<Labels, Counter>::default();
        registry.register(
            "migrations",
            "Migrations by outcome: completed, rolled_back (admitted then undone), refused, failed",
            outcomes.clone(),
        );
        // Every outcome shows from the start, at 0, so that a rate() over it has a series.
        let all = [
            Outcome::Completed,
            Outcome::RolledBack,
            Outcome::Refused,
            Outcome::Failed,
        ];
        for outcome in all {
            let _ = outcomes.get_or_create(&[("outcome", outcome.label().to_string())]);
        }
        let phases =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(phase_histogram);
        registry.register(
            "migration_phase_seconds",
            "Time migrations spent in each journaled phase",
            phases.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sessions_active",
            "Authenticated control connections being served",
            sessions.clone(),
        );
        let live = Arc::new(Live::default());
        registry.register_collector(Box::new(live.clone()));
        Metrics {
            registry,
            outcomes,
            phases,
            sessions,
            live,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode_registry(&mut text, &self.registry);
        text
    }

    /// Counts a migration that ended (or was never admitted).
    pub fn outcome(&self, outcome: Outcome) {
        self.outcomes
            .get_or_create(&[("outcome", outcome.label().to_string())])
            .inc();
    }

    /// The counters every migration's NBD server adds into.
    pub fn nbd_totals(&self) -> Arc<NbdStats> {
        self.live.nbd.clone()
    }

    /// Counts an authenticated control connection while the guard lives.
    pub fn session(self: &Arc<Self>) -> SessionGuard {
        self.sessions.inc();
        SessionGuard(self.clone())
    }

    /// Starts tracking migration `id`, in phase `phase` since now.
    pub fn track(self: &Arc<Self>, id: &str, phase: Phase) -> Tracked {
        let stats = Arc::new(NbdStats::child_of(self.live.nbd.clone()));
        self.live
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), stats.clone());
        Tracked {
            metrics: self.clone(),
            id: id.to_string(),
            stats,
            phase,
            since: Instant::now(),
            done: false,
        }
    }
}

/// An authenticated control connection, counted in `sessions_active` while it lives.
pub struct SessionGuard(Arc<Metrics>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.sessions.dec();
    }
}

/// One migration's metrics: its NBD counters, its phase clock. Dropping it removes its series.
pub struct Tracked {
    metrics: Arc<Metrics>,
    id: String,
    /// The counters its NBD server writes into.
    pub stats: Arc<NbdStats>,
    phase: Phase,
    since: Instant,
    done: bool,
}

impl Tracked {
    fn observe(&mut self) {
        self.metrics
            .phases
            .get_or_create(&[("phase", self.phase.as_str().to_string())])
            .observe(self.since.elapsed().as_secs_f64());
        self.since = Instant::now();
    }

    /// The migration moved to `next`.
    pub fn phase(&mut self, next: Phase) {
        if next != self.phase && !self.done {
            self.observe();
            self.phase = next;
        }
    }

    /// The migration was never admitted after all (its preparation failed): the caller counts
    /// it as refused, so its rollback counts nothing.
    pub fn discard(&mut self) {
        self.done = true;
    }

    /// The migration ended; counted once whatever calls follow.
    pub fn finish(&mut self, outcome: Outcome) {
        if !self.done {
            self.observe();
            self.metrics.outcome(outcome);
            self.done = true;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.metrics
            .live
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counter = |encoder: &mut DescriptorEncoder, name, help, value| {
            let metric = ConstCounter::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        counter(
            &mut encoder,
            "nbd_requests",
            "NBD requests received by the agent's NBD servers",
            self.nbd.requests(),
        )?;
        counter(
            &mut encoder,
            "nbd_errors",
            "NBD requests answered with an error",
            self.nbd.errors(),
        )?;
        counter(
            &mut encoder,
            "received_bytes",
            "Bytes written into received disks, over all migrations",
            self.nbd.bytes_written(),
        )?;
        let migrations = self
            .migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let active = ConstGauge::new(migrations.len() as i64);
        active.encode(encoder.encode_descriptor(
            "migrations_active",
            "Migrations in progress (admitted, not yet ended)",
            None,
            active.metric_type(),
        )?)?;
        let bytes = Family::<Labels, Gauge>::default();
        for (id, stats) in &migrations {
            bytes
                .get_or_create(&[("migration", id.clone())])
                .set(i64::try_from(stats.bytes_written()).unwrap_or(i64::MAX));
        }
        bytes.encode(encoder.encode_descriptor(
            "migration_received_bytes",
            "Bytes written into each migration in progress",
            None,
            bytes.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_shows_outcomes_phases_and_live_migrations() {
        let metrics = Arc::new(Metrics::new());
        let mut tracked = metrics.track("m1-abc", Phase::Receiving);
        tracked.stats.count_written(4096);
        let session = metrics.session();
        let text = metrics.render();
        assert!(
            text.contains("ferry_migration_received_bytes{migration=\"m1-abc\"} 4096"),
            "{text}"
        );
        assert!(text.contains("ferry_received_bytes_total 4096"), "{text}");
        assert!(text.contains("ferry_migrations_active 1"), "{text}");
        assert!(text.contains("ferry_sessions_active 1"), "{text}");
        assert!(
            text.contains("ferry_migrations_total{outcome=\"completed\"} 0"),
            "{text}"
        );
        tracked.phase(Phase::Started);
        tracked.finish(Outcome::Completed);
        tracked.finish(Outcome::RolledBack);
        drop((tracked, session));
        let text = metrics.render();
        assert!(
            text.contains("ferry_migrations_total{outcome=\"completed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migrations_total{outcome=\"rolled_back\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_phase_seconds_count{phase=\"receiving\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ferry_migration_phase_seconds_count{phase=\"started\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("m1-abc"),
            "a finished migration's series is gone: {text}"
        );
        assert!(text.contains("ferry_migrations_active 0"), "{text}");
        assert!(text.contains("ferry_sessions_active 0"), "{text}");
        assert!(
            text.contains("ferry_received_bytes_total 4096"),
            "totals stay: {text}"
        );
    }
}
