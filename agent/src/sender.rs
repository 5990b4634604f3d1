//! The agent's sending decisions, without I/O: what to send the relay next, what a verified
//! ack lets go from the spool, and when everything outstanding is sent again. The forwarder
//! ([`crate::forwarder`]) is its shell: it reads the spool, publishes, verifies acks and
//! deletes; the simulator drives the same node over an in-memory spool.
//!
//! Envelopes `acked+1 ..` go out in seq order, at most `window` beyond the last ack
//! ([`SenderWindow`]). Only a verified ack moves `acked`, and only then may the spool delete
//! (custody: the relay's journal holds them). Everything outstanding is sent again on a
//! (re)connection, when no ack moves forward within the ack timeout (or, with several relays,
//! the agent moves on to the next one, where it is sent again once connected), and at once
//! when the relay answers without moving forward (it dropped something out of order), at most
//! once per `fast_resend_ms`.
//!
//! Times are milliseconds of a monotonic clock the caller passes in.

use pwsync_proto::window::{AckEffect, SenderWindow};
use pwsync_proto::Seq;
use std::collections::BTreeMap;
use std::ops::Range;

/// The sender's timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long an outstanding envelope waits for an ack that moves forward.
    pub ack_timeout_ms: u64,
    /// The shortest time between two resends made by acks that do not move forward.
    pub fast_resend_ms: u64,
}

/// What to do after an ack ([`Sender::on_ack`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterAck {
    Nothing,
    /// The relay holds everything through `through`: the spool may delete it. `waited_ms` is
    /// how long each of those envelopes waited since first sent (for the latency histogram).
    Delete {
        through: Seq,
        waited_ms: Vec<u64>,
    },
    /// Everything outstanding is sent again from the oldest unacked (`resent` are the seqs).
    Resend {
        resent: Range<u64>,
    },
    /// The relay holds seqs this spool never reached: the spool was reset or replaced. Nothing
    /// is deleted.
    Beyond,
}

/// What to do when the ack timeout passed ([`Sender::on_timeout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterTimeout {
    /// Everything outstanding is sent again (`resent` are the seqs).
    Resend { resent: Range<u64> },
    /// Move on to the next relay (there are several); sent again once connected there.
    NextRelay,
}

#[derive(Debug)]
pub struct Sender {
    window: SenderWindow,
    timing: Timing,
    /// How many relays there are to move between.
    relays: usize,
    connected: bool,
    /// When each outstanding seq was first sent.
    first_sent: BTreeMap<u64, u64>,
}

impl Sender {
    /// A sender whose relay acked everything through `acked` (the spool's first seq − 1).
    pub fn new(acked: Seq, window: u16, timing: Timing, relays: usize, now: u64) -> Sender {
        Sender {
            window: SenderWindow::new(acked.0, u64::from(window), now),
            timing,
            relays,
            connected: false,
            first_sent: BTreeMap::new(),
        }
    }

    pub fn acked(&self) -> Seq {
        Seq(self.window.acked())
    }

    pub fn outstanding(&self) -> u64 {
        self.window.outstanding()
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Connected (again): everything outstanding is sent again (the seqs returned).
    pub fn on_connected(&mut self, now: u64) -> Range<u64> {
        self.connected = true;
        self.go_back(now)
    }

    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// When [`Sender::on_timeout`] has something to do, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        (self.connected && self.window.outstanding() > 0)
            .then(|| self.window.deadline_ms(self.timing.ack_timeout_ms))
    }

    /// The clock reached `now`: if no ack moved forward within the ack timeout, what to do.
    pub fn on_timeout(&mut self, now: u64) -> Option<AfterTimeout> {
        if !self.connected || !self.window.overdue(now, self.timing.ack_timeout_ms) {
            return None;
        }
        Some(if self.relays > 1 {
            self.connected = false;
            AfterTimeout::NextRelay
        } else {
            AfterTimeout::Resend {
                resent: self.go_back(now),
            }
        })
    }

    /// A verified ack for this agent, through `through`; `spool_next` is the seq the spool
    /// gives next (so the relay cannot hold `spool_next` or beyond).
    pub fn on_ack(&mut self, through: Seq, spool_next: Seq, now: u64) -> AfterAck {
        match self
            .window
            .on_ack(through.0, spool_next.0, now, self.timing.fast_resend_ms)
        {
            AckEffect::Nothing => AfterAck::Nothing,
            AckEffect::Resend => AfterAck::Resend {
                resent: self.go_back(now),
            },
            AckEffect::Beyond => AfterAck::Beyond,
            AckEffect::Advanced(through) => {
                let still_out = self.first_sent.split_off(&(through + 1));
                let acked = std::mem::replace(&mut self.first_sent, still_out);
                AfterAck::Delete {
                    through: Seq(through),
                    waited_ms: acked.into_values().map(|t| now.saturating_sub(t)).collect(),
                }
            }
        }
    }

    /// What to send next, as (from, at most how many): `None` while disconnected or the window
    /// is full.
    pub fn wants(&self) -> Option<(Seq, usize)> {
        (self.connected && self.window.room() > 0)
            .then(|| (Seq(self.window.next()), self.window.room() as usize))
    }

    /// The envelopes from the window's next seq up to `next` (exclusive) were sent.
    pub fn sent(&mut self, next: Seq, now: u64) {
        for seq in self.window.next()..next.0 {
            self.first_sent.entry(seq).or_insert(now);
        }
        self.window.sent_up_to(next.0, now);
    }

    fn go_back(&mut self, now: u64) -> Range<u64> {
        let resent = self.window.acked() + 1..self.window.next();
        self.window.go_back(now);
        resent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMING: Timing = Timing {
        ack_timeout_ms: 100,
        fast_resend_ms: 10,
    };

    #[test]
    fn nothing_is_sent_while_disconnected_and_a_timeout_moves_to_the_next_relay() {
        let mut s = Sender::new(Seq(0), 4, TIMING, 2, 0);
        assert_eq!(s.wants(), None);
        assert_eq!(s.on_connected(0), 1..1);
        assert_eq!(s.wants(), Some((Seq(1), 4)));
        s.sent(Seq(4), 0);
        assert_eq!(s.wants(), Some((Seq(4), 1)));
        assert_eq!(s.poll_timeout(), Some(100));
        assert_eq!(s.on_timeout(50), None);
        assert_eq!(s.on_timeout(100), Some(AfterTimeout::NextRelay));
        assert_eq!(s.wants(), None);
        assert_eq!(s.on_connected(120), 1..4);
        assert_eq!(s.wants(), Some((Seq(1), 4)));
    }

    #[test]
    fn an_ack_deletes_only_what_it_covers_and_a_standing_ack_resends() {
        let mut s = Sender::new(Seq(0), 8, TIMING, 1, 0);
        s.on_connected(0);
        s.sent(Seq(6), 5);
        assert_eq!(
            s.on_ack(Seq(2), Seq(6), 30),
            AfterAck::Delete {
                through: Seq(2),
                waited_ms: vec![25, 25]
            }
        );
        assert_eq!(s.acked(), Seq(2));
        assert_eq!(
            s.on_ack(Seq(2), Seq(6), 50),
            AfterAck::Resend { resent: 3..6 }
        );
        assert_eq!(s.on_ack(Seq(9), Seq(6), 60), AfterAck::Beyond);
        assert_eq!(s.acked(), Seq(2));
        s.sent(Seq(6), 70);
        assert_eq!(
            s.on_timeout(170),
            Some(AfterTimeout::Resend { resent: 3..6 })
        );
    }
}
