//! One append of a batch to the shared journal, as decisions without I/O: what to read, which
//! envelopes to publish and with which expectations, what each answer means, whether to try
//! again, and which registers to raise before anyone is acked. The JetStream journal
//! ([`super::jetstream`]) is its shell (it reads, publishes and writes registers on the
//! cluster, and keeps the clock); the simulator drives the same node against the cluster's
//! in-memory twin ([`super::shared_memory::MemoryStream`]), with other relays' appends,
//! refusals, lost answers and crashes between any two steps.
//!
//! # A round
//! 1. The shell reads the stream's last sequence `L` and, for each agent of
//!    [`ChainAppend::reading`], the highest seq journaled (its last record's seq, or its
//!    register once every record of it has been pruned), and gives them to
//!    [`ChainAppend::on_read`] (or [`ChainAppend::on_read_failed`]).
//! 2. That sorts the envelopes not placed yet against those (duplicate, next, gap) and returns
//!    the next ones as a chain of [`Link`]s: each with a message id unique to this
//!    publication, the first expecting the stream's last sequence to be `L`, every later one
//!    expecting the stream's last message to be the link before it. These are expectations on
//!    the *whole stream*: if another relay appended in between, or one link was not stored,
//!    that link and every later one are refused, so the stream never holds an agent's seq N+1
//!    without N before it. (Expecting `L`, `L+1`, … is not enough: when one link is refused
//!    and another relay's record lands in its place, the next link's expectation holds again.)
//! 3. The shell publishes the chain in order and hands the answers, in order, to
//!    [`ChainAppend::on_answer`] until it says stop (the first failure).
//! 4. [`ChainAppend::end_round`] says what next: every envelope is placed, or read again at
//!    once (another relay appended in between; a bounded number of times), or after a pause
//!    (no leader, no answer, no connection; for as long as the budget lasts), or give up (the
//!    relay then tells its agents where they stand and they send the batch again).
//!
//! # Then
//! Every agent of the batch has its register raised to the highest seq journaled for it
//! ([`ChainAppend::registers`]; never lowered: [`needs_raising`]) *before* anyone is acked:
//! so an acked seq is in its register before any of its records can be pruned, and an agent
//! whose records are all pruned still continues from there. Records stored by an append that
//! never got that far (its relay stopped, or it gave up) are covered at pruning:
//! [`registers_before_purge`] raises the register of every agent whose last record is purged.

use super::{sort_batch, Intake};
use pwsync_proto::window::Acceptance;
use pwsync_proto::{AgentId, Offset, Seq};
use std::collections::BTreeMap;

/// How long one append may keep trying.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most rounds lost to other relays' appends coming in between.
    pub contended_rounds: u32,
    /// Longest the whole append may keep trying (ms since it started).
    pub total_ms: u64,
    /// The pause after a round failed other than by contention.
    pub pause_ms: u64,
}

/// What a link expects the stream's last message to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The stream's last sequence (JetStream's `Nats-Expected-Last-Sequence`).
    LastSequence(u64),
    /// The id of the stream's last message (`Nats-Expected-Last-Msg-Id`).
    LastMsgId(String),
}

/// One envelope of the batch to publish, with its id and expectation.
#[derive(Debug, Clone)]
pub struct Link {
    /// Its index in the batch.
    pub index: usize,
    pub msg_id: String,
    pub expect: Expect,
}

/// What became of one published link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// In the stream at this sequence (also when the stream had its id already).
    Stored { sequence: u64 },
    /// Refused: the stream's last message was not the one expected.
    WrongLast,
    /// Not sent, no answer in time, no leader, anything else: it may or may not have landed
    /// (the next round's reads find out).
    Failed,
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEnd {
    /// Every envelope is placed (appended, a duplicate, or out of order): raise the registers.
    Placed,
    /// Read again after this many ms (0: at once).
    Again { after_ms: u64 },
    /// The budget is spent: the batch fails.
    GiveUp,
}

/// A register of the shared journal: it only ever goes up.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Register {
    /// The highest seq journaled (and acked) for the agent.
    Agent(AgentId),
    /// The group's committed offset.
    Cursor(pwsync_proto::GroupName),
}

/// Whether a register holding `held` is to be written with `wanted`: only upwards, so a
/// relay raising it late (after another raised it further) never takes it back.
pub fn needs_raising(held: u64, wanted: u64) -> bool {
    held < wanted
}

/// The registers to raise before the records through `upto` are purged: each agent whose last
/// record held (`last_records`: agent, the record's offset, its seq) is at or below `upto`, to
/// that record's seq. An append that stored records and never raised their registers (its
/// relay stopped in between, or gave up) would otherwise be forgotten with its records, and
/// the agent's resend of those seqs journaled again.
pub fn registers_before_purge(
    last_records: impl IntoIterator<Item = (AgentId, u64, u64)>,
    upto: u64,
) -> Vec<(Register, u64)> {
    last_records
        .into_iter()
        .filter(|(_, offset, _)| *offset <= upto)
        .map(|(agent, _, seq)| (Register::Agent(agent), seq))
        .collect()
}

/// One append of one batch (see the module's account).
#[derive(Debug)]
pub struct ChainAppend {
    batch: Vec<(AgentId, Seq)>,
    budget: Budget,
    started_ms: u64,
    placed: Vec<Option<Offset>>,
    intake: Vec<Intake>,
    /// Per agent of the batch, the highest seq journaled as last read and sorted.
    last: BTreeMap<AgentId, u64>,
    /// The batch indices of this round's chain, and how many have been answered.
    chain: Vec<usize>,
    answered: usize,
    /// This round failed: `Some(contended)`.
    failed: Option<bool>,
    contended_rounds: u32,
    rounds: u32,
    recovering: bool,
}

impl ChainAppend {
    /// An append of `batch` (each envelope's agent and seq, in the order received), started at
    /// `now_ms`.
    pub fn new(batch: Vec<(AgentId, Seq)>, budget: Budget, now_ms: u64) -> ChainAppend {
        let n = batch.len();
        let last = batch.iter().map(|(a, _)| (a.clone(), 0)).collect();
        ChainAppend {
            batch,
            budget,
            started_ms: now_ms,
            placed: vec![None; n],
            intake: vec![Intake::Duplicate; n],
            last,
            chain: Vec::new(),
            answered: 0,
            failed: None,
            contended_rounds: 0,
            rounds: 0,
            recovering: false,
        }
    }

    /// The agents whose highest journaled seq a round reads, in this order.
    pub fn reading(&self) -> Vec<AgentId> {
        self.last.keys().cloned().collect()
    }

    /// The reads of a round: the stream's last sequence and, per agent of
    /// [`ChainAppend::reading`] in its order, the highest seq journaled. Returns the chain to
    /// publish, each link's id from `msg_id`.
    pub fn on_read(
        &mut self,
        last_sequence: u64,
        agent_last: &[u64],
        mut msg_id: impl FnMut() -> String,
    ) -> Vec<Link> {
        self.rounds += 1;
        self.failed = None;
        self.answered = 0;
        self.chain.clear();
        for (at, seq) in self.last.values_mut().zip(agent_last) {
            *at = *seq;
        }
        let waiting: Vec<usize> = (0..self.batch.len())
            .filter(|i| self.placed[*i].is_none())
            .collect();
        let sorted = sort_batch(
            waiting
                .iter()
                .map(|i| (&self.batch[*i].0, self.batch[*i].1)),
            &mut self.last,
        );
        let mut links: Vec<Link> = Vec::new();
        for (i, acceptance) in waiting.into_iter().zip(sorted) {
            self.intake[i] = match acceptance {
                Acceptance::Next => Intake::Appended(Offset(0)),
                Acceptance::Duplicate => Intake::Duplicate,
                Acceptance::Gap { expected } => Intake::OutOfOrder {
                    expected: Seq(expected),
                },
            };
            if acceptance != Acceptance::Next {
                continue;
            }
            let expect = match links.last() {
                None => Expect::LastSequence(last_sequence),
                Some(previous) => Expect::LastMsgId(previous.msg_id.clone()),
            };
            self.chain.push(i);
            links.push(Link {
                index: i,
                msg_id: msg_id(),
                expect,
            });
        }
        links
    }

    /// A read of the round failed (or took too long): the round fails.
    pub fn on_read_failed(&mut self) {
        self.rounds += 1;
        self.chain.clear();
        self.answered = 0;
        self.failed = Some(false);
    }

    /// The answer to the next link of the chain, in publish order; false once the round has
    /// failed (the shell stops waiting for later answers: the stream refuses every link after
    /// one that was not stored, and the next round reads what landed).
    pub fn on_answer(&mut self, answer: Answer) -> bool {
        if self.failed.is_some() {
            return false;
        }
        let Some(&i) = self.chain.get(self.answered) else {
            return false;
        };
        self.answered += 1;
        match answer {
            Answer::Stored { sequence } => {
                self.placed[i] = Some(Offset(sequence));
                self.intake[i] = Intake::Appended(Offset(sequence));
                true
            }
            Answer::WrongLast => {
                self.failed = Some(true);
                false
            }
            Answer::Failed => {
                self.failed = Some(false);
                false
            }
        }
    }

    /// What next, at `now_ms`, once the round's answers are in (see [`RoundEnd`]).
    pub fn end_round(&mut self, now_ms: u64) -> RoundEnd {
        let failed = match self.failed {
            None if self.answered == self.chain.len() && self.rounds > 0 => {
                return RoundEnd::Placed
            }
            None => false,
            Some(contended) => contended,
        };
        if failed {
            self.contended_rounds += 1;
        } else {
            self.recovering = true;
        }
        let elapsed = now_ms.saturating_sub(self.started_ms);
        if self.contended_rounds >= self.budget.contended_rounds
            || elapsed + self.budget.pause_ms >= self.budget.total_ms
        {
            return RoundEnd::GiveUp;
        }
        RoundEnd::Again {
            after_ms: if failed { 0 } else { self.budget.pause_ms },
        }
    }

    /// Whether a round has failed other than by contention (the cluster is electing or the
    /// connection is back: the shell waits less for each answer).
    pub fn recovering(&self) -> bool {
        self.recovering
    }

    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// What became of each envelope of the batch, in its order (once placed).
    pub fn intake(&self) -> &[Intake] {
        &self.intake
    }

    /// The highest offset this append stored, if any.
    pub fn end(&self) -> Option<Offset> {
        self.placed.iter().flatten().max().copied()
    }

    /// Per agent of the batch, the highest seq journaled: what is acked once its register
    /// holds it.
    pub fn acks(&self) -> BTreeMap<AgentId, Seq> {
        self.last
            .iter()
            .map(|(a, s)| (a.clone(), Seq(*s)))
            .collect()
    }

    /// The registers to raise before anyone is acked: every agent of the batch that has a
    /// journaled seq, not only those appended now (a batch that appended, then failed while
    /// raising, is followed by one that finds only duplicates; its registers must still go up).
    pub fn registers(&self) -> Vec<(Register, u64)> {
        self.last
            .iter()
            .filter(|(_, seq)| **seq > 0)
            .map(|(a, seq)| (Register::Agent(a.clone()), *seq))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(n: &str) -> AgentId {
        AgentId::new(n).expect("agent")
    }

    const BUDGET: Budget = Budget {
        contended_rounds: 3,
        total_ms: 1_000,
        pause_ms: 100,
    };

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id-{n}")
        }
    }

    #[test]
    fn a_chain_expects_the_stream_end_then_each_link_before_it() {
        let (a, b) = (agent("a"), agent("b"));
        let batch = vec![
            (a.clone(), Seq(3)),
            (b.clone(), Seq(1)),
            (a.clone(), Seq(2)),
            (a.clone(), Seq(5)),
        ];
        let mut append = ChainAppend::new(batch, BUDGET, 0);
        assert_eq!(append.reading(), vec![a.clone(), b.clone()]);
        let links = append.on_read(10, &[2, 0], ids());
        let expects: Vec<(usize, Expect)> =
            links.iter().map(|l| (l.index, l.expect.clone())).collect();
        assert_eq!(
            expects,
            vec![
                (0, Expect::LastSequence(10)),
                (1, Expect::LastMsgId("id-1".into())),
            ]
        );
        assert!(append.on_answer(Answer::Stored { sequence: 11 }));
        assert!(append.on_answer(Answer::Stored { sequence: 12 }));
        assert_eq!(append.end_round(5), RoundEnd::Placed);
        assert_eq!(
            append.intake(),
            &[
                Intake::Appended(Offset(11)),
                Intake::Appended(Offset(12)),
                Intake::Duplicate,
                Intake::OutOfOrder { expected: Seq(4) },
            ]
        );
        assert_eq!(append.end(), Some(Offset(12)));
        assert_eq!(
            append.registers(),
            vec![(Register::Agent(a), 3), (Register::Agent(b), 1)]
        );
    }

    #[test]
    fn a_refused_link_ends_the_round_and_the_next_round_sends_only_what_did_not_land() {
        let a = agent("a");
        let batch = vec![(a.clone(), Seq(1)), (a.clone(), Seq(2)), (a, Seq(3))];
        let mut append = ChainAppend::new(batch, BUDGET, 0);
        let links = append.on_read(0, &[0], ids());
        assert_eq!(links.len(), 3);
        assert!(append.on_answer(Answer::Stored { sequence: 1 }));
        assert!(!append.on_answer(Answer::WrongLast));
        assert!(!append.on_answer(Answer::WrongLast));
        assert_eq!(append.end_round(1), RoundEnd::Again { after_ms: 0 });
        // Another relay appended seq 2 meanwhile (a resend through it).
        let links = append.on_read(2, &[2], ids());
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].index, 2);
        assert_eq!(links[0].expect, Expect::LastSequence(2));
        assert!(append.on_answer(Answer::Stored { sequence: 3 }));
        assert_eq!(append.end_round(2), RoundEnd::Placed);
        assert_eq!(append.intake()[1], Intake::Duplicate);
    }

    #[test]
    fn failures_pause_and_the_budget_ends_the_append() {
        let a = agent("a");
        let mut append = ChainAppend::new(vec![(a, Seq(1))], BUDGET, 0);
        append.on_read_failed();
        assert_eq!(append.end_round(100), RoundEnd::Again { after_ms: 100 });
        assert!(append.recovering());
        append.on_read(0, &[0], ids());
        assert!(!append.on_answer(Answer::Failed));
        assert_eq!(append.end_round(950), RoundEnd::GiveUp);
        let mut contended = ChainAppend::new(vec![(agent("b"), Seq(1))], BUDGET, 0);
        for round in 0..3 {
            contended.on_read(round, &[0], ids());
            contended.on_answer(Answer::WrongLast);
            let end = contended.end_round(0);
            assert_eq!(
                end == RoundEnd::GiveUp,
                round == 2,
                "round {round}: {end:?}"
            );
        }
    }

    #[test]
    fn a_purge_first_raises_the_registers_of_agents_it_empties() {
        let raise = registers_before_purge([(agent("a"), 4, 7), (agent("b"), 9, 2)], 5);
        assert_eq!(raise, vec![(Register::Agent(agent("a")), 7)]);
    }

    #[test]
    fn registers_only_go_up() {
        assert!(needs_raising(3, 4));
        assert!(!needs_raising(4, 4));
        assert!(!needs_raising(5, 4));
    }
}
