//! Where the test guest's kernel and initrd are.

use std::path::{Path, PathBuf};

use super::GuestError;

const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initrd.img";

/// The test guest's boot files, as built by `vm-images/build`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// The initrd with busybox, the virtio modules and the workload (`-initrd`).
    pub initrd: PathBuf,
}

impl GuestImages {
    /// Finds the guest: in `$FERRY_GUEST_DIR` if set (and only there), else in `vm-images/out` of
    /// the source tree ferry was built from, else in `ferry-guest/` next to the executable.
    pub fn locate() -> Result<Self, GuestError> {
        if let Some(dir) = std::env::var_os("FERRY_GUEST_DIR") {
            let dir = PathBuf::from(dir);
            return Self::in_dir(&dir).ok_or(GuestError::ImagesNotInGuestDir { dir });
        }
        // This crate lives in `testkit/` of the source tree, beside `vm-images/`.
        let tree = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut tried = vec![tree.parent().unwrap_or(tree).join("vm-images/out")];
        if let Some(exe_dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
        {
            tried.push(exe_dir.join("ferry-guest"));
        }
        tried
            .iter()
            .find_map(|dir| Self::in_dir(dir))
            .ok_or(GuestError::ImagesMissing { tried })
    }

    /// The guest in `dir`, if both files are there.
    pub fn in_dir(dir: &Path) -> Option<Self> {
        let images = Self {
            kernel: dir.join(KERNEL),
            initrd: dir.join(INITRD),
        };
        (images.kernel.is_file() && images.initrd.is_file()).then_some(images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_dir_needs_both_files() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(GuestImages::in_dir(dir.path()), None);
        std::fs::write(dir.path().join("vmlinuz"), b"k")?;
        assert_eq!(GuestImages::in_dir(dir.path()), None);
        std::fs::write(dir.path().join("initrd.img"), b"i")?;
        let found = GuestImages::in_dir(dir.path()).expect("both files exist");
        assert_eq!(found.kernel, dir.path().join("vmlinuz"));
        assert_eq!(found.initrd, dir.path().join("initrd.img"));
        Ok(())
    }

    #[test]
    fn missing_message_tells_what_to_do() {
        let err = GuestError::ImagesMissing {
            tried: vec![PathBuf::from("/x/vm-images/out")],
        };
        assert_eq!(
            err.to_string(),
            "the test guest is not built (looked for vmlinuz and initrd.img in /x/vm-images/out): run scripts/setup"
        );
    }
}
