//! The shared journal's cluster in memory: the two JetStream streams as the JetStream journal
//! uses them, for the simulator, which runs several relays' [`super::chain::ChainAppend`]s
//! against one of these.
//!
//! It keeps what JetStream keeps and checks what JetStream checks, nothing more:
//! - records get the next stream sequence and the time of storing (the leader's stamp, which
//!   is what a record reads back as its journal time);
//! - a publish whose message id was stored before is answered with the first one's sequence
//!   and stored nothing; otherwise one whose expectation (the stream's last sequence, or the
//!   id of its last message) does not hold is refused;
//! - a register ([`Register`]) is the last message of its subject in the state stream, written
//!   only when the subject's last sequence is the one the writer read (compare-and-set);
//! - purging removes the records below a sequence.
//!
//! Gap-free seqs per agent and registers that never go down are the appending relays' doing,
//! not the stream's: the simulator checks them on what this holds. Faults (no leader, lost
//! answers) are the simulator's to inject around the calls; every call here is atomic.

use super::chain::{Answer, Expect, Link, Register};
use super::{JournalEntry, JournalRecord};
use pwsync_proto::{AgentId, Offset};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone)]
struct Stored {
    agent: AgentId,
    seq: u64,
    stamped_ms: u64,
    record: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct MemoryStream {
    records: BTreeMap<u64, Stored>,
    last_sequence: u64,
    last_msg_id: Option<String>,
    /// Every message id stored, with its sequence (JetStream keeps a window; this, all).
    ids: HashMap<String, u64>,
    /// Register → (value, its subject's last sequence in the state stream).
    registers: BTreeMap<Register, (u64, u64)>,
    state_sequence: u64,
}

/// A register write was refused: the subject's last sequence was not the one expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrongLastSubjectSequence;

impl MemoryStream {
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }

    /// The first sequence held (one past the last when nothing is).
    pub fn first_sequence(&self) -> u64 {
        self.records
            .keys()
            .next()
            .copied()
            .unwrap_or(self.last_sequence + 1)
    }

    /// The highest seq journaled for `agent`, as the JetStream journal reads it: its last
    /// record's seq, or its register when no record of it is held.
    pub fn agent_last(&self, agent: &AgentId) -> u64 {
        self.records
            .values()
            .rev()
            .find(|r| &r.agent == agent)
            .map(|r| r.seq)
            .unwrap_or_else(|| self.register(&Register::Agent(agent.clone())).0)
    }

    /// Publishes `record` (an encoded [`JournalRecord`]) as `link` says, stamped `now_ms`.
    pub fn publish(&mut self, link: &Link, record: &[u8], now_ms: u64) -> Answer {
        if let Some(sequence) = self.ids.get(&link.msg_id) {
            return Answer::Stored {
                sequence: *sequence,
            };
        }
        let holds = match &link.expect {
            Expect::LastSequence(s) => *s == self.last_sequence,
            Expect::LastMsgId(id) => self.last_msg_id.as_ref() == Some(id),
        };
        if !holds {
            return Answer::WrongLast;
        }
        let Ok(decoded) = JournalRecord::decode(record) else {
            return Answer::Failed;
        };
        self.last_sequence += 1;
        let sequence = self.last_sequence;
        self.last_msg_id = Some(link.msg_id.clone());
        self.ids.insert(link.msg_id.clone(), sequence);
        self.records.insert(
            sequence,
            Stored {
                agent: decoded.agent,
                seq: decoded.seq.0,
                stamped_ms: now_ms,
                record: record.to_vec(),
            },
        );
        Answer::Stored { sequence }
    }

    /// A register's value and its subject's last sequence (0, 0 if never written).
    pub fn register(&self, register: &Register) -> (u64, u64) {
        self.registers.get(register).copied().unwrap_or((0, 0))
    }

    /// Writes `value` to a register whose subject's last sequence is `expected` (as read).
    pub fn write_register(
        &mut self,
        register: &Register,
        value: u64,
        expected: u64,
    ) -> Result<(), WrongLastSubjectSequence> {
        if self.register(register).1 != expected {
            return Err(WrongLastSubjectSequence);
        }
        self.state_sequence += 1;
        self.registers
            .insert(register.clone(), (value, self.state_sequence));
        Ok(())
    }

    /// Removes every record at or below `through`; returns how many.
    pub fn purge_through(&mut self, through: u64) -> u64 {
        let keep = self.records.split_off(&(through + 1));
        let purged = self.records.len() as u64;
        self.records = keep;
        purged
    }

    /// Up to `limit` records from `from` on (from the first held if `from` was purged), each
    /// with the time it was stored as its journal time.
    pub fn read_from(&self, from: Offset, limit: usize) -> Vec<JournalEntry> {
        self.records
            .range(from.0..)
            .take(limit)
            .map(|(s, stored)| {
                let record = JournalRecord::decode(&stored.record).map(|mut r| {
                    r.received_ms = stored.stamped_ms;
                    r
                });
                (Offset(*s), record)
            })
            .collect()
    }

    /// Per agent with a record held, its last record: (agent, offset, seq).
    pub fn last_records(&self) -> Vec<(AgentId, u64, u64)> {
        let mut last: BTreeMap<&AgentId, (u64, u64)> = BTreeMap::new();
        for (offset, r) in &self.records {
            last.insert(&r.agent, (*offset, r.seq));
        }
        last.into_iter()
            .map(|(a, (offset, seq))| (a.clone(), offset, seq))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::Seq;

    fn record(agent: &str, seq: u64) -> Vec<u8> {
        JournalRecord {
            received_ms: 0,
            agent: AgentId::new(agent).expect("agent"),
            seq: Seq(seq),
            envelope: vec![1, 2, 3],
        }
        .encode()
    }

    fn link(id: &str, expect: Expect) -> Link {
        Link {
            index: 0,
            msg_id: id.into(),
            expect,
        }
    }

    #[test]
    fn expectations_on_the_whole_stream_and_duplicate_ids() {
        let mut s = MemoryStream::default();
        let first = link("x1", Expect::LastSequence(0));
        assert_eq!(
            s.publish(&first, &record("a", 1), 7),
            Answer::Stored { sequence: 1 }
        );
        assert_eq!(
            s.publish(&first, &record("a", 1), 8),
            Answer::Stored { sequence: 1 },
            "a known id stores nothing again"
        );
        assert_eq!(
            s.publish(&link("x2", Expect::LastSequence(0)), &record("a", 2), 8),
            Answer::WrongLast
        );
        assert_eq!(
            s.publish(
                &link("x3", Expect::LastMsgId("x9".into())),
                &record("a", 2),
                8
            ),
            Answer::WrongLast
        );
        assert_eq!(
            s.publish(
                &link("x4", Expect::LastMsgId("x1".into())),
                &record("a", 2),
                9
            ),
            Answer::Stored { sequence: 2 }
        );
        assert_eq!(s.agent_last(&AgentId::new("a").expect("agent")), 2);
        let read = s.read_from(Offset(1), 10);
        assert_eq!(read.len(), 2);
        assert!(matches!(&read[0].1, Ok(r) if r.received_ms == 7));
        assert_eq!(s.purge_through(1), 1);
        assert_eq!(s.first_sequence(), 2);
    }

    #[test]
    fn registers_are_compare_and_set_and_stand_in_for_purged_records() {
        let mut s = MemoryStream::default();
        let a = AgentId::new("a").expect("agent");
        let reg = Register::Agent(a.clone());
        assert_eq!(s.register(&reg), (0, 0));
        assert_eq!(s.write_register(&reg, 4, 0), Ok(()));
        assert_eq!(s.write_register(&reg, 5, 0), Err(WrongLastSubjectSequence));
        assert_eq!(s.agent_last(&a), 4);
    }
}
