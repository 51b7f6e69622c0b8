//! Networking: `-netdev`, `-nic`, `-net`. Only QEMU's user-mode network (slirp) runs on the
//! destination, and only its parts that stay inside QEMU.
//!
//! A tap or bridge backend would attach the guest to a host network the agent knows nothing about
//! (and runs a host script as root); mapping source networks to destination ones is not part of
//! this round, so they are refused. In slirp, `hostfwd` binds ports on the destination host,
//! `guestfwd` can connect to host ports or run a host command, `tftp` serves and `smb` shares
//! a host directory: all refused.

use serde_json::{Map, Value};

use super::value;
use super::{refuse, RewriteError, Rewriter};

/// `-netdev user` keys that change only what the guest sees.
const USER_KEYS: &[&str] = &[
    "type",
    "id",
    "net",
    "host",
    "ipv4",
    "ipv6",
    "ipv6-net",
    "ipv6-prefix",
    "ipv6-prefixlen",
    "ipv6-host",
    "ipv6-dns",
    "restrict",
    "hostname",
    "dhcpstart",
    "dns",
    "dnssearch",
    "domainname",
    "bootfile",
    "tftp-server-name",
];

/// Keys of the guest-side NIC in `-nic` and `-net nic`.
const NIC_KEYS: &[&str] = &[
    "type", "id", "model", "mac", "macaddr", "netdev", "name", "addr", "vectors", "vlan",
];

const NO_MAPPING: &str = "the agent has no mapping of host networks yet (tap and bridge would \
     attach the guest to a destination network it was not given); use -netdev user, or attach \
     the network after the migration";

impl Rewriter<'_> {
    pub(super) fn netdev(&mut self, name: &str, value: &str) -> Result<(), RewriteError> {
        let parsed = value::parse(value, "type").map_err(|e| refuse(name, Some(value), e))?;
        let extra: &[&str] = match name {
            "nic" => NIC_KEYS,
            "net" if value::field(&parsed, "type") == "nic" => NIC_KEYS,
            _ => &[],
        };
        let reason = match value::field(&parsed, "type") {
            "user" => user_refusal(&parsed, extra),
            "nic" if name == "net" => unknown_key(&parsed, NIC_KEYS),
            "none" if name != "netdev" => None,
            "hubport" if name == "netdev" => {
                unknown_key(&parsed, &["type", "id", "hubid", "netdev"])
            }
            "tap" | "bridge" => Some(NO_MAPPING.to_string()),
            "socket" | "stream" | "dgram" | "l2tpv3" | "vde" | "af-xdp" | "passt" => Some(
                "it opens host sockets or talks to a host daemon; only -netdev user runs on the \
                 destination"
                    .to_string(),
            ),
            "vhost-user" | "vhost-vdpa" => {
                Some("it needs a backend process or device on the destination host".to_string())
            }
            other => Some(format!(
                "network backend `{other}` is not one ferry can move; only user is"
            )),
        };
        if let Some(reason) = reason {
            return Err(refuse(name, Some(value), reason));
        }
        self.push(name, Some(value.to_string()));
        Ok(())
    }
}

fn user_refusal(parsed: &Map<String, Value>, extra: &[&str]) -> Option<String> {
    for key in parsed.keys() {
        let why = match key.as_str() {
            "hostfwd" => "`hostfwd` would bind ports on the destination host",
            "guestfwd" => "`guestfwd` connects to host ports or runs a host command",
            "tftp" => "`tftp` serves a host directory",
            "smb" | "smbserver" => "`smb` shares a host directory (and runs smbd)",
            k if USER_KEYS.contains(&k) || extra.contains(&k) => continue,
            _ => {
                return Some(format!(
                    "key `{key}` is not one ferry knows for a user network"
                ))
            }
        };
        return Some(why.to_string());
    }
    None
}

fn unknown_key(parsed: &Map<String, Value>, allowed: &[&str]) -> Option<String> {
    parsed
        .keys()
        .find(|k| !allowed.contains(&k.as_str()))
        .map(|k| format!("key `{k}` is not one ferry knows here"))
}
