//! The go-back-N sender window and in-order acceptance: the one protocol both hops of pwsync
//! speak (agent → relay by seq, relay → consumer group by journal offset).
//!
//! Pure state machines: no I/O, no clock of their own (time is an input, in milliseconds of
//! any monotonic clock), so the daemons and the deterministic simulator (`tests/tests/sim.rs`)
//! run the same code.
//!
//! The sender keeps every position from `acked + 1` on until the receiver acks it durably, and
//! sends at most `size` beyond the last ack. Positions are `u64`, gap-free, starting at 1.
//!
//! Invariants:
//! - `acked < next`, and `next - acked - 1` (outstanding) never exceeds the window size by the
//!   sender's own doing ([`SenderWindow::room`]).
//! - Only [`SenderWindow::on_ack`] moves `acked`, and only forward, and only to a position that
//!   was handed to the sender ([`AckEffect::Beyond`] otherwise): the caller may delete its copies
//!   through [`AckEffect::Advanced`]'s position, and through nothing else.
//! - Anything outstanding is sent again from `acked + 1` when the receiver is silent for the
//!   timeout ([`SenderWindow::overdue`]), when it says where it stands without moving
//!   ([`AckEffect::Resend`]), and on every (re)connection ([`SenderWindow::go_back`]).
//! - The receiver takes exactly the next position ([`accept`]): one at or below the last it holds
//!   is a duplicate, one beyond is a gap, dropped until the sender goes back.

/// What an ack did to the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckEffect {
    /// The receiver holds everything through this position: the sender's copies through it may
    /// go.
    Advanced(u64),
    /// The receiver stands where it stood with positions outstanding: send again from
    /// `acked + 1` now (the caller calls [`SenderWindow::go_back`]).
    Resend,
    /// An ack that moves nothing (old, or too soon after the last resend).
    Nothing,
    /// An ack for a position this sender never had: the sender's store was reset or replaced.
    /// Nothing moves and nothing may be deleted.
    Beyond,
}

/// A go-back-N window over positions `1, 2, …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderWindow {
    acked: u64,
    next: u64,
    size: u64,
    /// When the window last moved (an ack advanced, everything was sent again, or sending
    /// started from an empty window).
    last_progress_ms: u64,
}

impl SenderWindow {
    /// A window whose receiver holds everything through `acked`, sending at most `size` ahead.
    pub fn new(acked: u64, size: u64, now_ms: u64) -> SenderWindow {
        SenderWindow {
            acked,
            next: acked + 1,
            size: size.max(1),
            last_progress_ms: now_ms,
        }
    }

    /// The highest position the receiver acked.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The next position to send.
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn outstanding(&self) -> u64 {
        self.next - self.acked - 1
    }

    /// How many more positions may be sent now.
    pub fn room(&self) -> u64 {
        self.size.saturating_sub(self.outstanding())
    }

    /// Positions up to (not including) `next` were handed to the transport.
    pub fn sent_up_to(&mut self, next: u64, now_ms: u64) {
        if next <= self.next {
            return;
        }
        if self.outstanding() == 0 {
            self.last_progress_ms = now_ms;
        }
        self.next = next;
    }

    /// Everything outstanding is to be sent again, from `acked + 1`.
    pub fn go_back(&mut self, now_ms: u64) {
        self.next = self.acked + 1;
        self.last_progress_ms = now_ms;
    }

    /// Whether positions are outstanding and no progress was made for `timeout_ms`.
    pub fn overdue(&self, now_ms: u64, timeout_ms: u64) -> bool {
        self.outstanding() > 0 && now_ms >= self.last_progress_ms.saturating_add(timeout_ms)
    }

    /// When the window becomes [`overdue`](Self::overdue) after `timeout_ms`.
    pub fn deadline_ms(&self, timeout_ms: u64) -> u64 {
        self.last_progress_ms.saturating_add(timeout_ms)
    }

    /// The receiver durably holds everything through `through`; the sender has handed out
    /// positions below `limit` (its store's next position). A stand-still ack resends, at most
    /// once per `min_resend_ms`.
    pub fn on_ack(
        &mut self,
        through: u64,
        limit: u64,
        now_ms: u64,
        min_resend_ms: u64,
    ) -> AckEffect {
        if through >= limit {
            return AckEffect::Beyond;
        }
        if through <= self.acked {
            let quiet_for = now_ms.saturating_sub(self.last_progress_ms);
            return if through == self.acked && self.outstanding() > 0 && quiet_for >= min_resend_ms
            {
                AckEffect::Resend
            } else {
                AckEffect::Nothing
            };
        }
        self.acked = through;
        if self.next <= through {
            self.next = through + 1;
        }
        self.last_progress_ms = now_ms;
        AckEffect::Advanced(through)
    }
}

/// What a receiver does with position `incoming` when it holds everything through `last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acceptance {
    /// Exactly the next one: take it.
    Next,
    /// Held already: drop it (and ack again).
    Duplicate,
    /// Beyond the next one: drop it; `expected` is what the receiver waits for.
    Gap { expected: u64 },
}

/// In-order acceptance: the receiver takes only `last + 1`.
pub fn accept(last: u64, incoming: u64) -> Acceptance {
    if incoming <= last {
        Acceptance::Duplicate
    } else if incoming == last + 1 {
        Acceptance::Next
    } else {
        Acceptance::Gap { expected: last + 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_at_most_a_window_and_moves_only_on_acks_it_can_have() {
        let mut w = SenderWindow::new(0, 4, 0);
        assert_eq!((w.room(), w.next()), (4, 1));
        w.sent_up_to(5, 10);
        assert_eq!((w.outstanding(), w.room()), (4, 0));
        assert_eq!(w.on_ack(9, 5, 20, 0), AckEffect::Beyond);
        assert_eq!(w.acked(), 0);
        assert_eq!(w.on_ack(2, 5, 20, 0), AckEffect::Advanced(2));
        assert_eq!((w.acked(), w.outstanding(), w.room()), (2, 2, 2));
        assert_eq!(w.on_ack(1, 5, 21, 0), AckEffect::Nothing);
        assert!(!w.overdue(1019, 1000) && w.overdue(1020, 1000));
        // A stand-still ack resends, but not sooner than asked.
        assert_eq!(w.on_ack(2, 5, 100, 500), AckEffect::Nothing);
        assert_eq!(w.on_ack(2, 5, 520, 500), AckEffect::Resend);
        w.go_back(520);
        assert_eq!((w.next(), w.outstanding()), (3, 0));
        assert_eq!(w.on_ack(4, 5, 530, 0), AckEffect::Advanced(4));
        assert_eq!(w.next(), 5);
    }

    #[test]
    fn acceptance_takes_only_the_next() {
        assert_eq!(accept(3, 4), Acceptance::Next);
        assert_eq!(accept(3, 3), Acceptance::Duplicate);
        assert_eq!(accept(3, 1), Acceptance::Duplicate);
        assert_eq!(accept(3, 6), Acceptance::Gap { expected: 4 });
    }
}
