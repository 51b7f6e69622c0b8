//! The targets of BENCHMARKS.md (issues 11 and 12's acceptance), checked against a run's rows.

use super::Report;

impl Report {
    /// `(target, measured, met)` for each target the run has numbers for.
    pub(super) fn targets(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        let ferry = |section: &str| {
            self.mirrors
                .iter()
                .find(|r| r.section == section && r.server == "ferry")
        };
        let ferry_tls = self
            .mirrors
            .iter()
            .find(|r| r.section == "mirror" && r.server == "ferry-tls");
        if let (Some(f), Some(t)) = (ferry("mirror"), ferry_tls) {
            if let (Some(a), Some(b)) = (t.mib_s, f.mib_s) {
                out.push((
                    "TLS mirror MiB/s ≥ 0.8x ferry's plaintext".into(),
                    format!("{:.2}x", a / b),
                    a >= 0.8 * b,
                ));
            }
            if let (Some(a), Some(b)) = (t.mib_s, self.mirror_best("mirror", true).0) {
                out.push((
                    "TLS mirror MiB/s ≥ 1.0x fastest TLS reference".into(),
                    format!("{:.2}x", a / b),
                    a >= b,
                ));
            }
        }
        if let Some(f) = ferry("mirror") {
            let (fastest, leanest) = self.mirror_best("mirror", false);
            if let (Some(a), Some(b)) = (f.mib_s, fastest) {
                out.push((
                    "mirror MiB/s ≥ 1.0x fastest reference".into(),
                    format!("{:.2}x", a / b),
                    a >= b,
                ));
            }
            if let (Some(a), Some(b)) = (f.cpu_s_per_gib, leanest) {
                out.push((
                    "server CPU/GiB ≤ 0.8x leanest reference".into(),
                    format!("{:.2}x", a / b),
                    a <= 0.8 * b,
                ));
            }
        }
        for section in ["mirror", "extents"] {
            let Some(f) = ferry(section) else { continue };
            if let (Some(a), Some(b)) = (f.durable_mib_s, self.durable_best(section, false)) {
                out.push((
                    format!("{section}: MiB/s on disk ≥ 1.0x fastest reference's"),
                    format!("{:.2}x", a / b),
                    a >= b,
                ));
            }
            if section == "extents" {
                if let (Some(a), Some(b)) = (f.cpu_s_per_gib, self.mirror_best(section, false).1) {
                    out.push((
                        format!("{section}: server CPU/GiB ≤ leanest reference's"),
                        format!("{:.2}x", a / b),
                        a <= b,
                    ));
                }
            }
        }
        for section in ["mirror", "extents", "giant"] {
            if let Some(f) = ferry(section) {
                if let Some(a) = f.dest_allocated {
                    let src = f.source_allocated;
                    out.push((
                        format!("{section}: destination allocation = source's"),
                        format!("{} vs {} MiB", a >> 20, src >> 20),
                        a <= src + src / 100 && a + a / 100 >= src,
                    ));
                }
            }
        }
        for section in ["migration", "filled"] {
            let rows = self.migration_rows(section);
            let mig = |flow: &str| rows.iter().find(|r| r.flow == flow && r.completed > 0);
            if let Some(n) = mig("native") {
                for flow in ["ferry", "ferry --insecure"] {
                    let Some(f) = mig(flow) else { continue };
                    if let (Some(a), Some(b)) = (f.ack_gap_ms, n.ack_gap_ms) {
                        out.push((
                            format!("{section}: {flow} ack gap ≤ native + 10 ms"),
                            format!("{a:.1} vs {b:.1} ms"),
                            a <= b + 10.0,
                        ));
                    }
                    if let (Some(a), Some(b)) = (f.total_s, n.total_s) {
                        out.push((
                            format!("{section}: {flow} total time ≤ 1.0x native"),
                            format!("{:.2}x ({a:.2} vs {b:.2} s)", a / b),
                            a <= b,
                        ));
                    }
                }
            }
            // Issue 11: what encryption costs a whole migration, against the same flow in the
            // clear.
            if let (Some(tls), Some(plain)) = (mig("ferry"), mig("ferry --insecure")) {
                if let (Some(a), Some(b)) = (tls.total_s, plain.total_s) {
                    out.push((
                        format!("{section}: ferry (TLS) total ≤ 1.15x ferry --insecure"),
                        format!("{:.2}x ({a:.2} vs {b:.2} s)", a / b),
                        a <= 1.15 * b,
                    ));
                }
            }
        }
        for section in ["shaped-400", "shaped-2000"] {
            for r in self.migration_rows(section) {
                if !r.flow.starts_with("ferry") {
                    continue;
                }
                if let (Some(x), Some(limit)) = (r.x_link_limit, r.link_limit_s) {
                    out.push((
                        format!("{section}: {} total ≤ 1.15x the link's limit", r.flow),
                        format!("{x:.2}x ({:.2} vs {limit:.2} s)", r.total_s.unwrap_or(0.0)),
                        x <= 1.15,
                    ));
                }
            }
        }
        for r in self.migration_rows("convergence") {
            out.push((
                format!("convergence: {} completes", r.flow),
                format!("{}/{}", r.completed, r.runs),
                r.completed == r.runs,
            ));
        }
        out
    }
}
