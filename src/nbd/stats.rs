//! Counters of what a server did, for whoever embeds it (the agent exports them as metrics).
//!
//! Plain atomics bumped on the request path: one relaxed add per request, nothing allocated,
//! no lock. A server's counters may roll up into a parent's (the agent's totals over every
//! migration's server), so that totals stay monotonic while per-server counters come and go.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Requests served, requests that failed, and bytes written, since the counters were made.
#[derive(Debug, Default)]
pub struct NbdStats {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_written: AtomicU64,
    parent: Option<Arc<NbdStats>>,
}

impl NbdStats {
    /// Counters that also add into `parent`.
    pub fn child_of(parent: Arc<NbdStats>) -> NbdStats {
        NbdStats {
            parent: Some(parent),
            ..NbdStats::default()
        }
    }

    /// Requests read off the wire (refused ones included).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests answered with an error (refused by the checks, or failed on the disk).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Payload bytes of writes that reached the backend successfully.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// One more request.
    pub fn count_request(&self) {
        self.add(|s| &s.requests, 1);
    }

    /// One more failed request.
    pub fn count_error(&self) {
        self.add(|s| &s.errors, 1);
    }

    /// `bytes` more written.
    pub fn count_written(&self, bytes: u64) {
        self.add(|s| &s.bytes_written, bytes);
    }

    fn add(&self, field: impl Fn(&NbdStats) -> &AtomicU64, n: u64) {
        field(self).fetch_add(n, Ordering::Relaxed);
        if let Some(parent) = &self.parent {
            parent.add(field, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_roll_up_into_their_parent() {
        let total = Arc::new(NbdStats::default());
        let a = NbdStats::child_of(total.clone());
        let b = NbdStats::child_of(total.clone());
        a.count_request();
        a.count_written(4096);
        b.count_request();
        b.count_error();
        assert_eq!((a.requests(), a.errors(), a.bytes_written()), (1, 0, 4096));
        assert_eq!((b.requests(), b.errors(), b.bytes_written()), (1, 1, 0));
        assert_eq!(
            (total.requests(), total.errors(), total.bytes_written()),
            (2, 1, 4096)
        );
    }
}
