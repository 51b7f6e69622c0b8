//! Exports being served: their storage, their lifecycle (stop signal, in-flight work), and the
//! registry that the handshake looks names up in.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::backend::Backend;
use super::wire::tflag;

/// One export while it is served.
#[derive(Debug)]
pub(crate) struct ExportState {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) read_only: bool,
    pub(crate) backend: Backend,
    /// Cancelled when the export is removed or the server stops: connections stop reading new
    /// requests, finish what is in flight, and close.
    pub(crate) stop: CancellationToken,
    /// Every connection and every disk operation on this export holds a token of this tracker;
    /// removal waits for it to drain before the final flush.
    pub(crate) work: TaskTracker,
}

impl ExportState {
    /// Transmission flags, advertised truthfully. `chunked`: structured replies or extended
    /// headers were negotiated (a precondition of `SEND_DF`).
    ///
    /// `CAN_MULTI_CONN` holds because every connection to the export shares one descriptor and
    /// the kernel's page cache, and `FLUSH` is `fdatasync` on it: once a flush or FUA write is
    /// answered on one connection its effect is visible and durable for all of them.
    pub(crate) fn transmission_flags(&self, chunked: bool) -> u16 {
        let mut flags = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::CAN_MULTI_CONN
            | tflag::SEND_CACHE;
        if self.read_only {
            flags |= tflag::READ_ONLY;
        } else {
            flags |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES | tflag::SEND_FAST_ZERO;
        }
        if chunked {
            flags |= tflag::SEND_DF;
        }
        flags
    }
}

/// Exports by name. Reads (handshakes) vastly outnumber writes (add/remove).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    exports: RwLock<BTreeMap<String, Arc<ExportState>>>,
}

impl Registry {
    pub(crate) fn get(&self, name: &str) -> Option<Arc<ExportState>> {
        self.read().get(name).cloned()
    }

    /// Export names in order, for `NBD_OPT_LIST`.
    pub(crate) fn names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Adds `export` unless its name is taken; gives it back if it is.
    pub(crate) fn insert(&self, export: Arc<ExportState>) -> Result<(), Arc<ExportState>> {
        let mut map = self
            .exports
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if map.contains_key(&export.name) {
            return Err(export);
        }
        map.insert(export.name.clone(), export);
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> Option<Arc<ExportState>> {
        self.exports
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(name)
    }

    pub(crate) fn drain(&self) -> Vec<Arc<ExportState>> {
        let mut map = self
            .exports
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *map).into_values().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<ExportState>>> {
        // The map stays consistent even if a holder panicked: every write is a single call.
        self.exports
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
