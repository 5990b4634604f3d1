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

use redb::{Database, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

const FORWARDED: TableDefinition<&str, &[u8]> = TableDefinition::new("forwarded");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub struct Gate {
    db: Database,
    path: PathBuf,
    key: aws_lc_rs::hmac::Key,
    interval_ms: u64,
}

impl Gate {
    /// Opens (or creates) the gate in `dir`; at most one backfill per user per `interval_ms`.
    pub fn open(dir: &Path, interval_ms: u64) -> Result<Gate, String> {
        let path = dir.join("backfill.redb");
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        let db = pwsync_runtime::redb_file::open_or_create(&path, None).map_err(|e| err(&e))?;
        let txn = db.begin_write().map_err(|e| err(&e))?;
        let secret = {
            txn.open_table(FORWARDED).map_err(|e| err(&e))?;
            let mut meta = txn.open_table(META).map_err(|e| err(&e))?;
            let stored = meta
                .get("hmac")
                .map_err(|e| err(&e))?
                .map(|v| Zeroizing::new(v.value().to_vec()));
            match stored {
                Some(s) => s,
                None => {
                    let mut s = Zeroizing::new(vec![0u8; 32]);
                    aws_lc_rs::rand::fill(&mut s[..]).map_err(|e| err(&e))?;
                    meta.insert("hmac", &s[..]).map_err(|e| err(&e))?;
                    s
                }
            }
        };
        txn.commit().map_err(|e| err(&e))?;
        Ok(Gate {
            db,
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret),
            path,
            interval_ms,
        })
    }

    /// The keyed fingerprint of `user`'s `password` (never the password).
    pub fn fingerprint(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut ctx = aws_lc_rs::hmac::Context::with_key(&self.key);
        ctx.update(user.as_bytes());
        ctx.update(&[0]);
        ctx.update(password);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    fn last(&self, user: &str) -> Result<Option<([u8; 32], u64)>, String> {
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", self.path.display());
        let txn = self.db.begin_read().map_err(|e| err(&e))?;
        let t = txn.open_table(FORWARDED).map_err(|e| err(&e))?;
        let v = t.get(user).map_err(|e| err(&e))?;
        Ok(v.and_then(|v| {
            let b = v.value();
            let fp = <[u8; 32]>::try_from(b.get(..32)?).ok()?;
            let at = u64::from_le_bytes(<[u8; 8]>::try_from(b.get(32..40)?).ok()?);
            Some((fp, at))
        }))
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
        let err = |e: &dyn std::fmt::Display| format!("{}: {e}", self.path.display());
        let at = if backfill {
            now_ms
        } else {
            self.last(user)?.map_or(0, |(_, at)| at)
        };
        let mut v = self.fingerprint(user, password).to_vec();
        v.extend_from_slice(&at.to_le_bytes());
        let mut txn = self.db.begin_write().map_err(|e| err(&e))?;
        // Not waited for on disk: a record lost in a crash costs at most one backfill again,
        // which consumers judge as any other; every change stays one fsync (the spool's).
        txn.set_durability(redb::Durability::Eventual);
        txn.open_table(FORWARDED)
            .map_err(|e| err(&e))?
            .insert(user, v.as_slice())
            .map_err(|e| err(&e))?;
        txn.commit().map_err(|e| err(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
