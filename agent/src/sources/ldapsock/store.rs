//! The pending store: captured changes waiting for slapd's result and for the agent, kept
//! across a crash, and never readable longer than they are needed.
//!
//! Layout: `STATE_DIR/ldap-pending.redb` (mode 0600), one table `pending`: a `u64` key (one
//! more than the last) → a sealed record: a 12-byte random nonce, then AES-256-GCM of the
//! postcard-encoded [`Pending`] under the store key, with the record's key as associated data.
//! The store key is `STATE_DIR/ldap-pending.key` (32 random bytes, mode 0600, replaced whole).
//!
//! Invariants:
//! - A record is committed (fsynced) before [`PendingStore::add`] returns; slapd is told to go
//!   on only after that.
//! - A key is never used twice (table `meta`, `next`: a counter kept with the records, that only
//!   grows), so a decision taken on an older reading of the store can only ever touch the change
//!   it was about; [`PendingStore::update`] writes only a record still there.
//! - **No cleartext at rest.** Every record is sealed, so the file and its freed pages hold no
//!   password. Whenever the store becomes empty the key is replaced by a new one, so what a
//!   removed record left in freed pages cannot be opened by anyone who later reads the folder:
//!   a password outlives its decision only while another change is still pending.
//! - A record that does not open or decode is reported and left in place, never guessed at.

use super::SockError;
use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use pwsync_proto::{Op, Secret};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// `next`: the key the next record gets (keys are never used twice).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// One pwsync operation of a captured change.
#[derive(Serialize, Deserialize)]
pub struct PendingOp {
    pub op: Op,
    pub values: Vec<Secret>,
    pub previous: Option<Secret>,
}

/// A captured change waiting for slapd's result, then for the agent.
#[derive(Serialize, Deserialize)]
pub struct Pending {
    pub connid: u64,
    pub msgid: u64,
    pub at_ms: u64,
    /// The entry's DN as the directory stores it.
    pub dn: String,
    /// The account: the user name the stored DN maps to.
    pub user: String,
    /// The operations that carry it, in order.
    pub ops: Vec<PendingOp>,
    /// How many of `ops` the agent has taken (they are handed over in order).
    pub forwarded: usize,
    /// slapd's result (or the directory, when settled) said it was applied; it waits only for
    /// the agent.
    pub confirmed: bool,
}

pub struct PendingStore {
    db: Database,
    path: PathBuf,
    key_path: PathBuf,
    /// The store key; held while a record is sealed and written, and while the key is
    /// replaced, so no record is ever written under a key about to go.
    key: Mutex<LessSafeKey>,
}

fn random<const N: usize>() -> Result<Zeroizing<[u8; N]>, String> {
    let mut b = Zeroizing::new([0u8; N]);
    aws_lc_rs::rand::fill(&mut b[..])
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(b)
}

fn less_safe_key(bytes: &[u8]) -> Result<LessSafeKey, String> {
    UnboundKey::new(&AES_256_GCM, bytes)
        .map(LessSafeKey::new)
        .map_err(|_| "the pending store's key is not 32 bytes".to_string())
}

impl PendingStore {
    pub fn open(dir: &Path) -> Result<PendingStore, SockError> {
        let path = dir.join("ldap-pending.redb");
        let key_path = dir.join("ldap-pending.key");
        let err = |message: String| SockError::Store {
            path: path.clone(),
            message,
        };
        let db = pwsync_runtime::redb_file::open_or_create(&path, None)
            .map_err(|e| err(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| err(e.to_string()))?;
        let empty = {
            let t = txn.open_table(PENDING).map_err(|e| err(e.to_string()))?;
            t.len().map_err(|e| err(e.to_string()))? == 0
        };
        txn.commit().map_err(|e| err(e.to_string()))?;
        let (key, legacy) = match std::fs::read(&key_path) {
            Ok(bytes) if !empty => {
                pwsync_proto::keys::check_private_mode(&key_path)
                    .map_err(|e| err(e.to_string()))?;
                (less_safe_key(&Zeroizing::new(bytes)).map_err(err)?, false)
            }
            // Records and no key: a store written before records were sealed.
            Err(e) if !empty && e.kind() == std::io::ErrorKind::NotFound => {
                (new_key(&key_path).map_err(err)?, true)
            }
            Err(e) if !empty => {
                return Err(err(format!(
                    "changes are pending but their key {} cannot be read: {e}",
                    key_path.display()
                )))
            }
            _ => (new_key(&key_path).map_err(err)?, false),
        };
        let store = PendingStore {
            db,
            path,
            key_path,
            key: Mutex::new(key),
        };
        if legacy {
            store.seal_legacy_records()?;
        }
        Ok(store)
    }

    /// Seals, in place, the records of a store written before records were sealed (one
    /// operation each, in clear); one that does not decode is left and reported.
    fn seal_legacy_records(&self) -> Result<(), SockError> {
        #[derive(Deserialize)]
        struct Legacy {
            connid: u64,
            msgid: u64,
            at_ms: u64,
            dn: String,
            user: String,
            op: Op,
            values: Vec<Secret>,
            previous: Option<Secret>,
            confirmed: bool,
        }
        let key = self.lock();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let mut rows = vec![];
            for row in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                rows.push((k.value(), Zeroizing::new(v.value().to_vec())));
            }
            for (at, bytes) in rows {
                let Ok(l) = postcard::from_bytes::<Legacy>(&bytes) else {
                    tracing::error!(key = at, "a pending change of an earlier version that does not decode: left in the store");
                    continue;
                };
                let p = Pending {
                    connid: l.connid,
                    msgid: l.msgid,
                    at_ms: l.at_ms,
                    dn: l.dn,
                    user: l.user,
                    ops: vec![PendingOp {
                        op: l.op,
                        values: l.values,
                        previous: l.previous,
                    }],
                    forwarded: 0,
                    confirmed: l.confirmed,
                };
                let sealed = self.seal(&key, at, &p)?;
                t.insert(at, sealed.as_slice()).map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    fn err(&self, e: impl std::fmt::Display) -> SockError {
        SockError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn seal(&self, key: &LessSafeKey, at: u64, p: &Pending) -> Result<Vec<u8>, SockError> {
        let mut bytes = Zeroizing::new(postcard::to_allocvec(p).map_err(|e| self.err(e))?);
        let nonce = random::<12>().map_err(|e| self.err(e))?;
        let mut sealed = nonce.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(at.to_be_bytes()),
            &mut *bytes,
        )
        .map_err(|_| self.err("sealing a pending change failed"))?;
        sealed.extend_from_slice(&bytes);
        Ok(sealed)
    }

    fn open_record(&self, key: &LessSafeKey, at: u64, sealed: &[u8]) -> Result<Pending, String> {
        if sealed.len() < 12 + 16 {
            return Err("shorter than a sealed record".into());
        }
        let (nonce, body) = sealed.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "a bad nonce")?;
        let mut body = Zeroizing::new(body.to_vec());
        let plain = key
            .open_in_place(nonce, Aad::from(at.to_be_bytes()), &mut body)
            .map_err(|_| "does not open with the store's key".to_string())?;
        postcard::from_bytes(plain).map_err(|e| format!("does not decode: {e}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LessSafeKey> {
        self.key.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `p` (fsynced); returns its key.
    pub fn add(&self, p: &Pending) -> Result<u64, SockError> {
        let key = self.lock();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let at = {
            let mut t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let after_last = t
                .last()
                .map_err(|e| self.err(e))?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            let next = meta
                .get("next")
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(1);
            let at = after_last.max(next);
            let sealed = self.seal(&key, at, p)?;
            t.insert(at, sealed.as_slice()).map_err(|e| self.err(e))?;
            meta.insert("next", at + 1).map_err(|e| self.err(e))?;
            at
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(at)
    }

    /// Every record that opens, in order (those that do not are logged and left).
    pub fn all(&self) -> Result<Vec<(u64, Pending)>, SockError> {
        let key = self.lock();
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        let mut out = vec![];
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match self.open_record(&key, k.value(), v.value()) {
                Ok(p) => out.push((k.value(), p)),
                Err(e) => {
                    tracing::error!(key = k.value(), error = %e, "a pending change that cannot be read: left in the store")
                }
            }
        }
        Ok(out)
    }

    pub fn get(&self, at: u64) -> Result<Option<Pending>, SockError> {
        let key = self.lock();
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        let v = t.get(at).map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| self.open_record(&key, at, v.value()).ok()))
    }

    /// Writes `p` again under `at` (a confirmation, a step forwarded), only while a record is
    /// there: one removed meanwhile (decided by another thread) is not brought back. Whether it
    /// was written.
    pub fn update(&self, at: u64, p: &Pending) -> Result<bool, SockError> {
        let key = self.lock();
        let sealed = self.seal(&key, at, p)?;
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let there = {
            let mut t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let there = t.get(at).map_err(|e| self.err(e))?.is_some();
            if there {
                t.insert(at, sealed.as_slice()).map_err(|e| self.err(e))?;
            }
            there
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(there)
    }

    /// Marks the record `at` confirmed, read and written in one transaction (what else it
    /// holds, such as the operations forwarded, is kept). Whether it was there unconfirmed.
    pub fn confirm(&self, at: u64) -> Result<bool, SockError> {
        let key = self.lock();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let confirmed = {
            let mut t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let current = match t.get(at).map_err(|e| self.err(e))? {
                Some(v) => self.open_record(&key, at, v.value()).ok(),
                None => None,
            };
            match current {
                Some(mut p) if !p.confirmed => {
                    p.confirmed = true;
                    let sealed = self.seal(&key, at, &p)?;
                    t.insert(at, sealed.as_slice()).map_err(|e| self.err(e))?;
                    true
                }
                _ => false,
            }
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(confirmed)
    }

    /// Removes the record `at` (only while it is unconfirmed, with `unconfirmed_only`: a
    /// change confirmed meanwhile by another thread is forwarded, not dropped); when the store
    /// is then empty, replaces the key. Whether it was removed.
    fn remove_where(&self, at: u64, unconfirmed_only: bool) -> Result<bool, SockError> {
        let mut key = self.lock();
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let (removed, empty) = {
            let mut t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let confirmed = match t.get(at).map_err(|e| self.err(e))? {
                Some(v) => self
                    .open_record(&key, at, v.value())
                    .map(|p| p.confirmed)
                    .unwrap_or(false),
                None => false,
            };
            let removed = if unconfirmed_only && confirmed {
                false
            } else {
                t.remove(at).map_err(|e| self.err(e))?.is_some()
            };
            (removed, t.len().map_err(|e| self.err(e))? == 0)
        };
        txn.commit().map_err(|e| self.err(e))?;
        if empty {
            *key = new_key(&self.key_path).map_err(|e| self.err(e))?;
        }
        Ok(removed)
    }

    /// Removes the record `at` (a change forwarded whole).
    pub fn remove(&self, at: u64) -> Result<bool, SockError> {
        self.remove_where(at, false)
    }

    /// Removes the record `at` unless it was confirmed meanwhile (a change slapd refused, or
    /// settled as not applied).
    pub fn remove_unconfirmed(&self, at: u64) -> Result<bool, SockError> {
        self.remove_where(at, true)
    }
}

/// Makes a new random key at `path` (0600, replaced whole and fsynced).
fn new_key(path: &Path) -> Result<LessSafeKey, String> {
    let bytes = random::<32>()?;
    pwsync_runtime::replace_private_durable(path, &bytes[..])
        .map_err(|e| format!("writing the pending store's key {}: {e}", path.display()))?;
    less_safe_key(&bytes[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(pw: &str) -> Pending {
        Pending {
            connid: 1,
            msgid: 2,
            at_ms: 3,
            dn: "uid=a,dc=x".into(),
            user: "a".into(),
            ops: vec![PendingOp {
                op: Op::Replace,
                values: vec![Secret::new(pw.as_bytes().to_vec())],
                previous: None,
            }],
            forwarded: 0,
            confirmed: false,
        }
    }

    fn file_holds(dir: &Path, needle: &[u8]) -> bool {
        let bytes = std::fs::read(dir.join("ldap-pending.redb")).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn records_are_sealed_kept_across_a_reopen_and_unreadable_once_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = PendingStore::open(dir.path()).unwrap();
        let a = s.add(&pending("Pending-Secret-AAA")).unwrap();
        let b = s.add(&pending("Pending-Secret-BBB")).unwrap();
        assert!(!file_holds(dir.path(), b"Pending-Secret-AAA"));
        drop(s);
        let s = PendingStore::open(dir.path()).unwrap();
        let all = s.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].1.ops[0].values[0].expose(), b"Pending-Secret-AAA");
        let old_key = std::fs::read(dir.path().join("ldap-pending.key")).unwrap();
        s.remove(a).unwrap();
        // Another change still pending: the key stays.
        assert_eq!(
            std::fs::read(dir.path().join("ldap-pending.key")).unwrap(),
            old_key
        );
        s.remove(b).unwrap();
        // Empty: a new key, so nothing left in the file's free pages opens any more.
        assert_ne!(
            std::fs::read(dir.path().join("ldap-pending.key")).unwrap(),
            old_key
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ldap-pending.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(s.all().unwrap().is_empty());
        // Keys are not used again, and a removed record is not brought back by an update.
        let c = s.add(&pending("Pending-Secret-CCC")).unwrap();
        assert!(c > b, "key {c} after {b}");
        assert!(!s.update(a, &pending("stale")).unwrap());
        assert!(s.update(c, &pending("Pending-Secret-DDD")).unwrap());
        assert_eq!(s.all().unwrap().len(), 1);
        // Confirmed once; then no longer removed as unconfirmed.
        assert!(s.confirm(c).unwrap());
        assert!(!s.confirm(c).unwrap());
        assert!(!s.remove_unconfirmed(c).unwrap());
        assert!(s.all().unwrap()[0].1.confirmed);
    }

    #[test]
    fn a_store_of_the_unsealed_version_is_sealed_in_place_and_read() {
        #[derive(Serialize)]
        struct Legacy<'a> {
            connid: u64,
            msgid: u64,
            at_ms: u64,
            dn: &'a str,
            user: &'a str,
            op: Op,
            values: Vec<Secret>,
            previous: Option<Secret>,
            confirmed: bool,
        }
        let dir = tempfile::tempdir().unwrap();
        {
            let path = dir.path().join("ldap-pending.redb");
            let db = pwsync_runtime::redb_file::open_or_create(&path, None).unwrap();
            let txn = db.begin_write().unwrap();
            let old = postcard::to_allocvec(&Legacy {
                connid: 1,
                msgid: 2,
                at_ms: 3,
                dn: "uid=a,dc=x",
                user: "a",
                op: Op::Replace,
                values: vec![Secret::from("Legacy-pw-1")],
                previous: None,
                confirmed: true,
            })
            .unwrap();
            txn.open_table(PENDING)
                .unwrap()
                .insert(7, old.as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let s = PendingStore::open(dir.path()).unwrap();
        let all = s.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, 7);
        assert_eq!(all[0].1.ops[0].values[0].expose(), b"Legacy-pw-1");
        assert!(all[0].1.confirmed);
    }

    #[test]
    fn a_record_sealed_under_another_key_is_left_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let s = PendingStore::open(dir.path()).unwrap();
        s.add(&pending("x")).unwrap();
        drop(s);
        let other = random::<32>().unwrap();
        std::fs::write(dir.path().join("ldap-pending.key"), &other[..]).unwrap();
        let s = PendingStore::open(dir.path()).unwrap();
        assert!(s.all().unwrap().is_empty());
    }
}
