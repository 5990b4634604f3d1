//! A journal in memory: the embedded journal's twin for the simulator and tests. It takes a
//! batch by the same [`super::rules::apply_batch`] as the redb file, so it keeps the same
//! invariants; a transaction is a call (none of its steps can fail), and it is durable by definition
//! (a simulated relay crash keeps it, as a redb file survives a crash).

use super::rules::{apply_batch, JournalTables};
use super::{Applied, Incoming, JournalEntry, JournalError, JournalRecord};
use pwsync_proto::{AgentId, GroupName, Offset};
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
pub struct MemoryJournal {
    records: BTreeMap<u64, Vec<u8>>,
    agent_seq: BTreeMap<AgentId, u64>,
    cursors: BTreeMap<GroupName, u64>,
    next_offset: u64,
}

impl Default for MemoryJournal {
    fn default() -> MemoryJournal {
        MemoryJournal {
            records: BTreeMap::new(),
            agent_seq: BTreeMap::new(),
            cursors: BTreeMap::new(),
            next_offset: 1,
        }
    }
}

impl MemoryJournal {
    /// As [`super::EmbeddedJournal::apply`], journaling at `now_ms`.
    pub fn apply(
        &mut self,
        incoming: &[Incoming],
        commits: &[(GroupName, Offset)],
        declared: &[GroupName],
        retention_ms: u64,
        now_ms: u64,
    ) -> Result<Applied, JournalError> {
        // Nothing here fails, so a call is whole or (never) nothing.
        apply_batch(self, incoming, commits, declared, retention_ms, now_ms)
    }

    pub fn next_offset(&self) -> Offset {
        Offset(self.next_offset)
    }

    /// The lowest offset held, if any record is.
    pub fn first_offset(&self) -> Option<Offset> {
        self.records.keys().next().map(|o| Offset(*o))
    }

    /// Up to `limit` records from `from` on, in offset order.
    pub fn read_from(&self, from: Offset, limit: usize) -> Vec<JournalEntry> {
        self.records
            .range(from.0..)
            .take(limit)
            .map(|(o, bytes)| (Offset(*o), JournalRecord::decode(bytes)))
            .collect()
    }

    pub fn cursor(&self, group: &GroupName) -> Offset {
        Offset(self.cursors.get(group).copied().unwrap_or(0))
    }

    /// The highest seq journaled for `agent` (0 for none).
    pub fn agent_seq(&self, agent: &AgentId) -> u64 {
        self.agent_seq.get(agent).copied().unwrap_or(0)
    }
}

impl JournalTables for MemoryJournal {
    fn agent_seq(&self, agent: &AgentId) -> Result<u64, JournalError> {
        Ok(MemoryJournal::agent_seq(self, agent))
    }
    fn set_agent_seq(&mut self, agent: &AgentId, seq: u64) -> Result<(), JournalError> {
        self.agent_seq.insert(agent.clone(), seq);
        Ok(())
    }
    fn next_offset(&self) -> u64 {
        self.next_offset
    }
    fn append(&mut self, record: &[u8]) -> Result<(), JournalError> {
        self.records.insert(self.next_offset, record.to_vec());
        self.next_offset += 1;
        Ok(())
    }
    fn cursor(&self, group: &GroupName) -> Result<u64, JournalError> {
        Ok(MemoryJournal::cursor(self, group).0)
    }
    fn set_cursor(&mut self, group: &GroupName, offset: u64) -> Result<(), JournalError> {
        self.cursors.insert(group.clone(), offset);
        Ok(())
    }
    fn prune_through(
        &mut self,
        through: u64,
        doomed: &dyn Fn(&[u8]) -> bool,
    ) -> Result<u64, JournalError> {
        let before = self.records.len();
        self.records
            .retain(|offset, bytes| *offset > through || !doomed(bytes));
        Ok((before - self.records.len()) as u64)
    }
}
