//! QEMU's `key=value,key=value` option syntax, as used by `-drive`, `-chardev`, `-blockdev` and
//! friends: a comma inside a value is written `,,`; the first item may be a bare word (the
//! "implied key", e.g. the backend of `-chardev file,id=x,path=y`).
//!
//! Parsing keeps the order of the items so that an option can be written back unchanged except
//! for the keys ferry rewrites.

/// One parsed option value.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyVal {
    /// `(key, value)` in order; a bare word is stored with an empty key.
    pub items: Vec<(String, String)>,
}

impl KeyVal {
    /// Splits `text` at single commas, undoing `,,` escapes.
    pub fn parse(text: &str) -> KeyVal {
        let mut items = Vec::new();
        let mut current = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    current.push(',');
                    continue;
                }
                items.push(split_item(&current));
                current.clear();
            } else {
                current.push(c);
            }
        }
        if !current.is_empty() || !items.is_empty() {
            items.push(split_item(&current));
        }
        KeyVal { items }
    }

    /// The value of the first item with this key.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The bare first word (implied key), if the option starts with one.
    pub fn implied(&self) -> Option<&str> {
        match self.items.first() {
            Some((k, v)) if k.is_empty() => Some(v.as_str()),
            _ => None,
        }
    }

    /// Replaces the value of every item with this key, or appends the key if it is absent.
    pub fn set(&mut self, key: &str, value: &str) {
        let mut found = false;
        for (k, v) in &mut self.items {
            if k == key {
                *v = value.to_string();
                found = true;
            }
        }
        if !found {
            self.items.push((key.to_string(), value.to_string()));
        }
    }

    /// Drops every item whose key satisfies `pred`.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&str) -> bool) {
        self.items.retain(|(k, _)| !pred(k));
    }

    /// Writes the option back in QEMU's syntax, escaping commas.
    pub fn render(&self) -> String {
        self.items
            .iter()
            .map(|(k, v)| {
                let v = v.replace(',', ",,");
                if k.is_empty() {
                    v
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn split_item(item: &str) -> (String, String) {
    match item.split_once('=') {
        Some((k, v)) => (k.to_string(), v.to_string()),
        None => (String::new(), item.to_string()),
    }
}

/// QEMU's boolean spellings.
pub fn is_true(value: &str) -> bool {
    matches!(value, "on" | "true" | "yes" | "y")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_implied_key_and_escaped_commas() {
        let kv = KeyVal::parse("file,id=ser0,path=/tmp/a,,b.log");
        assert_eq!(kv.implied(), Some("file"));
        assert_eq!(kv.get("id"), Some("ser0"));
        assert_eq!(kv.get("path"), Some("/tmp/a,b.log"));
        assert_eq!(kv.render(), "file,id=ser0,path=/tmp/a,,b.log");
    }

    #[test]
    fn set_replaces_or_appends() {
        let mut kv = KeyVal::parse("file=/a.qcow2,format=qcow2,if=none,id=d0");
        kv.set("file", "/new.raw");
        kv.set("format", "raw");
        kv.set("cache", "none");
        assert_eq!(
            kv.render(),
            "file=/new.raw,format=raw,if=none,id=d0,cache=none"
        );
    }

    #[test]
    fn empty_text_has_no_items() {
        assert!(KeyVal::parse("").items.is_empty());
    }
}
