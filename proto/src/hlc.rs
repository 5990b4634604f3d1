//! Hybrid logical clock (Kulkarni et al.): a timestamp that follows wall time but never goes
//! backwards and orders causally related events across hosts whose clocks disagree a little.
//!
//! An [`Hlc`] is a `u64`: the upper 48 bits are milliseconds since the Unix epoch, the lower 16 a
//! logical counter. Comparing two `Hlc`s compares `(physical, logical)`. Consumers use it to let
//! the newer of two changes for one user win (G3).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// How far ahead of our wall clock a remote timestamp may be before we refuse to follow it.
pub const MAX_FORWARD_DRIFT_MS: u64 = 5 * 60 * 1000;

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct Hlc(pub u64);

impl Hlc {
    pub fn new(physical_ms: u64, logical: u16) -> Hlc {
        Hlc((physical_ms << LOGICAL_BITS) | u64::from(logical))
    }
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hlc({}.{})", self.physical_ms(), self.logical())
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// Milliseconds since the Unix epoch by the wall clock (0 if the clock is before 1970).
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A remote timestamp was too far in the future to follow.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("remote clock is {ahead_ms} ms ahead of ours (limit {MAX_FORWARD_DRIFT_MS} ms); ignored")]
pub struct ClockDrift {
    pub ahead_ms: u64,
}

/// The clock of one process. Not shared between threads: wrap it in a lock if needed.
#[derive(Debug, Clone, Default)]
pub struct HybridClock {
    last: Hlc,
}

impl HybridClock {
    /// A clock that will never issue a timestamp at or below `floor` (e.g. the last one persisted).
    pub fn starting_after(floor: Hlc) -> Self {
        HybridClock { last: floor }
    }

    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp for a local event, strictly greater than every earlier one.
    pub fn now(&mut self) -> Hlc {
        self.tick(wall_ms())
    }

    /// [`HybridClock::now`] with an explicit wall time, for tests.
    pub fn tick(&mut self, wall: u64) -> Hlc {
        let next = if wall > self.last.physical_ms() {
            Hlc::new(wall, 0)
        } else {
            Hlc(self.last.0 + 1)
        };
        self.last = next;
        next
    }

    /// Merges a timestamp received from a peer, so later local events order after it.
    pub fn observe(&mut self, remote: Hlc) -> Result<(), ClockDrift> {
        self.observe_at(remote, wall_ms())
    }

    pub fn observe_at(&mut self, remote: Hlc, wall: u64) -> Result<(), ClockDrift> {
        if remote.physical_ms() > wall + MAX_FORWARD_DRIFT_MS {
            return Err(ClockDrift {
                ahead_ms: remote.physical_ms() - wall,
            });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_goes_backwards_when_wall_clock_does() {
        let mut c = HybridClock::default();
        let a = c.tick(1000);
        let b = c.tick(900);
        let d = c.tick(900);
        assert!(a < b && b < d);
        assert_eq!(c.tick(2000), Hlc::new(2000, 0));
    }

    #[test]
    fn observing_a_later_remote_orders_local_events_after_it() {
        let mut c = HybridClock::default();
        c.tick(1000);
        let remote = Hlc::new(1500, 7);
        c.observe_at(remote, 1000).unwrap();
        assert!(c.tick(1000) > remote);
    }

    #[test]
    fn remote_far_in_the_future_is_refused() {
        let mut c = HybridClock::default();
        let remote = Hlc::new(1000 + MAX_FORWARD_DRIFT_MS + 1, 0);
        assert!(c.observe_at(remote, 1000).is_err());
        assert!(c.tick(1000) < remote);
    }
}
