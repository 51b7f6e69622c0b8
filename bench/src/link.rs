//! A shaped link to a destination host: a network namespace reached through a veth pair whose
//! two ends are rate-limited by `tc qdisc tbf` (this kernel has no `netem`, so no delay or loss,
//! only a rate). The destination side of a migration (ferry's agent and the QEMU it starts, or
//! the QEMU-alone destination) runs inside the namespace, the source outside, so every byte of
//! the mirror and of the RAM stream crosses the shaped link.
//!
//! Names carry this process's id (`ferry-bench-PID-N`, veth `fbPID-N`), so two benches never
//! collide; the namespace and the veth pair go away when the [`Link`] is dropped, on error
//! paths too, and a new run first removes what a killed run (a PID no longer alive) left behind.
//! Needs root, `ip` and `tc` (iproute2).

use std::process::Command;

use anyhow::{bail, Context, Result};

const NS_PREFIX: &str = "ferry-bench-";

/// A namespace behind a veth pair shaped to `mbit` in both directions.
#[derive(Debug)]
pub struct Link {
    /// The namespace the destination runs in.
    pub netns: String,
    /// The destination's address (inside the namespace).
    pub dest_ip: String,
    /// The rate, megabits per second.
    pub mbit: u32,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}: install iproute2"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {} (needs root)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Link {
    /// Creates namespace number `n` of this process with a link of `mbit` megabits per second.
    pub fn create(n: u8, mbit: u32) -> Result<Link> {
        remove_stale();
        let pid = std::process::id();
        // veth names have at most 15 bytes: "fb" + pid (up to 7 digits) + "-" + n + "h".
        let host_if = format!("fb{pid}-{n}h");
        let ns_if = format!("fb{pid}-{n}d");
        // A /30 per link in 10.253.0.0/16, chosen by pid and n: unlikely to meet another run's.
        let block = ((pid as usize * 8 + n as usize) % 16384) * 4;
        let (hi, lo) = (block / 256, block % 256);
        let host_ip = format!("10.253.{hi}.{}", lo + 1);
        let dest_ip = format!("10.253.{hi}.{}", lo + 2);
        let link = Link {
            netns: format!("{NS_PREFIX}{pid}-{n}"),
            dest_ip: dest_ip.clone(),
            mbit,
            host_if: host_if.clone(),
        };
        ip(&["netns", "add", &link.netns])?;
        // From here on, Drop removes what exists.
        let ns = link.netns.as_str();
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", ns])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{dest_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["-n", ns, "link", "set", &ns_if, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // A bucket of 10 ms at the rate: large enough for TSO bursts at 2 Gbit/s, small enough
        // that the long-run rate is the configured one (checked: 48.7 MB/s through 400 Mbit).
        let burst = format!("{}kb", (mbit as u64 * 1000 / 8 / 100).max(64));
        let rate = format!("{mbit}mbit");
        let tbf = [
            "root", "tbf", "rate", &rate, "burst", &burst, "latency", "20ms",
        ];
        let mut host = vec!["qdisc", "add", "dev", &host_if];
        host.extend(tbf);
        run("tc", &host)?;
        let mut dest = vec!["-n", ns, "qdisc", "add", "dev", &ns_if];
        dest.extend(tbf);
        run("tc", &dest)?;
        Ok(link)
    }

    /// Bytes per second the link carries at most.
    pub fn bytes_per_s(&self) -> f64 {
        self.mbit as f64 * 1e6 / 8.0
    }

    /// `program` run inside the namespace: `ip netns exec NS program`.
    pub fn command(&self, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting the host end removes the pair; the namespace goes last.
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// Removes namespaces (and with them their veth pairs) left by benches that were killed.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}
