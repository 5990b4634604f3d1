//! The consumer's durable state, in one redb database (`state.redb` in the state folder).
//!
//! | table | key | value | why |
//! |---|---|---|---|
//! | `meta` | name | `committed` offset, `next_id` | where the group stands |
//! | `seen` | agent | highest seq processed | drop replays (G2) |
//! | `user_hlc` | user | newest HLC of a password op (replace, add, delete) | an older one never wins (G3) |
//! | `account` | user | newest HLC of an account op, and the [`AccountState`] it left | an older revoke or resume never wins; a revoke holds through replaces; remove is final |
//! | `fingerprint` | user | HMAC of the values of the newest op, if it was a replace | drop echoes (G6); any other op clears it, so a real change is never taken for an echo |
//! | `owner` | target · NUL · account as that target folds names | the source user whose change first applied there | two source users one target takes for one account never overwrite each other (read on demand, not held in memory) |
//! | `written` | target · NUL · user | when pwsync last applied a change of that user there (ms) | a change made on that system itself is applied there too if pwsync wrote an older one since ([`crate::decide::restore_at_origin`]) (read on demand) |
//! | `newest_at` | target · NUL · user · NUL · `password` or `account` | the [`OrderKey`] (capture time, journal offset) of the newest change of that kind pwsync wrote there, 16 bytes big-endian; `newest` (the agent's HLC alone, of earlier builds) is read where it has none | a retry, or a dead letter retried by an operator, never overwrites a newer change ([`State::newest_applied`]; read on demand) |
//! | `value_tail` | user | [`ValueTail`]: the user's adds and deletes after their newest replace, each its place and its envelope (still encrypted); a row only while the newest value op is an add or delete | a value op captured before them but after the replace is put in its place and they are applied again after it ([`crate::decide`]); read on demand, the users with a row held in memory |
//! | `audit_mark` | target · NUL · user | [`WriteMark`]: when pwsync last wrote a password there, and the target's own record right after (its change time; a keyed fingerprint of the stored hash, or a key version) | the account audit ([`crate::audit`]) tells pwsync's write from a change made outside it (read on demand) |
//! | `retry` | id | [`RetryEntry`] (the envelope, still encrypted) | per-target retry queues |
//! | `dead` | id | [`DeadLetter`] (the envelope, still encrypted) | for the operator |
//! | `secret` | `hmac` | 32 random bytes | the fingerprint key, local to this consumer |
//! | `quarantine` | `retry/ID` or `dead/ID` | the record's bytes as found | a record that does not decode is kept here, counted and logged, never skipped in silence |
//!
//! Retry entries and dead letters are written as a version byte and postcard
//! ([`RECORD_VERSION`], as the spool and the journal are); records of earlier builds (version 1,
//! which had no `capture` and `offset`, or postcard without a version) are read and rewritten
//! at open, their capture time taken from the envelope's HLC as those builds ordered them
//! (offset 0: of two with one capture time, theirs loses). One that decodes neither way is moved to
//! `quarantine` at open ([`State::quarantined`]), so a queued change never vanishes without a
//! word.
//!
//! Invariants: the offset committed to the relay is never ahead of `meta.committed`, and
//! `meta.committed` is written in the same transaction as everything the changes up to it did
//! to the other tables. So after a crash, redelivered records are either dropped as seen or
//! applied again (targets are idempotent). Nothing here holds a cleartext password.

use crate::audit::WriteMark;
pub use crate::decide::AccountState;
use crate::decide::{OrderKey, ValueTail};
use pwsync_proto::{Offset, Op};
use pwsync_runtime::fingerprint::FingerprintKey;
use pwsync_runtime::{DirLock, LockError};
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const SEEN: TableDefinition<&str, u64> = TableDefinition::new("seen");
const USER_HLC: TableDefinition<&str, u64> = TableDefinition::new("user_hlc");
const FINGERPRINT: TableDefinition<&str, &[u8]> = TableDefinition::new("fingerprint");
const ACCOUNT: TableDefinition<&str, &[u8]> = TableDefinition::new("account");
const OWNER: TableDefinition<&str, &str> = TableDefinition::new("owner");
const WRITTEN: TableDefinition<&str, u64> = TableDefinition::new("written");
/// Written by builds before record version 2 (an HLC): read, never written.
const NEWEST: TableDefinition<&str, u64> = TableDefinition::new("newest");
const NEWEST_AT: TableDefinition<&str, &[u8]> = TableDefinition::new("newest_at");
const VALUE_TAIL: TableDefinition<&str, &[u8]> = TableDefinition::new("value_tail");
const AUDIT_MARK: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_mark");
const AUDIT_MARK_WHAT: &str = "audit mark";
const AUDIT_MARK_VERSION: u8 = 1;
const VALUE_TAIL_WHAT: &str = "value tail";
/// The format of `value_tail` rows.
const VALUE_TAIL_VERSION: u8 = 1;

/// The target name of a dead letter kept for every target (a record that could not be opened).
pub const ALL_TARGETS: &str = "*";

const RETRY: TableDefinition<u64, &[u8]> = TableDefinition::new("retry");
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead");
const RETRY_WHAT: &str = "retry entry";
const DEAD_WHAT: &str = "dead letter";
const SECRET: TableDefinition<&str, &[u8]> = TableDefinition::new("secret");
const QUARANTINE: TableDefinition<&str, &[u8]> = TableDefinition::new("quarantine");
/// The format of retry entries and dead letters this build reads and writes (2 added
/// `capture` and `offset`).
pub const RECORD_VERSION: u8 = 2;
/// redb's page cache for the state (its default is 1 GiB): enough for the per-user tables of a
/// large directory's hot set; the rest is read from the page cache of the OS.
const CACHE_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetryEntry {
    pub target: String,
    pub user: String,
    pub op: Op,
    pub agent: String,
    pub seq: u64,
    /// The change's capture time as the pipeline ordered it ([`crate::decide::capture_time`]),
    /// and its journal offset: where it stands in the order ([`RetryEntry::order_key`]).
    pub capture: u64,
    pub offset: u64,
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    pub attempts: u32,
    pub next_at_ms: u64,
    pub first_failed_ms: u64,
    pub last_error: String,
}

impl RetryEntry {
    pub fn order_key(&self) -> OrderKey {
        OrderKey {
            capture: self.capture,
            offset: self.offset,
        }
    }
}

impl DeadLetter {
    pub fn order_key(&self) -> OrderKey {
        OrderKey {
            capture: self.capture,
            offset: self.offset,
        }
    }
}

/// A retry entry as record version 1 had it (no `capture`, no `offset`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RetryEntryV1 {
    target: String,
    user: String,
    op: Op,
    agent: String,
    seq: u64,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
    attempts: u32,
    next_at_ms: u64,
    first_failed_ms: u64,
    last_error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub target: String,
    pub user: String,
    pub op: Op,
    pub agent: String,
    pub seq: u64,
    /// As [`RetryEntry::capture`] and [`RetryEntry::offset`]; capture 0 for a letter never
    /// opened (it is ordered when it is).
    pub capture: u64,
    pub offset: u64,
    pub error: String,
    pub time_ms: u64,
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

/// A dead letter as record version 1 had it (no `capture`, no `offset`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadLetterV1 {
    target: String,
    user: String,
    op: Op,
    agent: String,
    seq: u64,
    error: String,
    time_ms: u64,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
}

/// The capture time earlier builds ordered a kept envelope by: its HLC (0 if unreadable).
fn envelope_hlc(envelope: &[u8]) -> u64 {
    pwsync_proto::Envelope::decode(envelope).map_or(0, |e| e.header().hlc.0)
}

/// A kept record, and how to read its earlier forms.
trait StateRecord: Serialize + serde::de::DeserializeOwned {
    /// The record as version 1 or a build before versions (postcard alone) wrote it.
    fn from_earlier(what: &'static str, bytes: &[u8]) -> Option<Self>;
}

fn decode_v1<T: serde::de::DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Option<T> {
    pwsync_proto::codec::decode_versioned(what, 1, bytes)
        .or_else(|_| pwsync_proto::codec::decode_exact(what, bytes))
        .ok()
}

impl StateRecord for RetryEntry {
    fn from_earlier(what: &'static str, bytes: &[u8]) -> Option<RetryEntry> {
        let e: RetryEntryV1 = decode_v1(what, bytes)?;
        Some(RetryEntry {
            capture: envelope_hlc(&e.envelope),
            offset: 0,
            target: e.target,
            user: e.user,
            op: e.op,
            agent: e.agent,
            seq: e.seq,
            envelope: e.envelope,
            attempts: e.attempts,
            next_at_ms: e.next_at_ms,
            first_failed_ms: e.first_failed_ms,
            last_error: e.last_error,
        })
    }
}

impl StateRecord for DeadLetter {
    fn from_earlier(what: &'static str, bytes: &[u8]) -> Option<DeadLetter> {
        let d: DeadLetterV1 = decode_v1(what, bytes)?;
        Some(DeadLetter {
            capture: envelope_hlc(&d.envelope),
            offset: 0,
            target: d.target,
            user: d.user,
            op: d.op,
            agent: d.agent,
            seq: d.seq,
            error: d.error,
            time_ms: d.time_ms,
            envelope: d.envelope,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the consumer state {0}")]
    Lock(#[from] LockError),
    #[error("consumer state I/O error at {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("consumer state storage error: {0}")]
    Storage(String),
    #[error("no consumer state at {0} (no state.redb there); check [state] dir in the config")]
    Missing(std::path::PathBuf),
}

fn storage(e: impl std::fmt::Display) -> StateError {
    StateError::Storage(e.to_string())
}

/// The key of a per-target, per-name row (`owner`, `written`).
fn owner_key(target: &str, name: &str) -> String {
    format!("{target}\0{name}")
}

fn enc<T: Serialize>(what: &'static str, v: &T) -> Vec<u8> {
    pwsync_proto::codec::encode_versioned(what, RECORD_VERSION, v).unwrap_or_default()
}

/// A record as this build writes it, or as an earlier build did ([`StateRecord`]):
/// `Ok((value, true))` for an earlier form, to be rewritten.
fn dec<T: StateRecord>(
    what: &'static str,
    bytes: &[u8],
) -> Result<(T, bool), pwsync_proto::DecodeError> {
    match pwsync_proto::codec::decode_versioned(what, RECORD_VERSION, bytes) {
        Ok(v) => Ok((v, false)),
        Err(e) => T::from_earlier(what, bytes).map(|v| (v, true)).ok_or(e),
    }
}

/// Moves every record of `table` that does not decode as `T` to `quarantine` (logged), and
/// rewrites those of earlier builds in this build's form. Returns how many it moved.
fn sweep<T: StateRecord>(
    txn: &redb::WriteTransaction,
    table: TableDefinition<u64, &[u8]>,
    what: &'static str,
    prefix: &str,
) -> Result<u64, StateError> {
    let mut t = txn.open_table(table).map_err(storage)?;
    let mut moved = Vec::new();
    let mut rewritten = Vec::new();
    for item in t.iter().map_err(storage)? {
        let (k, v) = item.map_err(storage)?;
        match dec::<T>(what, v.value()) {
            Ok((_, false)) => {}
            Ok((value, true)) => rewritten.push((k.value(), enc(what, &value))),
            Err(e) => {
                tracing::error!(record = %format!("{prefix}/{}", k.value()), error = %e, "a consumer state record cannot be read: moved to the quarantine table, not applied (a newer build may read it)");
                moved.push((k.value(), v.value().to_vec()));
            }
        }
    }
    for (id, bytes) in rewritten {
        t.insert(id, bytes.as_slice()).map_err(storage)?;
    }
    let mut q = txn.open_table(QUARANTINE).map_err(storage)?;
    for (id, bytes) in &moved {
        q.insert(format!("{prefix}/{id}").as_str(), bytes.as_slice())
            .map_err(storage)?;
        t.remove(id).map_err(storage)?;
    }
    Ok(moved.len() as u64)
}

/// Writes made since the last flush.
#[derive(Default)]
struct Pending {
    committed: Option<u64>,
    seen: HashMap<String, u64>,
    user_hlc: HashMap<String, u64>,
    account: HashMap<String, (u64, AccountState)>,
    fingerprint: HashMap<String, Option<[u8; 32]>>,
    /// `None`: released.
    owner: HashMap<String, Option<String>>,
    written: HashMap<String, u64>,
    newest: HashMap<String, OrderKey>,
    /// `None`: the row is deleted.
    value_tail: HashMap<String, Option<ValueTail>>,
    audit_mark: HashMap<String, WriteMark>,
    retry_put: HashMap<u64, RetryEntry>,
    retry_del: Vec<u64>,
    dead_put: Vec<(u64, DeadLetter)>,
    dead_del: Vec<u64>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.committed.is_none()
            && self.seen.is_empty()
            && self.user_hlc.is_empty()
            && self.account.is_empty()
            && self.fingerprint.is_empty()
            && self.owner.is_empty()
            && self.written.is_empty()
            && self.newest.is_empty()
            && self.value_tail.is_empty()
            && self.audit_mark.is_empty()
            && self.retry_put.is_empty()
            && self.retry_del.is_empty()
            && self.dead_put.is_empty()
            && self.dead_del.is_empty()
    }
}

pub struct State {
    db: Database,
    committed: u64,
    next_id: u64,
    seen: HashMap<String, u64>,
    user_hlc: HashMap<String, u64>,
    account: HashMap<String, (u64, AccountState)>,
    fingerprint: HashMap<String, [u8; 32]>,
    /// The users with a `value_tail` row (as flushed, and as pending).
    tails: HashSet<String>,
    key: FingerprintKey,
    pending: Pending,
    /// The folder's lock (none for a state on another backend: the simulator's).
    _lock: Option<DirLock>,
}

impl State {
    /// Opens the state of a consumer for the offline tools (`status`, `deadletter`): a folder
    /// with no state in it is an error (a wrong `[state] dir`), not a new empty state.
    pub fn open_existing(dir: &Path) -> Result<State, StateError> {
        if !dir.join("state.redb").exists() {
            return Err(StateError::Missing(dir.to_path_buf()));
        }
        Self::open(dir)
    }

    /// Opens (creating if needed) the state in `dir` and takes its lock.
    pub fn open(dir: &Path) -> Result<State, StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        let lock = DirLock::acquire(dir, "consumer")?;
        let db =
            pwsync_runtime::redb_file::open_or_create(&dir.join("state.redb"), Some(CACHE_BYTES))
                .map_err(storage)?;
        Self::load(db, Some(lock))
    }

    /// A state kept on `backend` rather than in a folder (the simulator keeps it in memory,
    /// surviving its crashes as a file would); nothing else differs.
    pub fn open_on(backend: impl redb::StorageBackend) -> Result<State, StateError> {
        let db = redb::Builder::new()
            .create_with_backend(backend)
            .map_err(storage)?;
        Self::load(db, None)
    }

    /// The state as a crash leaves it: what was not flushed is dropped, and everything is
    /// read again from the database (the simulator's consumer restarting on its file).
    pub fn crashed(self) -> Result<State, StateError> {
        let State { db, _lock, .. } = self;
        Self::load(db, _lock)
    }

    fn load(db: Database, lock: Option<DirLock>) -> Result<State, StateError> {
        let txn = db.begin_write().map_err(storage)?;
        let (committed, next_id, seen, user_hlc, account, fingerprint, tails, key) = {
            let meta = txn.open_table(META).map_err(storage)?;
            let get = |k: &str| -> Result<u64, StateError> {
                Ok(meta
                    .get(k)
                    .map_err(storage)?
                    .map(|v| v.value())
                    .unwrap_or(0))
            };
            let committed = get("committed")?;
            let next_id = get("next_id")?.max(1);
            let mut seen = HashMap::new();
            for item in txn
                .open_table(SEEN)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                let (k, v) = item.map_err(storage)?;
                seen.insert(k.value().to_string(), v.value());
            }
            let mut user_hlc = HashMap::new();
            for item in txn
                .open_table(USER_HLC)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                let (k, v) = item.map_err(storage)?;
                user_hlc.insert(k.value().to_string(), v.value());
            }
            let mut account = HashMap::new();
            for item in txn
                .open_table(ACCOUNT)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                let (k, v) = item.map_err(storage)?;
                let v = v.value();
                if let (Some(hlc), Some(state)) = (v.get(..8), v.get(8)) {
                    let hlc = u64::from_le_bytes(hlc.try_into().unwrap_or_default());
                    account.insert(
                        k.value().to_string(),
                        (hlc, AccountState::from_byte(*state)),
                    );
                }
            }
            let mut fingerprint = HashMap::new();
            for item in txn
                .open_table(FINGERPRINT)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                let (k, v) = item.map_err(storage)?;
                if let Ok(fp) = <[u8; 32]>::try_from(v.value()) {
                    fingerprint.insert(k.value().to_string(), fp);
                }
            }
            txn.open_table(OWNER).map_err(storage)?;
            txn.open_table(WRITTEN).map_err(storage)?;
            txn.open_table(NEWEST).map_err(storage)?;
            txn.open_table(NEWEST_AT).map_err(storage)?;
            txn.open_table(AUDIT_MARK).map_err(storage)?;
            let mut tails = HashSet::new();
            for item in txn
                .open_table(VALUE_TAIL)
                .map_err(storage)?
                .iter()
                .map_err(storage)?
            {
                tails.insert(item.map_err(storage)?.0.value().to_string());
            }
            sweep::<RetryEntry>(&txn, RETRY, RETRY_WHAT, "retry")?;
            sweep::<DeadLetter>(&txn, DEAD, DEAD_WHAT, "dead")?;
            let key = FingerprintKey::load_or_create(&mut txn.open_table(SECRET).map_err(storage)?)
                .map_err(storage)?;
            (
                committed,
                next_id,
                seen,
                user_hlc,
                account,
                fingerprint,
                tails,
                key,
            )
        };
        txn.commit().map_err(storage)?;
        Ok(State {
            db,
            committed,
            next_id,
            seen,
            user_hlc,
            account,
            fingerprint,
            tails,
            key,
            pending: Pending::default(),
            _lock: lock,
        })
    }

    pub fn committed(&self) -> Offset {
        Offset(self.pending.committed.unwrap_or(self.committed))
    }

    pub fn set_committed(&mut self, o: Offset) {
        self.pending.committed = Some(o.0);
    }

    /// The highest seq processed for `agent`.
    pub fn seen(&self, agent: &str) -> u64 {
        self.seen.get(agent).copied().unwrap_or(0)
    }

    pub fn mark_seen(&mut self, agent: &str, seq: u64) {
        self.seen.insert(agent.into(), seq);
        self.pending.seen.insert(agent.into(), seq);
    }

    pub fn user_hlc(&self, user: &str) -> u64 {
        self.user_hlc.get(user).copied().unwrap_or(0)
    }

    pub fn set_user_hlc(&mut self, user: &str, hlc: u64) {
        self.user_hlc.insert(user.into(), hlc);
        self.pending.user_hlc.insert(user.into(), hlc);
    }

    /// The keyed fingerprint of a user's password values (never the values themselves).
    pub fn fingerprint_of(&self, user: &str, values: &[pwsync_proto::Secret]) -> [u8; 32] {
        self.key.of_values(user, values)
    }

    /// The newest account op's HLC for `user`, and the state it left (0 and active if none).
    pub fn account(&self, user: &str) -> (u64, AccountState) {
        self.account.get(user).copied().unwrap_or_default()
    }

    pub fn set_account(&mut self, user: &str, hlc: u64, state: AccountState) {
        self.account.insert(user.into(), (hlc, state));
        self.pending.account.insert(user.into(), (hlc, state));
    }

    pub fn fingerprint(&self, user: &str) -> Option<[u8; 32]> {
        self.fingerprint.get(user).copied()
    }

    pub fn set_fingerprint(&mut self, user: &str, fp: Option<[u8; 32]>) {
        match fp {
            Some(fp) => self.fingerprint.insert(user.into(), fp),
            None => self.fingerprint.remove(user),
        };
        self.pending.fingerprint.insert(user.into(), fp);
    }

    /// The source user whose change first applied to the account `folded` (as target `target`
    /// folds names) there, if any.
    pub fn owner(&self, target: &str, folded: &str) -> Result<Option<String>, StateError> {
        let key = owner_key(target, folded);
        if let Some(user) = self.pending.owner.get(&key) {
            return Ok(user.clone());
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(OWNER).map_err(storage)?;
        Ok(t.get(key.as_str())
            .map_err(storage)?
            .map(|v| v.value().to_string()))
    }

    pub fn set_owner(&mut self, target: &str, folded: &str, user: &str) {
        self.pending
            .owner
            .insert(owner_key(target, folded), Some(user.to_string()));
    }

    /// When pwsync last applied a change of `user` at `target` (ms), if it ever did.
    pub fn written(&self, target: &str, user: &str) -> Result<Option<u64>, StateError> {
        let key = owner_key(target, user);
        if let Some(ms) = self.pending.written.get(&key) {
            return Ok(Some(*ms));
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(WRITTEN).map_err(storage)?;
        Ok(t.get(key.as_str()).map_err(storage)?.map(|v| v.value()))
    }

    pub fn set_written(&mut self, target: &str, user: &str, ms: u64) {
        self.pending.written.insert(owner_key(target, user), ms);
    }

    /// Keeps what the target recorded right after pwsync wrote `user`'s password at `target`.
    pub fn set_audit_mark(&mut self, target: &str, user: &str, mark: WriteMark) {
        self.pending
            .audit_mark
            .insert(owner_key(target, user), mark);
    }

    /// The fingerprint of what `target` stores for `account` ([`FingerprintKey::of_verifier`]).
    pub fn fingerprint_verifier(&self, target: &str, account: &str, stored: &[u8]) -> [u8; 32] {
        self.key.of_verifier(target, account, stored)
    }

    /// What the account audit needs, read at once (flushed state): the fingerprint key, every
    /// user the consumer has seen a change of, the marks of pwsync's password writes, the
    /// password changes still waiting (retrying or dead letters) per target and user, and the
    /// users whose accounts pwsync removed. A mark that does not decode is left out (logged):
    /// that account is judged as one pwsync never wrote until its next write.
    pub fn audit_view(&self) -> Result<crate::audit::View, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let mut view = crate::audit::View {
            key: Some(self.key.clone()),
            users: self
                .user_hlc
                .keys()
                .chain(self.account.keys())
                .cloned()
                .collect(),
            ..Default::default()
        };
        for item in txn
            .open_table(AUDIT_MARK)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            let (k, v) = item.map_err(storage)?;
            let Some((target, user)) = k.value().split_once('\0') else {
                continue;
            };
            match pwsync_proto::codec::decode_versioned::<WriteMark>(
                AUDIT_MARK_WHAT,
                AUDIT_MARK_VERSION,
                v.value(),
            ) {
                Ok(mark) => {
                    view.marks
                        .insert((target.to_string(), user.to_string()), mark);
                }
                Err(e) => {
                    tracing::error!(target = %target, error = %e, "an audit mark cannot be read; that account is audited as never written until pwsync writes it again")
                }
            }
        }
        for (_, e) in self.retries()? {
            if e.op.carries_values() {
                view.pending
                    .entry((e.target, e.user))
                    .or_insert((false, e.last_error));
            }
        }
        for (_, d) in self.dead_letters()? {
            if d.op.carries_values() {
                view.pending.insert((d.target, d.user), (true, d.error));
            }
        }
        view.removed = self
            .account
            .iter()
            .filter(|(_, (_, s))| *s == AccountState::Removed)
            .map(|(u, _)| u.clone())
            .collect();
        Ok(view)
    }

    /// Every account holder: (target, account as the target folds it, source user), in key
    /// order (flushed ones only).
    pub fn owners(&self) -> Result<Vec<(String, String, String)>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(OWNER).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            let key = k.value();
            let (target, account) = key.split_once('\0').unwrap_or((key, ""));
            out.push((target.into(), account.into(), v.value().to_string()));
        }
        Ok(out)
    }

    /// Releases every account `user` holds at `target` (the next user whose change applies
    /// there holds it); returns the accounts released. Written at the next flush.
    pub fn release_owner(&mut self, target: &str, user: &str) -> Result<Vec<String>, StateError> {
        let held: Vec<String> = self
            .owners()?
            .into_iter()
            .filter(|(t, _, u)| t == target && u == user)
            .map(|(_, account, _)| account)
            .collect();
        for account in &held {
            self.pending.owner.insert(owner_key(target, account), None);
        }
        Ok(held)
    }

    /// Where the newest change of `register` (`"password"` or `"account"`) of `user` that
    /// pwsync wrote at `target` stands in the order, if any.
    pub fn newest_applied(
        &self,
        target: &str,
        user: &str,
        register: &str,
    ) -> Result<Option<OrderKey>, StateError> {
        let key = format!("{target}\0{user}\0{register}");
        if let Some(at) = self.pending.newest.get(&key) {
            return Ok(Some(*at));
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(NEWEST_AT).map_err(storage)?;
        if let Some(v) = t.get(key.as_str()).map_err(storage)? {
            let b = v.value();
            let word = |i: usize| {
                b.get(i * 8..i * 8 + 8)
                    .and_then(|w| w.try_into().ok())
                    .map(u64::from_be_bytes)
            };
            if let (Some(capture), Some(offset)) = (word(0), word(1)) {
                return Ok(Some(OrderKey { capture, offset }));
            }
        }
        let old = txn.open_table(NEWEST).map_err(storage)?;
        Ok(old.get(key.as_str()).map_err(storage)?.map(|v| OrderKey {
            capture: v.value(),
            offset: 0,
        }))
    }

    /// Records that a change of `register` standing at `at` was written at `target` for `user`
    /// (kept only when newer than what is recorded).
    pub fn set_newest_applied(&mut self, target: &str, user: &str, register: &str, at: OrderKey) {
        let older = matches!(self.newest_applied(target, user, register), Ok(Some(h)) if h >= at);
        if !older {
            self.pending
                .newest
                .insert(format!("{target}\0{user}\0{register}"), at);
        }
    }

    /// The user's [`ValueTail`], if the newest value op is an add or delete. A row that cannot
    /// be read counts as none (logged): a late value op is then stale, as without tails.
    pub fn value_tail(&self, user: &str) -> Option<ValueTail> {
        if let Some(pending) = self.pending.value_tail.get(user) {
            return pending.clone();
        }
        if !self.tails.contains(user) {
            return None;
        }
        let read = || -> Result<Option<ValueTail>, String> {
            let txn = self.db.begin_read().map_err(|e| e.to_string())?;
            let t = txn.open_table(VALUE_TAIL).map_err(|e| e.to_string())?;
            let Some(v) = t.get(user).map_err(|e| e.to_string())? else {
                return Ok(None);
            };
            pwsync_proto::codec::decode_versioned(VALUE_TAIL_WHAT, VALUE_TAIL_VERSION, v.value())
                .map(Some)
                .map_err(|e| e.to_string())
        };
        read().unwrap_or_else(|error| {
            tracing::error!(user = %pwsync_proto::untrusted::Untrusted(user), %error, "a user's kept adds and deletes cannot be read: a value op arriving late for this user is skipped as older");
            None
        })
    }

    pub fn set_value_tail(&mut self, user: &str, tail: Option<ValueTail>) {
        if tail.is_some() {
            self.tails.insert(user.into());
        } else if !self.tails.remove(user) {
            return; // no row, none to delete
        }
        self.pending.value_tail.insert(user.into(), tail);
    }

    fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn queue_retry(&mut self, e: RetryEntry) -> u64 {
        let id = self.new_id();
        self.pending.retry_put.insert(id, e);
        id
    }

    pub fn update_retry(&mut self, id: u64, e: RetryEntry) {
        self.pending.retry_put.insert(id, e);
    }

    pub fn remove_retry(&mut self, id: u64) {
        self.pending.retry_put.remove(&id);
        self.pending.retry_del.push(id);
    }

    pub fn dead_letter(&mut self, d: DeadLetter) -> u64 {
        let id = self.new_id();
        self.pending.dead_put.push((id, d));
        id
    }

    pub fn remove_dead(&mut self, id: u64) {
        self.pending.dead_del.push(id);
    }

    /// Writes everything since the last flush in one transaction and fsyncs.
    /// Does nothing when nothing was written since the last flush (the pipeline calls this on
    /// every turn, idle or not; an fsync per idle turn would be pure waste).
    pub fn flush(&mut self) -> Result<(), StateError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_durability(Durability::Immediate);
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            if let Some(c) = p.committed {
                meta.insert("committed", c).map_err(storage)?;
            }
            meta.insert("next_id", self.next_id).map_err(storage)?;
            let mut seen = txn.open_table(SEEN).map_err(storage)?;
            for (k, v) in &p.seen {
                seen.insert(k.as_str(), *v).map_err(storage)?;
            }
            let mut hlc = txn.open_table(USER_HLC).map_err(storage)?;
            for (k, v) in &p.user_hlc {
                hlc.insert(k.as_str(), *v).map_err(storage)?;
            }
            let mut account = txn.open_table(ACCOUNT).map_err(storage)?;
            for (k, (hlc, state)) in &p.account {
                let mut v = hlc.to_le_bytes().to_vec();
                v.push(state.to_byte());
                account.insert(k.as_str(), v.as_slice()).map_err(storage)?;
            }
            let mut fp = txn.open_table(FINGERPRINT).map_err(storage)?;
            for (k, v) in &p.fingerprint {
                match v {
                    Some(v) => fp.insert(k.as_str(), v.as_slice()).map(|_| ()),
                    None => fp.remove(k.as_str()).map(|_| ()),
                }
                .map_err(storage)?;
            }
            let mut owner = txn.open_table(OWNER).map_err(storage)?;
            for (k, v) in &p.owner {
                match v {
                    Some(v) => owner.insert(k.as_str(), v.as_str()).map(|_| ()),
                    None => owner.remove(k.as_str()).map(|_| ()),
                }
                .map_err(storage)?;
            }
            let mut newest = txn.open_table(NEWEST_AT).map_err(storage)?;
            for (k, v) in &p.newest {
                let bytes = [v.capture.to_be_bytes(), v.offset.to_be_bytes()].concat();
                newest
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(storage)?;
            }
            let mut tails = txn.open_table(VALUE_TAIL).map_err(storage)?;
            for (user, tail) in &p.value_tail {
                match tail {
                    Some(tail) => {
                        let bytes = pwsync_proto::codec::encode_versioned(
                            VALUE_TAIL_WHAT,
                            VALUE_TAIL_VERSION,
                            tail,
                        )
                        .map_err(storage)?;
                        tails.insert(user.as_str(), bytes.as_slice()).map(|_| ())
                    }
                    None => tails.remove(user.as_str()).map(|_| ()),
                }
                .map_err(storage)?;
            }
            let mut marks = txn.open_table(AUDIT_MARK).map_err(storage)?;
            for (k, mark) in &p.audit_mark {
                let bytes = pwsync_proto::codec::encode_versioned(
                    AUDIT_MARK_WHAT,
                    AUDIT_MARK_VERSION,
                    mark,
                )
                .map_err(storage)?;
                marks
                    .insert(k.as_str(), bytes.as_slice())
                    .map_err(storage)?;
            }
            let mut written = txn.open_table(WRITTEN).map_err(storage)?;
            for (k, v) in &p.written {
                written.insert(k.as_str(), *v).map_err(storage)?;
            }
            let mut retry = txn.open_table(RETRY).map_err(storage)?;
            for id in &p.retry_del {
                retry.remove(id).map_err(storage)?;
            }
            for (id, e) in &p.retry_put {
                retry
                    .insert(id, enc(RETRY_WHAT, e).as_slice())
                    .map_err(storage)?;
            }
            let mut dead = txn.open_table(DEAD).map_err(storage)?;
            for (id, d) in &p.dead_put {
                dead.insert(id, enc(DEAD_WHAT, d).as_slice())
                    .map_err(storage)?;
            }
            for id in &p.dead_del {
                dead.remove(id).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        if let Some(c) = p.committed {
            self.committed = c;
        }
        Ok(())
    }

    /// Every retry entry, oldest id first (as flushed).
    pub fn retries(&self) -> Result<Vec<(u64, RetryEntry)>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(RETRY).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            if let Ok((e, _)) = dec::<RetryEntry>(RETRY_WHAT, v.value()) {
                out.push((k.value(), e));
            }
        }
        Ok(out)
    }

    /// Puts the dead letters `ids` (all when empty) back into their retry queues, due now, and
    /// flushes: one kept unopened for every target (`target = "*"`) goes back to each of
    /// `targets`. Returns how many dead letters went back.
    pub fn requeue_dead(
        &mut self,
        ids: &[u64],
        targets: &[String],
        now_ms: u64,
    ) -> Result<usize, StateError> {
        let chosen: Vec<(u64, DeadLetter)> = self
            .dead_letters()?
            .into_iter()
            .filter(|(id, _)| ids.is_empty() || ids.contains(id))
            .collect();
        for (id, d) in &chosen {
            let to: Vec<String> = if d.target == ALL_TARGETS {
                targets.to_vec()
            } else {
                vec![d.target.clone()]
            };
            for target in to {
                self.queue_retry(RetryEntry {
                    target,
                    user: d.user.clone(),
                    op: d.op,
                    agent: d.agent.clone(),
                    seq: d.seq,
                    capture: d.capture,
                    offset: d.offset,
                    envelope: d.envelope.clone(),
                    attempts: 0,
                    next_at_ms: now_ms,
                    first_failed_ms: now_ms,
                    last_error: String::new(),
                });
            }
            self.remove_dead(*id);
        }
        self.flush()?;
        Ok(chosen.len())
    }

    /// How many records could not be read and sit in the quarantine table.
    pub fn quarantined(&self) -> Result<u64, StateError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(QUARANTINE).map_err(storage)?;
        t.len().map_err(storage)
    }

    /// How many dead letters are kept (as flushed).
    pub fn dead_letter_count(&self) -> Result<u64, StateError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(DEAD).map_err(storage)?;
        t.len().map_err(storage)
    }

    /// Every dead letter, oldest first (as flushed).
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let t = txn.open_table(DEAD).map_err(storage)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(storage)? {
            let (k, v) = item.map_err(storage)?;
            if let Ok((d, _)) = dec::<DeadLetter>(DEAD_WHAT, v.value()) {
                out.push((k.value(), d));
            }
        }
        Ok(out)
    }
}

/// The durable ledger the decision core reads and writes ([`crate::decide`]).
impl crate::decide::Ledger for State {
    fn seen(&self, agent: &str) -> u64 {
        State::seen(self, agent)
    }
    fn mark_seen(&mut self, agent: &str, seq: u64) {
        State::mark_seen(self, agent, seq)
    }
    fn user_hlc(&self, user: &str) -> u64 {
        State::user_hlc(self, user)
    }
    fn set_user_hlc(&mut self, user: &str, hlc: u64) {
        State::set_user_hlc(self, user, hlc)
    }
    fn account(&self, user: &str) -> (u64, AccountState) {
        State::account(self, user)
    }
    fn set_account(&mut self, user: &str, hlc: u64, state: AccountState) {
        State::set_account(self, user, hlc, state)
    }
    fn fingerprint(&self, user: &str) -> Option<[u8; 32]> {
        State::fingerprint(self, user)
    }
    fn set_fingerprint(&mut self, user: &str, fp: Option<[u8; 32]>) {
        State::set_fingerprint(self, user, fp)
    }
    fn fingerprint_of(&self, user: &str, values: &[pwsync_proto::Secret]) -> [u8; 32] {
        State::fingerprint_of(self, user, values)
    }
    fn value_tail(&self, user: &str) -> Option<ValueTail> {
        State::value_tail(self, user)
    }
    fn set_value_tail(&mut self, user: &str, tail: Option<ValueTail>) {
        State::set_value_tail(self, user, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str) -> RetryEntry {
        RetryEntry {
            target: "web".into(),
            user: user.into(),
            op: Op::Replace,
            agent: "host-a".into(),
            seq: 7,
            capture: 9,
            offset: 2,
            envelope: vec![1, 2, 3],
            attempts: 1,
            next_at_ms: 5,
            first_failed_ms: 4,
            last_error: "busy".into(),
        }
    }

    #[test]
    fn records_of_earlier_builds_are_rewritten_and_unreadable_ones_quarantined_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = State::open(dir.path()).unwrap();
            s.queue_retry(entry("alice"));
            s.flush().unwrap();
        }
        // As an earlier build (postcard, no version byte) and a later one (unknown version)
        // would have left them.
        {
            let db = Database::open(dir.path().join("state.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(RETRY).unwrap();
                let v1 = |user: &str| {
                    let e = entry(user);
                    RetryEntryV1 {
                        target: e.target,
                        user: e.user,
                        op: e.op,
                        agent: e.agent,
                        seq: e.seq,
                        envelope: e.envelope,
                        attempts: e.attempts,
                        next_at_ms: e.next_at_ms,
                        first_failed_ms: e.first_failed_ms,
                        last_error: e.last_error,
                    }
                };
                t.insert(100, postcard::to_allocvec(&v1("bob")).unwrap().as_slice())
                    .unwrap();
                t.insert(
                    102,
                    pwsync_proto::codec::encode_versioned("retry entry", 1, &v1("carol"))
                        .unwrap()
                        .as_slice(),
                )
                .unwrap();
                t.insert(101, [9u8, 1, 2, 3].as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let s = State::open(dir.path()).unwrap();
        let users: Vec<String> = s
            .retries()
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.user)
            .collect();
        assert_eq!(users, ["alice", "bob", "carol"]);
        assert_eq!(s.quarantined().unwrap(), 1);
        drop(s);
        // Opened again: nothing more to move, the earlier form is now this build's.
        let s = State::open(dir.path()).unwrap();
        assert_eq!(s.retries().unwrap().len(), 3);
        assert_eq!(s.quarantined().unwrap(), 1);
    }

    #[test]
    fn the_newest_change_stands_by_capture_then_offset_and_earlier_builds_hlcs_are_read() {
        let dir = tempfile::tempdir().unwrap();
        drop(State::open(dir.path()).unwrap());
        {
            // As a build before record version 2 left it: an HLC alone.
            let db = Database::open(dir.path().join("state.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(NEWEST)
                .unwrap()
                .insert("web\0alice\0password", 50)
                .unwrap();
            txn.commit().unwrap();
        }
        let at = |capture, offset| OrderKey { capture, offset };
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(
            s.newest_applied("web", "alice", "password").unwrap(),
            Some(at(50, 0))
        );
        // One capture time, later in the journal: newer. Lower: kept out.
        s.set_newest_applied("web", "alice", "password", at(50, 7));
        s.set_newest_applied("web", "alice", "password", at(50, 6));
        s.set_newest_applied("web", "alice", "password", at(49, 99));
        s.flush().unwrap();
        drop(s);
        let s = State::open(dir.path()).unwrap();
        assert_eq!(
            s.newest_applied("web", "alice", "password").unwrap(),
            Some(at(50, 7))
        );
        assert_eq!(s.newest_applied("web", "bob", "password").unwrap(), None);
    }

    #[test]
    fn dead_letters_go_back_to_their_queues_and_unopened_ones_to_every_target() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let dead = |target: &str, user: &str| DeadLetter {
            target: target.into(),
            user: user.into(),
            op: Op::Replace,
            agent: "host-a".into(),
            seq: 3,
            capture: 5,
            offset: 3,
            error: "refused".into(),
            time_ms: 1,
            envelope: vec![7; 4],
        };
        let kept = s.dead_letter(dead("web", "alice"));
        let unopened = s.dead_letter(dead(ALL_TARGETS, "?"));
        let other = s.dead_letter(dead("dir", "bob"));
        s.flush().unwrap();
        let targets = ["web".to_string(), "dir".to_string()];
        assert_eq!(s.requeue_dead(&[kept, unopened], &targets, 50).unwrap(), 2);
        let queued: Vec<(String, String, u64)> = s
            .retries()
            .unwrap()
            .into_iter()
            .map(|(_, e)| (e.target, e.user, e.next_at_ms))
            .collect();
        assert_eq!(
            queued,
            [
                ("web".into(), "alice".into(), 50),
                ("web".into(), "?".into(), 50),
                ("dir".into(), "?".into(), 50)
            ]
        );
        let left: Vec<u64> = s
            .dead_letters()
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(left, [other]);
    }

    #[test]
    fn offline_tools_refuse_a_folder_without_state() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            State::open_existing(&dir.path().join("nothing")),
            Err(StateError::Missing(_))
        ));
        assert!(!dir.path().join("nothing").exists());
    }
}
