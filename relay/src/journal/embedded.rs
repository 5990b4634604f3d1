//! The embedded journal: one redb file in the relay's folder (the default store; see the
//! invariants in [`super`]).
//!
//! # On disk
//! One folder: `journal.redb` and `LOCK`. Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `records` | offset (u64) | version byte · postcard [`JournalRecord`] (time received, agent, seq, envelope) |
//! | `agent_seq` | agent id | highest seq journaled for that agent (contiguous from 1) |
//! | `cursors` | group name | highest offset the group has committed |
//! | `meta` | name | `next_offset`, `bytes` |
//!
//! [`EmbeddedJournal::apply`] writes a batch of envelopes, cursor moves and pruning in one
//! transaction, fsynced before it returns.

use super::rules::{self, JournalTables};
use super::Incoming;
use super::{storage, Applied, JournalEntry, JournalError, JournalRecord, JournalStats};
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{AgentId, GroupName, Offset};
use pwsync_runtime::DirLock;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::Mutex;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const AGENT_SEQ: TableDefinition<&str, u64> = TableDefinition::new("agent_seq");
const CURSORS: TableDefinition<&str, u64> = TableDefinition::new("cursors");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub const DB_FILE: &str = "journal.redb";
/// redb's page cache for the journal (its default is 1 GiB, which a long-running relay would
/// grow into). Records are read back mostly soon after they are written, while still cached.
const CACHE_BYTES: usize = 32 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct State {
    next_offset: u64,
    bytes: u64,
    count: u64,
}

pub struct EmbeddedJournal {
    db: Database,
    /// The figures as of the last commit; held only briefly, never across a transaction.
    state: Mutex<State>,
    /// Held for the whole of a write transaction, so writers take turns with a true `state`.
    writing: Mutex<()>,
    _lock: DirLock,
}

impl EmbeddedJournal {
    /// Opens (creating if needed) the journal in `dir` and takes its lock.
    pub fn open(dir: &Path) -> Result<EmbeddedJournal, JournalError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| JournalError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Self::open_locked(dir)
    }

    /// Opens an existing journal for the offline tools.
    pub fn open_existing(dir: &Path) -> Result<EmbeddedJournal, JournalError> {
        if !dir.join(DB_FILE).exists() {
            return Err(JournalError::Missing(dir.to_path_buf()));
        }
        Self::open_locked(dir)
    }

    fn open_locked(dir: &Path) -> Result<EmbeddedJournal, JournalError> {
        let lock = DirLock::acquire(dir, "relay")?;
        let db = pwsync_runtime::redb_file::open_or_create(&dir.join(DB_FILE), Some(CACHE_BYTES))
            .map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        let state = {
            let records = txn.open_table(RECORDS).map_err(storage)?;
            txn.open_table(AGENT_SEQ).map_err(storage)?;
            txn.open_table(CURSORS).map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            let get = |k: &str| -> Result<u64, JournalError> {
                Ok(meta
                    .get(k)
                    .map_err(storage)?
                    .map(|v| v.value())
                    .unwrap_or(0))
            };
            State {
                next_offset: get("next_offset")?.max(1),
                bytes: get("bytes")?,
                count: records.len().map_err(storage)?,
            }
        };
        txn.commit().map_err(storage)?;
        Ok(EmbeddedJournal {
            db,
            state: Mutex::new(state),
            writing: Mutex::new(()),
            _lock: lock,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The offset the next record will get (so the last is one below).
    pub fn next_offset(&self) -> Offset {
        Offset(self.state().next_offset)
    }

    /// Journals a batch of verified envelopes, moves group cursors for verified commits, and
    /// prunes what every declared group has committed (older than `retention_ms`): one
    /// transaction ([`rules::apply_batch`]), fsynced before returning.
    pub fn apply(
        &self,
        incoming: &[Incoming],
        commits: &[(GroupName, Offset)],
        declared: &[GroupName],
        retention_ms: u64,
    ) -> Result<Applied, JournalError> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let state = *self.state();
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        let (out, state) = {
            let mut tables = Tables {
                records: txn.open_table(RECORDS).map_err(storage)?,
                agent_seq: txn.open_table(AGENT_SEQ).map_err(storage)?,
                cursors: txn.open_table(CURSORS).map_err(storage)?,
                state,
            };
            let out = rules::apply_batch(
                &mut tables,
                incoming,
                commits,
                declared,
                retention_ms,
                wall_ms(),
            )?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("next_offset", tables.state.next_offset)
                .map_err(storage)?;
            meta.insert("bytes", tables.state.bytes).map_err(storage)?;
            (out, tables.state)
        };
        txn.commit().map_err(storage)?;
        *self.state() = state;
        Ok(out)
    }

    /// The group's committed offset (0 if it never committed).
    pub fn cursor(&self, group: &GroupName) -> Result<Offset, JournalError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(CURSORS).map_err(storage)?;
        Ok(Offset(
            t.get(group.as_str())
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(0),
        ))
    }

    /// Up to `limit` records from `from` on, in offset order.
    pub fn read_from(&self, from: Offset, limit: usize) -> Result<Vec<JournalEntry>, JournalError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(RECORDS).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.range(from.0..).map_err(storage)?.take(limit) {
            let (k, v) = item.map_err(storage)?;
            out.push((Offset(k.value()), JournalRecord::decode(v.value())));
        }
        Ok(out)
    }

    /// The lowest offset held, if any record is.
    pub fn first_offset(&self) -> Result<Option<Offset>, JournalError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let records = txn.open_table(RECORDS).map_err(storage)?;
        let first = records
            .first()
            .map_err(storage)?
            .map(|(k, _)| Offset(k.value()));
        Ok(first)
    }

    pub fn stats(&self) -> Result<JournalStats, JournalError> {
        let state = *self.state();
        let txn = self.db.begin_read().map_err(storage)?;
        let records = txn.open_table(RECORDS).map_err(storage)?;
        let first = records.first().map_err(storage)?.map(|(k, _)| k.value());
        Ok(JournalStats {
            records: state.count,
            bytes: state.bytes,
            first_offset: first,
            next_offset: state.next_offset,
        })
    }

    /// Every agent with journaled envelopes, and the highest seq journaled for it.
    pub fn agents(&self) -> Result<BTreeMap<String, u64>, JournalError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let mut agents = BTreeMap::new();
        for item in txn
            .open_table(AGENT_SEQ)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            let (k, v) = item.map_err(storage)?;
            agents.insert(k.value().to_string(), v.value());
        }
        Ok(agents)
    }
}

/// One write transaction's tables, as [`rules::apply_batch`] reads and writes them, with the
/// figures the transaction moves.
struct Tables<'t> {
    records: redb::Table<'t, u64, &'static [u8]>,
    agent_seq: redb::Table<'t, &'static str, u64>,
    cursors: redb::Table<'t, &'static str, u64>,
    state: State,
}

impl JournalTables for Tables<'_> {
    fn agent_seq(&self, agent: &AgentId) -> Result<u64, JournalError> {
        Ok(self
            .agent_seq
            .get(agent.as_str())
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0))
    }
    fn set_agent_seq(&mut self, agent: &AgentId, seq: u64) -> Result<(), JournalError> {
        self.agent_seq
            .insert(agent.as_str(), seq)
            .map_err(storage)?;
        Ok(())
    }
    fn next_offset(&self) -> u64 {
        self.state.next_offset
    }
    fn append(&mut self, record: &[u8]) -> Result<(), JournalError> {
        self.records
            .insert(self.state.next_offset, record)
            .map_err(storage)?;
        self.state.bytes += record.len() as u64;
        self.state.count += 1;
        self.state.next_offset += 1;
        Ok(())
    }
    fn cursor(&self, group: &GroupName) -> Result<u64, JournalError> {
        Ok(self
            .cursors
            .get(group.as_str())
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0))
    }
    fn set_cursor(&mut self, group: &GroupName, offset: u64) -> Result<(), JournalError> {
        self.cursors
            .insert(group.as_str(), offset)
            .map_err(storage)?;
        Ok(())
    }
    fn prune_through(
        &mut self,
        through: u64,
        doomed: &dyn Fn(&[u8]) -> bool,
    ) -> Result<u64, JournalError> {
        let mut pruned = 0;
        for item in self
            .records
            .extract_from_if(..=through, |_, v| doomed(v))
            .map_err(storage)?
        {
            let (_, v) = item.map_err(storage)?;
            self.state.bytes = self.state.bytes.saturating_sub(v.value().len() as u64);
            self.state.count = self.state.count.saturating_sub(1);
            pruned += 1;
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::super::Intake;
    use super::*;
    use pwsync_proto::hlc::Hlc;
    use pwsync_proto::Seq;

    fn inc(agent: &str, seq: u64) -> Incoming {
        Incoming {
            agent: AgentId::new(agent).unwrap(),
            seq: Seq(seq),
            hlc: Hlc::default(),
            envelope: vec![seq as u8; 8],
        }
    }

    #[test]
    fn in_order_per_agent_duplicates_once_gaps_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let j = EmbeddedJournal::open(dir.path()).unwrap();
        let a = j
            .apply(
                &[
                    inc("a", 1),
                    inc("a", 2),
                    inc("a", 2),
                    inc("b", 1),
                    inc("a", 4),
                ],
                &[],
                &[],
                0,
            )
            .unwrap();
        assert_eq!(
            a.intake,
            vec![
                Intake::Appended(Offset(1)),
                Intake::Appended(Offset(2)),
                Intake::Duplicate,
                Intake::Appended(Offset(3)),
                Intake::OutOfOrder { expected: Seq(3) }
            ]
        );
        assert_eq!(a.ack[&AgentId::new("a").unwrap()], Seq(2));
        assert_eq!(a.ack[&AgentId::new("b").unwrap()], Seq(1));
        drop(j);
        let j = EmbeddedJournal::open(dir.path()).unwrap();
        let a = j.apply(&[inc("a", 2), inc("a", 3)], &[], &[], 0).unwrap();
        assert_eq!(
            a.intake,
            vec![Intake::Duplicate, Intake::Appended(Offset(4))]
        );
        assert_eq!(j.stats().unwrap().records, 4);
    }

    #[test]
    fn pruned_only_when_every_declared_group_committed() {
        let dir = tempfile::tempdir().unwrap();
        let j = EmbeddedJournal::open(dir.path()).unwrap();
        let (g1, g2) = (GroupName::new("g1").unwrap(), GroupName::new("g2").unwrap());
        let groups = [g1.clone(), g2.clone()];
        j.apply(&[inc("a", 1), inc("a", 2), inc("a", 3)], &[], &groups, 0)
            .unwrap();
        let r = j
            .apply(&[], &[(g1.clone(), Offset(3))], &groups, 0)
            .unwrap();
        assert_eq!(r.pruned, 0);
        assert_eq!(j.stats().unwrap().records, 3);
        // A commit beyond the journal's end does not move the cursor.
        let r = j
            .apply(&[], &[(g2.clone(), Offset(99))], &groups, 0)
            .unwrap();
        assert!(r.advanced.is_empty());
        let r = j
            .apply(&[], &[(g2.clone(), Offset(2))], &groups, 0)
            .unwrap();
        assert_eq!(r.pruned, 2);
        assert_eq!(j.stats().unwrap().records, 1);
        assert_eq!(j.cursor(&g1).unwrap(), Offset(3));
        assert_eq!(j.cursor(&g2).unwrap(), Offset(2));
    }
}
