//! Places for connections that have not authenticated yet. They are few, separate from the
//! migrations' places, and never held hostage: when all are taken, the oldest pending handshake
//! is closed to make room. Idle or slow unauthenticated peers therefore cannot keep a real source
//! out (its whole handshake takes milliseconds), however many connections they open, from however
//! many addresses; each is also cut after the handshake timeout.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// The pending handshakes.
pub struct Handshakes {
    max: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    next: u64,
    pending: VecDeque<(u64, CancellationToken)>,
}

/// One connection's place until it authenticated (or failed to): dropping it gives it back.
pub struct Place {
    id: u64,
    /// Cancelled when the place was taken back for a newer connection.
    pub evicted: CancellationToken,
    owner: Arc<Handshakes>,
}

impl Handshakes {
    /// Room for `max` pending handshakes.
    pub fn new(max: usize) -> Arc<Handshakes> {
        Arc::new(Handshakes {
            max: max.max(1),
            inner: Mutex::new(Inner {
                next: 0,
                pending: VecDeque::new(),
            }),
        })
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection, evicting the oldest pending one if all are taken.
    pub fn take(self: &Arc<Self>) -> Place {
        let mut inner = self.inner();
        while inner.pending.len() >= self.max {
            if let Some((_, oldest)) = inner.pending.pop_front() {
                oldest.cancel();
            }
        }
        let id = inner.next;
        inner.next += 1;
        let evicted = CancellationToken::new();
        inner.pending.push_back((id, evicted.clone()));
        Place {
            id,
            evicted,
            owner: self.clone(),
        }
    }

    /// How many handshakes are pending.
    pub fn pending(&self) -> usize {
        self.inner().pending.len()
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.owner.inner().pending.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_makes_room_and_places_come_back() {
        let places = Handshakes::new(2);
        let first = places.take();
        let second = places.take();
        assert_eq!(places.pending(), 2);
        let third = places.take();
        assert!(first.evicted.is_cancelled(), "the oldest gave way");
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        assert_eq!(places.pending(), 2);
        drop(first);
        assert_eq!(
            places.pending(),
            2,
            "an evicted place was already given back"
        );
        drop(second);
        assert_eq!(places.pending(), 1);
        drop(third);
        assert_eq!(places.pending(), 0);
    }
}
