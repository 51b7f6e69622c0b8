//! A read-only view of `-blockdev` values: which node a value defines and which nodes it
//! references (what a value opens on the host is checked in `argv::value`). Values are only
//! inspected here, never passed back to QEMU (the keyval form's values all stay strings, which
//! QEMU's JSON form would not accept).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use super::keyval::KeyVal;

/// A `-blockdev` value as JSON: JSON as written, or the keyval form with dotted keys nested.
pub fn parse_blockdev(value: &str) -> Value {
    if value.trim_start().starts_with('{') {
        return serde_json::from_str(value).unwrap_or(Value::Null);
    }
    let mut root = Map::new();
    for (key, val) in KeyVal::parse(value).items {
        let parts: Vec<&str> = key.split('.').collect();
        insert_dotted(&mut root, &parts, val);
    }
    Value::Object(root)
}

fn insert_dotted(map: &mut Map<String, Value>, parts: &[&str], value: String) {
    match parts {
        [] => {}
        [last] => {
            map.insert(last.to_string(), Value::String(value));
        }
        [first, rest @ ..] => {
            let entry = map
                .entry(first.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            if let Value::Object(inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
    }
}

/// Adds `node` and every node it references by name (`file`, `backing`, `data-file`).
pub fn collect_chain(node: &str, blockdevs: &HashMap<String, Value>, out: &mut HashSet<String>) {
    if !out.insert(node.to_string()) {
        return;
    }
    let Some(def) = blockdevs.get(node) else {
        return;
    };
    for key in ["file", "backing", "data-file"] {
        if let Some(child) = def.get(key).and_then(Value::as_str) {
            collect_chain(child, blockdevs, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_and_json_forms_agree() {
        let kv =
            parse_blockdev("driver=qcow2,node-name=d0,file.driver=file,file.filename=/a.qcow2");
        let js = parse_blockdev(
            r#"{"driver":"qcow2","node-name":"d0","file":{"driver":"file","filename":"/a.qcow2"}}"#,
        );
        assert_eq!(kv, js);
    }

    #[test]
    fn chains_follow_named_children() {
        let defs: HashMap<String, Value> = [
            (
                "top",
                parse_blockdev("driver=qcow2,node-name=top,file=top-file,backing=base"),
            ),
            (
                "top-file",
                parse_blockdev("driver=file,node-name=top-file,filename=/t"),
            ),
            (
                "base",
                parse_blockdev("driver=raw,node-name=base,file.driver=file,file.filename=/b"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut chain = HashSet::new();
        collect_chain("top", &defs, &mut chain);
        let mut names: Vec<_> = chain.into_iter().collect();
        names.sort();
        assert_eq!(names, ["base", "top", "top-file"]);
    }
}
