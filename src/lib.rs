//! ferry: live-migrate running QEMU virtual machines together with their local disks between two
//! hosts that share no storage.
//!
//! Where things live:
//! - [`nbd`]: the NBD wire format, the tokio NBD server and its file backend (the destination's
//!   data path). Knows nothing of migration.
//! - [`protocol`]: the agent control protocol (framing, messages, authentication).
//! - [`vm`]: the VM description and the rules that rewrite its command line for the destination.
//! - [`agent`]: `ferry agent`, the destination side.
//! - [`migrate`]: `ferry migrate` and `ferry recover`, the source-side driver.
//! - [`status`]: typed views of QEMU's `query-migrate` and `query-block-jobs`, one wait helper.
//! - [`faults`]: fault-injection points the hand-over tests stop processes at.
//! - [`journal`]: crash-safe state files, the durable record of who owns a VM.
//! - [`tls`]: TLS configurations, the agent's identity, per-migration certificates.
//! - [`tunnel`]: the relays that carry the NBD and RAM streams over TLS, so QEMU never has to.
//! - `demo` (with the `demo` feature): `ferry demo`, a whole migration of the test guest on
//!   localhost, using the test scaffolding in the `ferry-testkit` crate.
//! - [`cli`]: the command line, one file per subcommand, output formats and exit codes.

pub mod agent;
pub mod cli;
#[cfg(feature = "demo")]
pub mod demo;
pub mod faults;
pub mod journal;
pub mod migrate;
pub mod nbd;
pub mod protocol;
pub mod status;
pub mod tls;
pub mod tunnel;
pub mod vm;
pub mod xl;

/// An error and its causes on one line, `outer: inner: root`, as the CLI prints them.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Human-readable byte count (binary units), for messages and progress.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(
            human_bytes(3 * 1024 * 1024 * 1024 + 100 * 1024 * 1024),
            "3.1 GiB"
        );
    }
}
