//! QMP events and subscriptions to them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::Error;

/// How many events a subscriber may fall behind before it loses some
/// ([`Error::EventsLagged`]). QEMU's event rate is low (a few per second at most, block job
/// progress is polled, not pushed), so this covers long pauses of a subscriber.
pub(crate) const EVENT_CAPACITY: usize = 1024;

/// One asynchronous event from QEMU, e.g. `STOP`, `RESUME`, `BLOCK_JOB_READY`.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The event's name as QEMU spells it (`BLOCK_JOB_READY`).
    pub name: String,
    /// The event's `data` member; an empty object when QEMU sent none.
    pub data: serde_json::Value,
    /// When QEMU emitted the event, by QEMU's clock.
    pub timestamp: Timestamp,
}

/// Serializes as QEMU sends it, members in QEMU's order:
/// `{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": US}}`.
impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            event: &'a str,
            data: &'a serde_json::Value,
            timestamp: Timestamp,
        }
        Wire {
            event: &self.name,
            data: &self.data,
            timestamp: self.timestamp,
        }
        .serialize(serializer)
    }
}

/// QEMU's event timestamp: wall-clock time since the Unix epoch, split as QEMU sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The timestamp in microseconds since the epoch, for differences between events.
    pub fn as_micros(&self) -> i64 {
        self.seconds
            .saturating_mul(1_000_000)
            .saturating_add(self.microseconds)
    }
}

/// A subscription to a connection's events, from the moment [`Qmp::events`](crate::Qmp::events)
/// was called. Each subscription sees every event; dropping it unsubscribes.
///
/// Ends with [`Error::Disconnected`] when the connection is gone (or every
/// [`Qmp`](crate::Qmp) handle was dropped).
#[derive(Debug)]
pub struct Events {
    rx: Option<broadcast::Receiver<Event>>,
}

impl Events {
    pub(crate) fn new(rx: Option<broadcast::Receiver<Event>>) -> Self {
        Events { rx }
    }

    /// The next event. `Err(Error::Disconnected)` once the connection is gone and every event
    /// received before that was read; `Err(Error::EventsLagged)` if this subscriber fell more
    /// than 1024 events behind (reading again continues with the oldest event still held).
    pub async fn next(&mut self) -> Result<Event, Error> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(Error::Disconnected);
        };
        match rx.recv().await {
            Ok(event) => Ok(event),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(Error::EventsLagged { missed }),
            Err(broadcast::error::RecvError::Closed) => {
                self.rx = None;
                Err(Error::Disconnected)
            }
        }
    }

    /// Waits for the first event for which `pred` returns true, dropping the others, for at most
    /// `timeout`. `Err(Error::Timeout)` if none came, `Err(Error::Disconnected)` if the
    /// connection ended first, `Err(Error::EventsLagged)` if events were lost while waiting (the
    /// one wanted may have been among them).
    ///
    /// ```no_run
    /// # async fn demo(qmp: qmp::Qmp) -> Result<(), qmp::Error> {
    /// use std::time::Duration;
    /// let mut events = qmp.events(); // subscribe before acting, or the event may be missed
    /// qmp.execute(qapi::qmp::stop {}).await?;
    /// let stop = events.wait_for(|e| e.name == "STOP", Duration::from_secs(5)).await?;
    /// println!("stopped at {} us", stop.timestamp.as_micros());
    /// # Ok(()) }
    /// ```
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Ok(event)) if pred(&event) => return Ok(event),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::Timeout {
                        what: "a matching QMP event".into(),
                        after: timeout,
                    })
                }
            }
        }
    }
}
