//! The backfill gate: what this agent forwarded last for each user, as a keyed fingerprint, and
//! whether a backfill (a password seen at a successful login, marked with
//! [`pwsync_proto::change::BACKFILL_ATTRIBUTE`]) is news.
//!
//! Kept in `SPOOL_DIR/backfill.redb` (mode 0600): per user the HMAC-SHA256 of the password last
//! forwarded (under a random key made with the file, never the password) and the time of the
//! last backfill. A backfill passes only when its password is not the one last forwarded for
//! that user and no backfill went for them within the interval; every forwarded replace or add
//! records its password's fingerprint, so a login with a password pwsync carried already is no
//! news. Consumers decide the rest (a backfill never overrides: `consumer/src/decide.rs`).
//!
//! Records are written behind: held in memory (and read from there) and written in one
//! transaction per [`FLUSH_EVERY`] records or [`FLUSH_AFTER`], and when the gate is dropped.
//! One redb transaction per submit had cut the agent's durable submits from ~10,900/s to
//! ~2,500/s (`pwsync-bench spool`). A record lost in a crash costs at most one backfill
//! again, which consumers judge as any other; every change stays one fsync (the spool's).

use pwsync_runtime::fingerprint::FingerprintKey;
use redb::{Database, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one backfill per user within this many seconds, unless configured otherwise
/// (`backfill_interval_secs`, in the agent's config and in `[ldap_sock]`).
pub const DEFAULT_INTERVAL_SECS: u64 = 3600;

/// Records held before they are written.
const FLUSH_EVERY: usize = 256;
/// Longest a record is held before it is written (at the next record).
const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// Records not yet written: user → fingerprint · time of the last backfill.
struct Pending {
    records: BTreeMap<String, Vec<u8>>,
    since: Instant,
}

const FORWARDED: TableDefinition<&str, &[u8]> = TableDefinition::new("forwarded");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub struct Gate {
    db: Database,
    path: PathBuf,
    key: FingerprintKey,
    interval_ms: u64,
    pending: Mutex<Pending>,
}

impl Gate {
    /// Opens (or creates) the gate in `dir`; at most one backfill per user per `interval_ms`.
    pub fn open(dir: &Path, interval_ms: u64) -> Result<Gate, String> {
        let path = dir.join("backfill.redb");
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let db = pwsync_runtime::redb_file::open_or_create(&path, None).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let key = {
            txn.open_table(FORWARDED).map_err(|e| err(&e))?;
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            FingerprintKey::load_or_create(&mut meta).map_err(|e| err(&e))?
        };
        txn.commit().map_err(|e| err(&e))?;
        Ok(Gate {
            db,
            key,
            path,
            interval_ms,
            pending: Mutex::new(Pending {
                records: BTreeMap::new(),
                since: Instant::now(),
            }),
        })
    }

    /// The keyed fingerprint of `user`'s `password` (never the password).
    pub fn fingerprint(&self, user: &str, password: &[u8]) -> [u8; 32] {
        self.key.of_password(user, password)
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn last(&self, user: &str) -> Result<Option<([u8; 32], u64)>, String> {
        let parse = |b: &[u8]| {
            let fp = <[u8; 32]>::try_from(b.get(..32)?).ok()?;
            let at = u64::from_le_bytes(<[u8; 8]>::try_from(b.get(32..40)?).ok()?);
            Some((fp, at))
        };
        if let Some(held) = self.pending().records.get(user) {
            return Ok(parse(held));
        }
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", self.path.display());
        let txn = self.db.begin_read().map_err(|e| err(&e))?;
        let t = txn.open_table(FORWARDED).map_err(|e| err(&e))?;
        let v = t.get(user).map_err(|e| err(&e))?;
        Ok(v.and_then(|v| parse(v.value())))
    }

    /// Writes the records held (one transaction, not waited for on disk).
    pub fn flush(&self) -> Result<(), String> {
        let records = {
            let mut p = self.pending();
            p.since = Instant::now();
            std::mem::take(&mut p.records)
        };
        if records.is_empty() {
            return Ok(());
        }
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", self.path.display());
        let mut txn = self.db.begin_write().map_err(|e| err(&e))?;
        txn.set_durability(redb::Durability::Eventual);
        {
            let mut t = txn.open_table(FORWARDED).map_err(|e| err(&e))?;
            for (user, v) in &records {
                t.insert(user.as_str(), v.as_slice()).map_err(|e| err(&e))?;
            }
        }
        txn.commit().map_err(|e| err(&e))
    }

    /// `None` when a backfill of `password` for `user` is news at `now_ms`; else why not.
    pub fn refuses(&self, user: &str, password: &[u8], now_ms: u64) -> Option<String> {
        match self.last(user) {
            Ok(Some((fp, _))) if fp == self.fingerprint(user, password) => {
                Some("backfill: the password is the one pwsync forwarded last for this user".into())
            }
            Ok(Some((_, at))) if at > 0 && now_ms.saturating_sub(at) < self.interval_ms => {
                Some("backfill: one was sent for this user lately (rate limit)".into())
            }
            Ok(_) => None,
            Err(e) => Some(format!("backfill: the gate cannot be read: {e}")),
        }
    }

    /// Records that `password` was forwarded for `user` (`backfill`: as a backfill, at `now_ms`).
    pub fn record(
        &self,
        user: &str,
        password: &[u8],
        backfill: bool,
        now_ms: u64,
    ) -> Result<(), String> {
        let at = if backfill {
            now_ms
        } else {
            self.last(user)?.map_or(0, |(_, at)| at)
        };
        let mut v = self.fingerprint(user, password).to_vec();
        v.extend_from_slice(&at.to_le_bytes());
        let due = {
            let mut p = self.pending();
            p.records.insert(user.to_string(), v);
            p.records.len() >= FLUSH_EVERY || p.since.elapsed() >= FLUSH_AFTER
        };
        if due {
            self.flush()?;
        }
        Ok(())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(error = %e, "the backfill gate's last records were not written");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_held_in_memory_are_written_at_drop_and_at_the_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let g = Gate::open(dir.path(), 1000).unwrap();
        g.record("u", b"p1", false, 10).unwrap();
        assert!(g.refuses("u", b"p1", 20).is_some(), "read from memory");
        drop(g);
        let g = Gate::open(dir.path(), 1000).unwrap();
        assert!(g.refuses("u", b"p1", 20).is_some(), "written when dropped");
        for i in 0..FLUSH_EVERY {
            g.record(&format!("v{i}"), b"p", false, 10).unwrap();
        }
        assert!(g.pending().records.is_empty(), "written at the threshold");
        drop(g);
        let g = Gate::open(dir.path(), 1000).unwrap();
        assert!(g.refuses("v0", b"p", 20).is_some());
    }

    #[test]
    fn a_backfill_passes_once_per_password_and_interval() {
        let dir = tempfile::tempdir().unwrap();
        let g = Gate::open(dir.path(), 1000).unwrap();
        assert!(g.refuses("u", b"p1", 10).is_none());
        g.record("u", b"p1", true, 10).unwrap();
        assert!(g
            .refuses("u", b"p1", 5000)
            .unwrap()
            .contains("forwarded last"));
        assert!(g.refuses("u", b"p2", 500).unwrap().contains("rate limit"));
        assert!(g.refuses("u", b"p2", 2000).is_none());
        // A real change's password is no news either, and does not start the interval.
        g.record("v", b"real", false, 10).unwrap();
        assert!(g.refuses("v", b"real", 20).is_some());
        assert!(g.refuses("v", b"other", 20).is_none());
        // The key stays with the file.
        drop(g);
        let g = Gate::open(dir.path(), 1000).unwrap();
        assert!(g.refuses("u", b"p1", 9000).is_some());
    }
}
