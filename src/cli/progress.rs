//! Progress bars for `ferry migrate` on a terminal: one per disk while it mirrors and one for the
//! RAM, each with its rate and ETA (indicatif), drawn on stderr.
//!
//! Used only when stderr is a terminal and `--json` is off; anywhere else the line output of
//! [`HumanReporter`] stays as it was, so logs and scripts see no change. The lines that are not
//! progress (the agent's acceptance, the switchover, the summary) still go to stdout, printed
//! while the bars are hidden so that the two streams do not garble each other on one screen; a
//! failure still goes to stderr.

use std::collections::HashMap;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::migrate::report::{HumanReporter, Progress, Reporter};

/// The bars' layout: what, how far, how fast, how long still.
const TEMPLATE: &str =
    "{prefix:>10} [{bar:30}] {bytes:>10} / {total_bytes:<10} {binary_bytes_per_sec:>12}  ETA {eta:<4} {msg}";

/// Progress bars on a terminal, lines for everything else.
pub struct BarReporter {
    multi: MultiProgress,
    disks: HashMap<String, ProgressBar>,
    ram: Option<ProgressBar>,
    lines: HumanReporter,
}

impl BarReporter {
    /// Bars on stderr.
    pub fn stderr() -> BarReporter {
        BarReporter::with_target(ProgressDrawTarget::stderr())
    }

    /// Bars on `target` (a test's in-memory terminal).
    pub fn with_target(target: ProgressDrawTarget) -> BarReporter {
        BarReporter {
            multi: MultiProgress::with_draw_target(target),
            disks: HashMap::new(),
            ram: None,
            lines: HumanReporter::default(),
        }
    }

    fn bar(&self, prefix: String, length: u64) -> ProgressBar {
        let style = ProgressStyle::with_template(TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        self.multi.add(
            ProgressBar::new(length)
                .with_style(style)
                .with_prefix(prefix),
        )
    }

    /// Prints the line [`HumanReporter`] has for `event` with the bars out of the way.
    fn line(&mut self, event: &Progress) {
        let lines = &mut self.lines;
        self.multi.suspend(|| lines.report(event));
    }

    /// Leaves every bar on the screen as it last was, and the lines that follow below them
    /// (printed straight away: nothing redraws a finished bar).
    fn finish_all(&mut self) {
        for bar in self.disks.values().chain(self.ram.iter()) {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

impl Reporter for BarReporter {
    fn report(&mut self, event: &Progress) {
        match event {
            Progress::Mirror { disk, done, total } => {
                if !self.disks.contains_key(disk) {
                    let bar = self.bar(format!("disk {disk}"), *total);
                    self.disks.insert(disk.clone(), bar);
                }
                if let Some(bar) = self.disks.get(disk) {
                    // QEMU's job length grows while the guest writes.
                    bar.set_length(*total);
                    bar.set_position(*done);
                }
            }
            Progress::MirrorReady { disk } => {
                if let Some(bar) = self.disks.get(disk) {
                    // In sync: all of it is there (the last poll may have been before the
                    // end). The mirror goes on while the guest writes: not finished yet.
                    bar.set_position(bar.length().unwrap_or(0));
                    bar.set_message("in sync");
                }
            }
            Progress::MirrorWriteBlocking { disk } => {
                if let Some(bar) = self.disks.get(disk) {
                    bar.set_message("write-blocking");
                }
                self.line(event);
            }
            Progress::Ram {
                status,
                transferred,
                remaining,
                ..
            } => {
                let bar = match &self.ram {
                    Some(bar) => bar.clone(),
                    None => {
                        // The disks are in sync when the RAM starts.
                        for bar in self.disks.values() {
                            bar.set_message("in sync");
                        }
                        let bar = self.bar("ram".into(), 0);
                        self.ram = Some(bar.clone());
                        bar
                    }
                };
                // Pages the guest dirties are sent again: the whole is what was sent plus what
                // is left, not the guest's RAM size.
                bar.set_length(transferred.saturating_add(*remaining));
                bar.set_position(*transferred);
                bar.set_message(status.clone());
            }
            Progress::Switchover => {
                // The RAM reached the switchover: what is left goes with the guest paused.
                if let Some(ram) = &self.ram {
                    ram.set_position(ram.length().unwrap_or(0));
                    ram.set_message("switching over");
                }
                self.finish_all();
                self.lines.report(event);
            }
            Progress::Completed(_) | Progress::Failed { .. } => {
                self.finish_all();
                self.lines.report(event);
            }
            Progress::Prepared { .. } => self.line(event),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::InMemoryTerm;

    #[test]
    fn bars_show_each_disk_and_the_ram_with_rate_and_eta() {
        let term = InMemoryTerm::new(10, 120);
        let mut bars =
            BarReporter::with_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        let mirror = |disk: &str, done| Progress::Mirror {
            disk: disk.into(),
            done,
            total: 64 << 20,
        };
        bars.report(&mirror("vda", 0));
        bars.report(&mirror("vdb", 0));
        std::thread::sleep(std::time::Duration::from_millis(120));
        bars.report(&mirror("vda", 32 << 20));
        bars.report(&mirror("vdb", 16 << 20));
        std::thread::sleep(std::time::Duration::from_millis(120));
        bars.report(&Progress::MirrorReady { disk: "vda".into() });
        bars.report(&Progress::Ram {
            status: "active".into(),
            transferred: 100 << 20,
            remaining: 156 << 20,
            total: 256 << 20,
        });
        let screen = term.contents();
        assert!(screen.contains("disk vda ["), "{screen}");
        assert!(
            screen.contains("64.00 MiB / 64.00 MiB"),
            "a disk in sync: {screen}"
        );
        assert!(screen.contains("disk vdb ["), "{screen}");
        assert!(screen.contains("16.00 MiB / 64.00 MiB"), "{screen}");
        assert!(screen.contains("in sync"), "{screen}");
        assert!(screen.contains("ram ["), "{screen}");
        assert!(screen.contains("100.00 MiB / 256.00 MiB"), "{screen}");
        assert!(screen.contains("active"), "{screen}");
        assert!(screen.contains("ETA"), "{screen}");
        assert!(screen.contains("/s"), "a rate: {screen}");
        bars.report(&Progress::Switchover);
        assert!(bars.ram.as_ref().is_some_and(ProgressBar::is_finished));
    }
}
