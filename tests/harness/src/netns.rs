//! A network namespace that plays the destination host of a test.

use std::process::Command;
use std::time::Duration;

/// A network namespace joined to this one by a veth pair: the destination host of a test. The
/// link can be cut (`ip link set DEV down`) to partition the two. Removed when dropped.
pub struct Netns {
    /// The namespace's name.
    pub name: String,
    /// This side's end of the veth pair (where a capture listens).
    pub host_if: String,
    /// This side's address.
    pub host_ip: String,
    /// The namespace's address.
    pub dest_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates namespace number `n` of this test process (addresses 10.X.n.1 and .2, X from the
    /// pid, so that concurrent test processes do not collide).
    pub fn create(n: u8) -> Netns {
        let tag = std::process::id() % 10_000;
        let name = format!("ferry-t{tag}-{n}");
        let host_if = format!("fh{tag}x{n}");
        let dest_if = format!("fd{tag}x{n}");
        let net = format!("10.{}.{n}", 200 + tag % 50);
        let (host_ip, dest_ip) = (format!("{net}.1"), format!("{net}.2"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            host_ip: host_ip.clone(),
            dest_ip: dest_ip.clone(),
        };
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &dest_if,
        ]);
        ip(&["link", "set", &dest_if, "netns", &name]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{dest_ip}/30"), "dev", &dest_if]);
        inside(&["link", "set", &dest_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// Cuts the link for `secs` seconds (in the background); returns at once.
    pub fn partition(&self, secs: u64) -> std::thread::JoinHandle<()> {
        ip(&["link", "set", &self.host_if, "down"]);
        let host_if = self.host_if.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(secs));
            ip(&["link", "set", &host_if, "up"]);
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
