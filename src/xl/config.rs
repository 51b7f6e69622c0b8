//! The domain config `xl migrate -C` sends to the receiver, with its disks pointed at the
//! agent's images.
//!
//! Only the `disk = [ 'SPEC', ... ]` list changes. A SPEC is xl's disk syntax
//! (`docs/misc/xl-disk-configuration.txt`): comma-separated `key=value` items and positional
//! ones (`target, format, vdev, access`, in that order); `target=` must be last because a path
//! may hold commas. Each disk ferry moves is rewritten in keyword form, `format=raw` (the agent's
//! images are raw), the same `vdev` and `access`, any other item kept, and `target=` the
//! destination image last. A disk the config names but ferry does not move (no qdisk node for
//! its vdev) is an error: xl would open the source's path on the destination host.
//!
//! Pure text in, text out; nothing here touches a file.

use std::collections::HashMap;

/// The config could not be rewritten; nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the domain config {0}")]
pub struct ConfigError(pub String);

/// One disk spec, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskSpec {
    /// `vdev`, e.g. `xvda`.
    pub vdev: String,
    /// `format`, e.g. `qcow2` (xl's default is raw).
    pub format: String,
    /// `access`, e.g. `rw`.
    pub access: Option<String>,
    /// `target`: the image on the source host.
    pub target: String,
    /// Every other item, in order (`devtype=disk`, `backendtype=qdisk`, `cdrom`, ...).
    pub other: Vec<String>,
}

/// Parses one disk spec.
pub fn parse_disk(spec: &str) -> Result<DiskSpec, ConfigError> {
    let mut disk = DiskSpec::default();
    let mut rest = spec;
    let mut positional = 0;
    let mut format = None;
    let mut target = None;
    while !rest.trim().is_empty() {
        let trimmed = rest.trim_start();
        if let Some(t) = trimmed.strip_prefix("target=") {
            target = Some(t.trim().to_string());
            break;
        }
        let (item, next) = match trimmed.find(',') {
            Some(at) => (&trimmed[..at], &trimmed[at + 1..]),
            None => (trimmed, ""),
        };
        rest = next;
        let item = item.trim();
        if item.is_empty() {
            positional += 1;
            continue;
        }
        match item.split_once('=') {
            Some(("vdev", v)) => disk.vdev = v.trim().to_string(),
            Some(("format", v)) => format = Some(v.trim().to_string()),
            Some(("access", v)) => disk.access = Some(v.trim().to_string()),
            Some(_) => disk.other.push(item.to_string()),
            None if positional < 4 && !is_flag(item) => {
                match positional {
                    0 => target = Some(item.to_string()),
                    1 => format = Some(item.to_string()),
                    2 => disk.vdev = item.to_string(),
                    _ => disk.access = Some(item.to_string()),
                }
                positional += 1;
            }
            None => disk.other.push(item.to_string()),
        }
    }
    disk.format = format.unwrap_or_else(|| "raw".into());
    disk.target = target.unwrap_or_default();
    if disk.vdev.is_empty() {
        return Err(ConfigError(format!("has a disk without vdev: '{spec}'")));
    }
    Ok(disk)
}

/// xl's flag words, which are never positional values.
fn is_flag(item: &str) -> bool {
    matches!(
        item,
        "cdrom" | "devtype=cdrom" | "no-discard" | "discard" | "direct-io-safe"
    )
}

impl DiskSpec {
    /// The spec in keyword form, pointing at `target` as a raw image.
    pub fn to_raw_at(&self, target: &str) -> String {
        let mut items = vec!["format=raw".to_string(), format!("vdev={}", self.vdev)];
        if let Some(access) = &self.access {
            items.push(format!("access={access}"));
        }
        items.extend(self.other.iter().cloned());
        items.push(format!("target={target}"));
        items.join(", ")
    }
}

/// Where the `disk = [...]` list sits in the config text, and its specs.
fn disk_list(text: &str) -> Result<Option<(usize, usize, Vec<String>)>, ConfigError> {
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if let Some(after) = trimmed.strip_prefix("disk") {
            let after_eq = after.trim_start();
            if let Some(value) = after_eq.strip_prefix('=') {
                let value_at = offset + (line.len() - value.len());
                return parse_list(text, value_at).map(Some);
            }
        }
        offset += line.len();
    }
    Ok(None)
}

/// Parses `[ 'a', "b" ]` from `at`; returns its span and the strings.
fn parse_list(text: &str, at: usize) -> Result<(usize, usize, Vec<String>), ConfigError> {
    let bytes = text.as_bytes();
    let mut i = at;
    while i < bytes.len() && bytes[i].is_ascii_whitespace() {
        i += 1;
    }
    if bytes.get(i) != Some(&b'[') {
        return Err(ConfigError("has a disk setting that is not a list".into()));
    }
    let start = i;
    i += 1;
    let mut specs = Vec::new();
    loop {
        while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
            i += 1;
        }
        match bytes.get(i) {
            Some(b']') => return Ok((start, i + 1, specs)),
            Some(&q @ (b'\'' | b'"')) => {
                let close = text[i + 1..]
                    .find(q as char)
                    .ok_or_else(|| ConfigError("has an unterminated disk spec".into()))?;
                specs.push(text[i + 1..i + 1 + close].to_string());
                i += close + 2;
            }
            Some(b'#') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            _ => return Err(ConfigError("has a disk list ferry cannot read".into())),
        }
    }
}

/// The disks the config lists.
pub fn disks(text: &str) -> Result<Vec<DiskSpec>, ConfigError> {
    match disk_list(text)? {
        Some((_, _, specs)) => specs.iter().map(|s| parse_disk(s)).collect(),
        None => Ok(Vec::new()),
    }
}

/// The config with every disk pointed at `images[vdev]`; every listed disk must be in `images`.
pub fn rewrite(text: &str, images: &HashMap<String, String>) -> Result<String, ConfigError> {
    let Some((start, end, specs)) = disk_list(text)? else {
        return Err(ConfigError(
            "lists no disk, so ferry has nothing to move".into(),
        ));
    };
    let mut out = Vec::new();
    for spec in &specs {
        let disk = parse_disk(spec)?;
        let image = images.get(&disk.vdev).ok_or_else(|| {
            ConfigError(format!(
                "lists disk {} but its device model has no qdisk node for it, so ferry cannot \
                 move it (only qdisk disks travel)",
                disk.vdev
            ))
        })?;
        if image.contains('\'') {
            return Err(ConfigError(format!("image path {image} holds a quote")));
        }
        out.push(format!("'{}'", disk.to_raw_at(image)));
    }
    Ok(format!(
        "{}[ {} ]{}",
        &text[..start],
        out.join(", "),
        &text[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let d = parse_disk("format=qcow2, vdev=xvda, access=rw, target=/v/a,b.qcow2")
            .expect("must succeed");
        assert_eq!(
            (d.vdev.as_str(), d.format.as_str(), d.target.as_str()),
            ("xvda", "qcow2", "/v/a,b.qcow2")
        );
        let d = parse_disk("/v/img.raw,raw,xvdb,rw").expect("must succeed");
        assert_eq!((d.vdev.as_str(), d.access.as_deref()), ("xvdb", Some("rw")));
        assert_eq!(d.target, "/v/img.raw");
        let d = parse_disk("vdev=hdc, devtype=disk, backendtype=qdisk, target=/x")
            .expect("must succeed");
        assert_eq!(d.format, "raw");
        assert_eq!(d.other, vec!["devtype=disk", "backendtype=qdisk"]);
        assert!(parse_disk("target=/x").is_err());
    }

    #[test]
    fn rewrites_only_the_disk_list() {
        let cfg = "name = \"vm1\"\ntype = \"hvm\"\ndisk = [ 'format=qcow2, vdev=xvda, access=rw, target=/src/a.qcow2',\n   \"/src/b.raw,raw,xvdb,rw\" ]\nmemory = 256\n";
        let images: HashMap<String, String> = [
            ("xvda".to_string(), "/srv/m1/disk-xvda.raw".to_string()),
            ("xvdb".to_string(), "/srv/m1/disk-xvdb.raw".to_string()),
        ]
        .into();
        let out = rewrite(cfg, &images).expect("must succeed");
        assert!(out.starts_with("name = \"vm1\"\ntype = \"hvm\"\ndisk = [ "));
        assert!(out.ends_with(" ]\nmemory = 256\n"));
        let d = disks(&out).expect("must succeed");
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].target, "/srv/m1/disk-xvda.raw");
        assert_eq!(d[0].format, "raw");
        assert_eq!(d[1].target, "/srv/m1/disk-xvdb.raw");
        assert_eq!(d[1].access.as_deref(), Some("rw"));
        let only_a: HashMap<String, String> = [("xvda".to_string(), "/x".to_string())].into();
        let e = rewrite(cfg, &only_a).expect_err("must fail");
        assert!(e.0.contains("xvdb"), "{e}");
        assert!(rewrite("name = \"x\"\n", &images).is_err());
    }
}
