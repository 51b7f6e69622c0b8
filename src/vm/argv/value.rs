//! Option values as data: QEMU's `key=value` form and its JSON form (`-object {...}`,
//! `-device {...}`, `-netdev {...}`, `-blockdev {...}`) both become one JSON object, so every
//! check looks at one shape and a JSON spelling cannot slip past a check written for key=value.
//!
//! Also the check shared by every option: no key may name a host file, a host directory or a file
//! descriptor, unless the option's own handler has relocated it first.

use serde_json::{Map, Value};

use super::super::keyval::KeyVal;

/// Keys that name something on the host: a file or directory QEMU would open, or a descriptor of
/// the source's process. Matched on the last component of a dotted key (`server.path`).
const HOST_KEYS: &[&str] = &[
    "file",
    "filename",
    "path",
    "romfile",
    "script",
    "downscript",
    "dumpdtb",
    "dtb",
    "firmware",
    "kernel",
    "initrd",
    "shim",
    "mem-path",
    "logfile",
    "sysfsdev",
    "evdev",
    "splash",
    "dir",
    "rrfile",
    "input-path",
    "db",
    "sock",
    "fd",
    "fds",
    "vhostfd",
    "vhostfds",
    "tls-creds",
    "tls-authz",
];

/// An option value parsed into a JSON object. In the key=value form a leading bare word is stored
/// under `implied` (e.g. `driver` for `-device`), later bare words as `on`, dotted keys nested.
/// A key given twice is refused: QEMU's parsers disagree on which one wins.
pub(super) fn parse(value: &str, implied: &str) -> Result<Map<String, Value>, String> {
    if value.trim_start().starts_with('{') {
        return match serde_json::from_str(value) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) | Err(_) => Err("its value is not a valid JSON object".into()),
        };
    }
    let mut root = Map::new();
    for (i, (key, val)) in KeyVal::parse(value).items.into_iter().enumerate() {
        let (key, val) = match (key.is_empty(), i) {
            (true, 0) => (implied.to_string(), val),
            (true, _) => (val, "on".to_string()),
            (false, _) => (key, val),
        };
        let parts: Vec<&str> = key.split('.').collect();
        if !insert_dotted(&mut root, &parts, val) {
            return Err(format!("key `{key}` is given twice"));
        }
    }
    Ok(root)
}

/// Inserts `value` at the dotted path; false if something is already there.
fn insert_dotted(map: &mut Map<String, Value>, parts: &[&str], value: String) -> bool {
    match parts {
        [] => true,
        [last] => {
            if map.contains_key(*last) {
                return false;
            }
            map.insert(last.to_string(), Value::String(value));
            true
        }
        [first, rest @ ..] => {
            let entry = map
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match entry {
                Value::Object(inner) => insert_dotted(inner, rest, value),
                _ => false,
            }
        }
    }
}

/// A string field of the object (`driver`, `type`, ...), empty if absent.
pub(super) fn field<'a>(map: &'a Map<String, Value>, key: &str) -> &'a str {
    map.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The first key (dotted, as written) that names a host file, directory or descriptor, skipping
/// those `allowed` accepts (a handler's own, already relocated keys, or a harmless value).
pub(super) fn host_reference(
    map: &Map<String, Value>,
    allowed: &dyn Fn(&str, &Value) -> bool,
) -> Option<String> {
    for (key, value) in map {
        if HOST_KEYS.contains(&key.as_str()) && !allowed(key, value) {
            return Some(key.clone());
        }
        if let Value::Object(inner) = value {
            if let Some(found) = host_reference(inner, allowed) {
                return Some(format!("{key}.{found}"));
            }
        }
        if let Value::Array(items) = value {
            for item in items {
                if let Value::Object(inner) = item {
                    if let Some(found) = host_reference(inner, allowed) {
                        return Some(format!("{key}.{found}"));
                    }
                }
            }
        }
    }
    None
}

/// `host_reference` with nothing allowed.
pub(super) fn any_host_reference(map: &Map<String, Value>) -> Option<String> {
    host_reference(map, &|_, _| false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_and_json_agree() {
        let kv = parse("e1000,netdev=n0,romfile=/etc/shadow", "driver").expect("keyval");
        let js = parse(
            r#"{"driver":"e1000","netdev":"n0","romfile":"/etc/shadow"}"#,
            "driver",
        )
        .expect("json");
        assert_eq!(kv, js);
        assert_eq!(any_host_reference(&kv).as_deref(), Some("romfile"));
    }

    #[test]
    fn nested_keys_are_found_in_both_forms() {
        let kv = parse("socket,id=x,server.path=/run/a", "backend").expect("keyval");
        assert_eq!(any_host_reference(&kv).as_deref(), Some("server.path"));
        let js = parse(r#"{"a":[{"fd":"3"}]}"#, "x").expect("json");
        assert_eq!(any_host_reference(&js).as_deref(), Some("a.fd"));
    }

    #[test]
    fn duplicates_and_bad_json_are_refused() {
        assert!(parse("e1000,romfile=,romfile=/x", "driver").is_err());
        assert!(parse("{not json", "driver").is_err());
        assert!(parse("[1]", "driver").is_ok(), "not JSON: a bare word");
        assert!(parse(" [1]", "driver").is_ok());
    }

    #[test]
    fn later_bare_words_are_booleans() {
        let kv = parse("e1000,romfile", "driver").expect("keyval");
        assert_eq!(field(&kv, "romfile"), "on");
    }
}
