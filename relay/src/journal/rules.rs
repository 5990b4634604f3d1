//! The journal's rules, once: how one transaction takes a batch of verified envelopes and
//! commits ([`apply_batch`]), and when a record may go ([`prune_floor`], [`past_retention`]).
//!
//! A store gives [`apply_batch`] its tables through [`JournalTables`] (the embedded journal:
//! one redb write transaction; [`super::memory::MemoryJournal`]: maps in memory, for the
//! simulator and tests), so both keep the invariants of [`super`] by the same code. The
//! JetStream journal appends by chains on the cluster and prunes apart from appends; it takes
//! the per-agent order from [`super::sort_batch`] and the prune rule from here.

use super::{sort_batch, Applied, Incoming, Intake, JournalError, JournalRecord};
use pwsync_proto::window::Acceptance;
use pwsync_proto::{AgentId, GroupName, Offset, Seq};
use std::collections::BTreeMap;

/// The tables one journal transaction reads and writes.
pub trait JournalTables {
    /// The highest seq journaled for `agent` (0 for none).
    fn agent_seq(&self, agent: &AgentId) -> Result<u64, JournalError>;
    fn set_agent_seq(&mut self, agent: &AgentId, seq: u64) -> Result<(), JournalError>;
    /// The offset the next record gets.
    fn next_offset(&self) -> u64;
    /// Appends an encoded [`JournalRecord`] at [`JournalTables::next_offset`].
    fn append(&mut self, record: &[u8]) -> Result<(), JournalError>;
    /// The group's committed offset (0 if it never committed).
    fn cursor(&self, group: &GroupName) -> Result<u64, JournalError>;
    fn set_cursor(&mut self, group: &GroupName, offset: u64) -> Result<(), JournalError>;
    /// Deletes the records at or below `through` whose encoded bytes `doomed` says may go;
    /// returns how many it deleted.
    fn prune_through(
        &mut self,
        through: u64,
        doomed: &dyn Fn(&[u8]) -> bool,
    ) -> Result<u64, JournalError>;
}

/// Journals `incoming` (per agent strictly in order: the next seq is appended, a lower one is
/// a duplicate, a higher one is dropped), moves each group's cursor forward for `commits` (never
/// past the journal's end), and, when a cursor moved, prunes what every `declared` group has
/// committed and is past `retention_ms` at `now_ms` (the records' journal time is `now_ms`).
pub fn apply_batch(
    tables: &mut impl JournalTables,
    incoming: &[Incoming],
    commits: &[(GroupName, Offset)],
    declared: &[GroupName],
    retention_ms: u64,
    now_ms: u64,
) -> Result<Applied, JournalError> {
    let mut out = Applied::default();
    let mut last_seq: BTreeMap<AgentId, u64> = BTreeMap::new();
    for inc in incoming {
        if !last_seq.contains_key(&inc.agent) {
            last_seq.insert(inc.agent.clone(), tables.agent_seq(&inc.agent)?);
        }
    }
    let sorted = sort_batch(incoming.iter().map(|i| (&i.agent, i.seq)), &mut last_seq);
    for (inc, acceptance) in incoming.iter().zip(sorted) {
        out.intake.push(match acceptance {
            Acceptance::Duplicate => Intake::Duplicate,
            Acceptance::Next => {
                let at = tables.next_offset();
                tables.append(&inc.encode_record(now_ms))?;
                Intake::Appended(Offset(at))
            }
            Acceptance::Gap { expected } => Intake::OutOfOrder {
                expected: Seq(expected),
            },
        });
    }
    for (agent, seq) in &last_seq {
        tables.set_agent_seq(agent, *seq)?;
        out.ack.insert(agent.clone(), Seq(*seq));
    }
    let end = tables.next_offset();
    for (group, offset) in commits {
        if cursor_moves(tables.cursor(group)?, offset.0, end) {
            tables.set_cursor(group, offset.0)?;
            out.advanced.insert(group.clone(), *offset);
        }
    }
    if !out.advanced.is_empty() {
        let mut cursors = Vec::with_capacity(declared.len());
        for g in declared {
            cursors.push(tables.cursor(g)?);
        }
        if let Some(floor) = prune_floor(cursors) {
            // With no retention every committed record goes, unread.
            out.pruned = tables.prune_through(floor, &|bytes| {
                retention_ms == 0
                    || JournalRecord::decode(bytes)
                        .map(|r| past_retention(r.received_ms, now_ms, retention_ms))
                        .unwrap_or(true)
            })?;
        }
    }
    Ok(out)
}

/// Whether a group's commit of `offset` moves its cursor from `current`: forward, and only to
/// an offset the journal holds (below `next_offset`).
pub fn cursor_moves(current: u64, offset: u64, next_offset: u64) -> bool {
    offset > current && offset < next_offset
}

/// The highest offset every declared group has committed (the declared groups' `cursors`):
/// records at or below it may be pruned once past retention. `None` when no group is declared
/// (nothing is pruned: a group declared later would find nothing) or none has committed.
pub fn prune_floor(cursors: impl IntoIterator<Item = u64>) -> Option<u64> {
    cursors.into_iter().min().filter(|floor| *floor > 0)
}

/// Whether a record journaled at `received_ms` is past the retention period at `now_ms`
/// (always, with no retention).
pub fn past_retention(received_ms: u64, now_ms: u64, retention_ms: u64) -> bool {
    retention_ms == 0 || received_ms <= now_ms.saturating_sub(retention_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_the_slowest_declared_group_and_none_without_groups() {
        assert_eq!(prune_floor([5, 3, 9]), Some(3));
        assert_eq!(prune_floor([5, 0]), None);
        assert_eq!(prune_floor(Vec::<u64>::new()), None);
    }

    #[test]
    fn a_cursor_moves_forward_only_and_never_past_the_end() {
        assert!(cursor_moves(3, 4, 10));
        assert!(!cursor_moves(3, 3, 10));
        assert!(!cursor_moves(3, 2, 10));
        assert!(!cursor_moves(3, 10, 10));
    }

    #[test]
    fn retention_keeps_young_records() {
        assert!(past_retention(1_000, 1_000, 0));
        assert!(past_retention(1_000, 2_000, 1_000));
        assert!(!past_retention(1_001, 2_000, 1_000));
    }
}
