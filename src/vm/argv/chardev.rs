//! Character devices (`-chardev`, and the legacy `-serial`/`-parallel`/`-debugcon` syntax) and
//! `-vnc`: what may run on the destination is a file, a unix socket (both moved into the
//! migration directory), or something with no host side at all (null, pty, ringbuf).
//! Host devices, TCP/UDP ports, pipes and the terminal are refused: the destination host has
//! no reason to let a source open them.

use super::super::keyval::KeyVal;
use super::value;
use super::{refuse, RewriteError, Rewriter};

/// `-chardev` backends the agent runs. `stdio` is refused separately (the destination QEMU has
/// no terminal).
const BACKENDS: &[&str] = &["file", "socket", "null", "pty", "ringbuf", "memory"];

/// `-vnc unix:PATH` options that change nothing on the host.
const VNC_OPTIONS: &[&str] = &["share", "lossy", "non-adaptive", "power-control"];

const NO_TERMINAL: &str =
    "the destination QEMU runs detached with no terminal; use file:PATH or a unix socket";

impl Rewriter<'_> {
    pub(super) fn chardev(&mut self, value: &str) -> Result<(), RewriteError> {
        let no = |reason: &str| Err(refuse("chardev", Some(value), reason));
        if value.trim_start().starts_with('{') {
            return no("-chardev takes key=value only");
        }
        let parsed =
            value::parse(value, "backend").map_err(|e| refuse("chardev", Some(value), e))?;
        let backend = value::field(&parsed, "backend");
        match backend {
            "stdio" => return no(NO_TERMINAL),
            b if !BACKENDS.contains(&b) => {
                return no(
                    "only file, unix socket, null, pty and ringbuf chardevs can run on the \
                     destination host (this one reaches a host device, port or program)",
                )
            }
            _ => {}
        }
        if backend == "socket" && (parsed.contains_key("host") || parsed.contains_key("port")) {
            return no("a TCP socket would open a port on the destination host; use path=SOCKET (a unix socket)");
        }
        if let Some(key) = value::host_reference(&parsed, &|k, _| matches!(k, "path" | "logfile")) {
            return no(&format!("`{key}=` names something on the source host"));
        }
        let mut kv = KeyVal::parse(value);
        for key in ["path", "logfile"] {
            if let Some(path) = kv.get(key).map(str::to_string) {
                let moved = self.relocate(&path);
                kv.set(key, &moved);
            }
        }
        self.push("chardev", Some(kv.render()));
        Ok(())
    }

    /// `-serial file:X`, `unix:X`, `null`, `pty`, `chardev:ID`, each optionally behind `mon:`.
    pub(super) fn legacy_chardev(&mut self, name: &str, value: &str) -> Result<(), RewriteError> {
        let inner = value.strip_prefix("mon:").unwrap_or(value);
        let prefix = &value[..value.len() - inner.len()];
        let moved = if let Some(path) = inner.strip_prefix("file:") {
            format!("{prefix}file:{}", self.relocate(path))
        } else if let Some(rest) = inner.strip_prefix("unix:") {
            let (path, opts) = rest
                .split_once(',')
                .map_or((rest, None), |(p, o)| (p, Some(o)));
            if let Some(o) = opts {
                let parsed = value::parse(o, "server").map_err(|e| refuse(name, Some(value), e))?;
                if let Some(key) = value::any_host_reference(&parsed) {
                    return Err(refuse(
                        name,
                        Some(value),
                        format!("`{key}=` names something on the source host"),
                    ));
                }
            }
            let moved = self.relocate(path);
            match opts {
                Some(o) => format!("{prefix}unix:{moved},{o}"),
                None => format!("{prefix}unix:{moved}"),
            }
        } else if matches!(inner, "null" | "none" | "pty") || inner.starts_with("chardev:") {
            value.to_string()
        } else if inner == "stdio" || inner.starts_with("pipe:") {
            return Err(refuse(name, Some(value), NO_TERMINAL));
        } else {
            return Err(refuse(
                name,
                Some(value),
                "only file:PATH, unix:PATH, null, pty or chardev:ID can run on the destination \
                 host (this reaches a host device, a network port or a display)",
            ));
        };
        self.push(name, Some(moved));
        Ok(())
    }

    /// `-vnc none`, or `-vnc unix:PATH` moved into the migration directory. A VNC server on a TCP
    /// port would listen on the destination host where nobody asked for it.
    pub(super) fn vnc(&mut self, value: &str) -> Result<(), RewriteError> {
        if value == "none" {
            self.push("vnc", Some(value.to_string()));
            return Ok(());
        }
        let Some(rest) = value.strip_prefix("unix:") else {
            return Err(refuse(
                "vnc",
                Some(value),
                "only -vnc unix:PATH (moved into the migration directory) or none; a TCP VNC \
                 server would listen on the destination host",
            ));
        };
        let (path, opts) = rest
            .split_once(',')
            .map_or((rest, None), |(p, o)| (p, Some(o)));
        if let Some(o) = opts {
            let kv = KeyVal::parse(o);
            let keys = kv
                .items
                .iter()
                .map(|(k, v)| if k.is_empty() { v } else { k });
            if let Some(k) = keys
                .into_iter()
                .find(|k| !VNC_OPTIONS.contains(&k.as_str()))
            {
                return Err(refuse(
                    "vnc",
                    Some(value),
                    format!(
                        "option `{k}` is not one ferry can move (allowed: {})",
                        VNC_OPTIONS.join(", ")
                    ),
                ));
            }
        }
        let moved = self.relocate(path);
        let out = match opts {
            Some(o) => format!("unix:{moved},{o}"),
            None => format!("unix:{moved}"),
        };
        self.push("vnc", Some(out));
        Ok(())
    }
}
