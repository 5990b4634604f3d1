//! The spool: the agent's durable copy of every accepted change until the relay acks it.
//!
//! # On disk
//! One folder: `spool.redb` (a redb database) and `LOCK` (an advisory lock held by the process
//! that has the spool open, holding its pid). Tables:
//!
//! | table | key | value |
//! |---|---|---|
//! | `records` | seq (u64) | version byte · postcard [`SpoolRecord`] (time accepted, send attempts, the encoded envelope) |
//! | `meta` | name | `next_seq`, `acked_seq`, `bytes`, `last_hlc` |
//! | `quarantine` | seq | the raw bytes of a record that could no longer be read |
//!
//! # Invariants
//! - Records are keyed by the agent's sequence number, gap-free from `acked_seq + 1` to
//!   `next_seq - 1`. A record that can no longer be read is moved to `quarantine` and replaced
//!   by a [`pwsync_proto::Op::Lost`] placeholder under the same seq, so the sequence stays
//!   gap-free and the relay's in-order journal is never blocked by it.
//! - [`Spool::append_durable`] writes a whole batch in one transaction and returns only after it
//!   is fsynced: one fsync per group of submits, never one per change. Either the whole batch is
//!   durable or none of it is, and `next_seq` moves only with a committed batch.
//! - Records are deleted only by [`Spool::remove_through`], which the forwarder calls on a relay
//!   ack whose signature verified. Nothing else deletes, and capacity never evicts: a full spool
//!   refuses new records.
//! - `bytes` counts the stored record values and is updated in the same transaction as them.
//! - Only one process has a spool open: the `LOCK` file's `flock` says which.

use pwsync_proto::codec;
use pwsync_proto::error::DecodeError;
use pwsync_proto::{Hlc, Seq};
use pwsync_runtime::{DirLock, LockError};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
const RECORD_VERSION: u8 = 1;
pub const DB_FILE: &str = "spool.redb";
/// redb's page cache for the spool (its default is 1 GiB). Records are written once, read once
/// by the forwarder and deleted, so a small cache costs little and keeps the agent small.
const CACHE_BYTES: usize = 4 << 20;

/// One spooled change, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpoolRecord {
    /// Wall-clock milliseconds when the agent accepted the change.
    pub accepted_ms: u64,
    /// How many times the forwarder has published it.
    pub attempts: u32,
    /// The encoded envelope, exactly as it is published.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

impl SpoolRecord {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_versioned("spool record", RECORD_VERSION, self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<SpoolRecord, DecodeError> {
        codec::decode_versioned("spool record", RECORD_VERSION, bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool {0}")]
    Lock(#[from] LockError),
    #[error("no spool at {0} (no {DB_FILE} there); check --spool or spool.dir in the config")]
    Missing(PathBuf),
    #[error("spool I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool storage error: {0}")]
    Storage(String),
    #[error("spool is full: {bytes} of {max} bytes used; the relay must take the backlog before new changes fit")]
    Full { bytes: u64, max: u64 },
}

fn storage(e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

#[derive(Debug, Clone, Copy, Default)]
struct State {
    next_seq: u64,
    acked_seq: u64,
    bytes: u64,
    count: u64,
    last_hlc: u64,
}

/// Counts and ages, for `status` and `spool stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpoolStats {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub next_seq: u64,
    pub acked_seq: u64,
    pub oldest_seq: Option<u64>,
    pub oldest_accepted_ms: Option<u64>,
    pub quarantined: u64,
}

/// One entry read back from the spool: its seq and the record, or why it cannot be read.
pub type SpoolEntry = (Seq, Result<SpoolRecord, DecodeError>);

pub struct Spool {
    db: Database,
    dir: PathBuf,
    max_bytes: u64,
    /// The figures as of the last commit; held only briefly, never across a transaction.
    state: Mutex<State>,
    /// Held for the whole of a write transaction, so writers take turns with a true `state`
    /// while readers of the figures never wait for an fsync.
    writing: Mutex<()>,
    _lock: DirLock,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spool({})", self.dir.display())
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` and takes its lock.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| SpoolError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Self::open_locked(dir, max_bytes)
    }

    /// Opens an existing spool for inspection; fails plainly if it is missing or in use.
    pub fn open_existing(dir: &Path) -> Result<Spool, SpoolError> {
        if !dir.join(DB_FILE).exists() {
            return Err(SpoolError::Missing(dir.to_path_buf()));
        }
        Self::open_locked(dir, u64::MAX)
    }

    fn open_locked(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        let lock = DirLock::acquire(dir, "agent")?;
        let db = pwsync_runtime::redb_file::open_or_create(&dir.join(DB_FILE), Some(CACHE_BYTES))
            .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => SpoolError::Lock(LockError::InUse {
                dir: dir.to_path_buf(),
                owner: "agent",
                pid: None,
            }),
            other => storage(other),
        })?;
        let txn = db.begin_write().map_err(storage)?;
        let state = {
            let records = txn.open_table(RECORDS).map_err(storage)?;
            let meta = txn.open_table(META).map_err(storage)?;
            txn.open_table(QUARANTINE).map_err(storage)?;
            let get = |k: &str| -> Result<u64, SpoolError> {
                Ok(meta
                    .get(k)
                    .map_err(storage)?
                    .map(|v| v.value())
                    .unwrap_or(0))
            };
            State {
                next_seq: get("next_seq")?.max(1),
                acked_seq: get("acked_seq")?,
                bytes: get("bytes")?,
                count: records.len().map_err(storage)?,
                last_hlc: get("last_hlc")?,
            }
        };
        txn.commit().map_err(storage)?;
        Ok(Spool {
            db,
            dir: dir.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
            writing: Mutex::new(()),
            _lock: lock,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The seq the next appended record must have.
    pub fn next_seq(&self) -> Seq {
        Seq(self.state().next_seq)
    }

    /// The highest seq the relay has acked (everything up to it is gone from the spool).
    pub fn acked_seq(&self) -> Seq {
        Seq(self.state().acked_seq)
    }

    /// The newest timestamp ever spooled: the agent's clock restarts above it.
    pub fn last_hlc(&self) -> Hlc {
        Hlc(self.state().last_hlc)
    }

    /// Bytes still free before the spool refuses records.
    pub fn free_bytes(&self) -> u64 {
        self.max_bytes.saturating_sub(self.state().bytes)
    }

    /// Appends records `next_seq, next_seq+1, …` in one transaction and fsyncs before returning.
    /// All or nothing: on error the spool is as it was.
    pub fn append_durable(
        &self,
        records: &[(Seq, Vec<u8>)],
        last_hlc: Hlc,
    ) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let _writing = self.writing();
        let state = *self.state();
        let added: u64 = records.iter().map(|(_, r)| r.len() as u64).sum();
        if state.bytes + added > self.max_bytes {
            return Err(SpoolError::Full {
                bytes: state.bytes,
                max: self.max_bytes,
            });
        }
        for (i, (seq, _)) in records.iter().enumerate() {
            if seq.0 != state.next_seq + i as u64 {
                return Err(SpoolError::Storage(format!(
                    "append out of sequence: got {seq}, expected {}",
                    state.next_seq + i as u64
                )));
            }
        }
        let next_seq = state.next_seq + records.len() as u64;
        let bytes = state.bytes + added;
        let last_hlc = last_hlc.0.max(state.last_hlc);
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut table = txn.open_table(RECORDS).map_err(storage)?;
            for (seq, record) in records {
                table.insert(seq.0, record.as_slice()).map_err(storage)?;
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("next_seq", next_seq).map_err(storage)?;
            meta.insert("bytes", bytes).map_err(storage)?;
            meta.insert("last_hlc", last_hlc).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        let mut state = self.state();
        state.next_seq = next_seq;
        state.bytes = bytes;
        state.count += records.len() as u64;
        state.last_hlc = last_hlc;
        Ok(())
    }

    /// Up to `limit` records from `from` on, in seq order. Unreadable records come back as
    /// errors in their place; they do not stop the read.
    pub fn read_from(&self, from: Seq, limit: usize) -> Result<Vec<SpoolEntry>, SpoolError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(RECORDS).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.range(from.0..).map_err(storage)?.take(limit) {
            let (k, v) = item.map_err(storage)?;
            out.push((Seq(k.value()), SpoolRecord::decode(v.value())));
        }
        Ok(out)
    }

    /// Deletes every record up to and including `seq` (the relay acked them) and fsyncs.
    /// Returns how many were deleted.
    pub fn remove_through(&self, seq: Seq) -> Result<u64, SpoolError> {
        let _writing = self.writing();
        let state = *self.state();
        if seq.0 <= state.acked_seq {
            return Ok(0);
        }
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        let (removed, freed) = {
            let mut table = txn.open_table(RECORDS).map_err(storage)?;
            let mut removed = 0u64;
            let mut freed = 0u64;
            let doomed = table
                .extract_from_if(..=seq.0, |_, _| true)
                .map_err(storage)?;
            for item in doomed {
                let (_, v) = item.map_err(storage)?;
                removed += 1;
                freed += v.value().len() as u64;
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert("acked_seq", seq.0).map_err(storage)?;
            meta.insert("bytes", state.bytes.saturating_sub(freed))
                .map_err(storage)?;
            (removed, freed)
        };
        txn.commit().map_err(storage)?;
        let mut state = self.state();
        state.acked_seq = seq.0;
        state.bytes = state.bytes.saturating_sub(freed);
        state.count = state.count.saturating_sub(removed);
        Ok(removed)
    }

    /// Counts one more publish of each record. Not fsynced on its own (it rides along with the
    /// next durable commit): losing an attempt count in a crash is harmless.
    pub fn note_attempts(&self, seqs: &[Seq]) -> Result<(), SpoolError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let _writing = self.writing();
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::None);
        {
            let mut table = txn.open_table(RECORDS).map_err(storage)?;
            for seq in seqs {
                let updated = match table.get(seq.0).map_err(storage)? {
                    Some(v) => match SpoolRecord::decode(v.value()) {
                        Ok(mut r) => {
                            r.attempts = r.attempts.saturating_add(1);
                            Some(r.encode())
                        }
                        Err(_) => None,
                    },
                    None => None,
                };
                if let Some(bytes) = updated {
                    table.insert(seq.0, bytes.as_slice()).map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)
    }

    /// Moves the unreadable record at `seq` to quarantine and puts `placeholder` in its place.
    pub fn quarantine(&self, seq: Seq, placeholder: &[u8]) -> Result<(), SpoolError> {
        let _writing = self.writing();
        let state = *self.state();
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        let delta = {
            let mut table = txn.open_table(RECORDS).map_err(storage)?;
            let old = match table.get(seq.0).map_err(storage)? {
                Some(v) => v.value().to_vec(),
                None => {
                    return Err(SpoolError::Storage(format!(
                        "no record {seq} to quarantine"
                    )))
                }
            };
            table.insert(seq.0, placeholder).map_err(storage)?;
            txn.open_table(QUARANTINE)
                .map_err(storage)?
                .insert(seq.0, old.as_slice())
                .map_err(storage)?;
            let bytes = state.bytes.saturating_sub(old.len() as u64) + placeholder.len() as u64;
            txn.open_table(META)
                .map_err(storage)?
                .insert("bytes", bytes)
                .map_err(storage)?;
            bytes
        };
        txn.commit().map_err(storage)?;
        self.state().bytes = delta;
        Ok(())
    }

    /// Seqs of quarantined records, oldest first.
    pub fn quarantined(&self) -> Result<Vec<Seq>, SpoolError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(QUARANTINE).map_err(storage)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(storage)? {
            out.push(Seq(item.map_err(storage)?.0.value()));
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let state = *self.state();
        let oldest = self.read_from(Seq(0), 1)?.into_iter().next();
        Ok(SpoolStats {
            records: state.count,
            bytes: state.bytes,
            max_bytes: self.max_bytes,
            next_seq: state.next_seq,
            acked_seq: state.acked_seq,
            oldest_seq: oldest.as_ref().map(|(s, _)| s.0),
            oldest_accepted_ms: oldest.and_then(|(_, r)| r.ok()).map(|r| r.accepted_ms),
            quarantined: self.quarantined()?.len() as u64,
        })
    }

    /// Overwrites the stored bytes of a record: for tests that simulate a damaged record.
    #[doc(hidden)]
    pub fn overwrite_raw_for_test(&self, seq: Seq, bytes: &[u8]) -> Result<(), SpoolError> {
        let _writing = self.writing();
        let txn = self.db.begin_write().map_err(storage)?;
        txn.open_table(RECORDS)
            .map_err(storage)?
            .insert(seq.0, bytes)
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(n: u8) -> Vec<u8> {
        SpoolRecord {
            accepted_ms: n as u64,
            attempts: 0,
            envelope: vec![n; 10],
        }
        .encode()
    }

    #[test]
    fn append_read_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 1 << 20).unwrap();
            assert_eq!(s.next_seq(), Seq(1));
            s.append_durable(&[(Seq(1), rec(1)), (Seq(2), rec(2))], Hlc(5))
                .unwrap();
            s.append_durable(&[(Seq(3), rec(3))], Hlc(6)).unwrap();
            assert!(s.append_durable(&[(Seq(9), rec(9))], Hlc(7)).is_err());
            assert_eq!(s.remove_through(Seq(1)).unwrap(), 1);
        }
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.next_seq(), Seq(4));
        assert_eq!(s.acked_seq(), Seq(1));
        assert_eq!(s.last_hlc(), Hlc(6));
        let all = s.read_from(Seq(0), 10).unwrap();
        assert_eq!(all.iter().map(|(s, _)| s.0).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(s.stats().unwrap().records, 2);
        assert_eq!(
            s.stats().unwrap().bytes,
            (rec(2).len() + rec(3).len()) as u64
        );
    }

    #[test]
    fn a_second_opener_is_told_the_spool_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _s = Spool::open(dir.path(), 1 << 20).unwrap();
        let err = Spool::open_existing(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by a running agent"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
    }

    #[test]
    fn full_spool_refuses_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let one = rec(1).len() as u64;
        let s = Spool::open(dir.path(), one * 2).unwrap();
        s.append_durable(&[(Seq(1), rec(1)), (Seq(2), rec(2))], Hlc(1))
            .unwrap();
        assert!(matches!(
            s.append_durable(&[(Seq(3), rec(3))], Hlc(2)),
            Err(SpoolError::Full { .. })
        ));
        assert_eq!(s.next_seq(), Seq(3));
        assert_eq!(s.read_from(Seq(0), 10).unwrap().len(), 2);
        s.remove_through(Seq(1)).unwrap();
        s.append_durable(&[(Seq(3), rec(3))], Hlc(2)).unwrap();
    }
}
