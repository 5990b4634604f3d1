//! The consumer's decision for each record, and its retry schedule: pure rules, no I/O, no clock
//! or randomness of their own (they are inputs), so the pipeline ([`crate::pipeline`]) and the
//! deterministic simulator (`tests/tests/sim.rs`) run the same code.
//!
//! What is decided here, for an opened record, in this order:
//! 1. a `lost` placeholder is reported, never applied;
//! 2. a user outside the agent's scope is refused (the shell knows the scope, this the rule);
//! 3. an `(agent, seq)` at or below the agent's highest processed seq is a replay (G2);
//! 4. the capture time is the envelope's HLC, but never later than the relay's journal time
//!    ([`capture_time`]): no host's clock can put its changes ahead of later ones;
//! 5. two registers per user ([`Ledger`]): the password (replace, add, delete) and the account
//!    (revoke, resume, remove). The account is last-writer-wins: an older op is stale, and
//!    remove is final. The password is the user's value ops folded in capture order: an op
//!    older than the newest replace is stale (the replace set the whole value after it), and
//!    an add, delete or replace older than some adds and deletes but newer than the newest
//!    replace is put in its place: applied, then those later ops again after it (the
//!    [`ValueTail`] keeps them, sealed), so every system ends on the capture-order result;
//! 6. a replace whose values are the user's newest values is an echo (G6); every other op
//!    clears the fingerprint, so a real change is never taken for an echo;
//! 7. a backfill (a password seen at a login, [`pwsync_proto::change::BACKFILL_ATTRIBUTE`]) is
//!    applied only for a user with no op in either register, and touches neither; the shell
//!    applies it only at targets where pwsync never wrote for that user.
//!
//! What the shell does with [`Verdict::Apply`]: route it per target, queue it behind a pending
//! retry of that user at that target, apply it, and put a revoked account's lock back after a
//! password change ([`relock_after`]). Failures are retried on [`backoff_ms`].

use pwsync_proto::hlc::{Hlc, MAX_FORWARD_DRIFT_MS};
use pwsync_proto::{Change, Op};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What the account ops left an account in, on every target alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccountState {
    #[default]
    Active,
    /// Locked by a revoke: password changes still apply, and the lock is put back after each.
    Revoked,
    /// Removed: final; nothing later applies.
    Removed,
}

impl AccountState {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            AccountState::Active => 0,
            AccountState::Revoked => 1,
            AccountState::Removed => 2,
        }
    }
    pub(crate) fn from_byte(b: u8) -> AccountState {
        match b {
            1 => AccountState::Revoked,
            2 => AccountState::Removed,
            _ => AccountState::Active,
        }
    }
}

/// What the decision reads and writes per agent and per user. The consumer's [`crate::state`]
/// keeps it durably; the simulator in memory, with crash semantics.
pub trait Ledger {
    /// The highest seq processed for `agent` (0 if none).
    fn seen(&self, agent: &str) -> u64;
    fn mark_seen(&mut self, agent: &str, seq: u64);
    /// The capture time of the user's newest password op (0 if none).
    fn user_hlc(&self, user: &str) -> u64;
    fn set_user_hlc(&mut self, user: &str, hlc: u64);
    /// The capture time of the user's newest account op, and the state it left.
    fn account(&self, user: &str) -> (u64, AccountState);
    fn set_account(&mut self, user: &str, hlc: u64, state: AccountState);
    /// The fingerprint of the user's newest values, if the newest password op was a replace.
    fn fingerprint(&self, user: &str) -> Option<[u8; 32]>;
    fn set_fingerprint(&mut self, user: &str, fp: Option<[u8; 32]>);
    /// The keyed fingerprint of `values` for `user` (never the values themselves).
    fn fingerprint_of(&self, user: &str, values: &[pwsync_proto::Secret]) -> [u8; 32];
    /// The user's value adds and deletes after their newest replace ([`ValueTail`]); `None`
    /// when the newest value op is a replace (or its record cannot be read: a late op is then
    /// stale, as before tails were kept).
    fn value_tail(&self, user: &str) -> Option<ValueTail>;
    fn set_value_tail(&mut self, user: &str, tail: Option<ValueTail>);
}

/// A [`Ledger`] in memory, for the simulator and tests: cloning it is taking a durable copy.
/// Its fingerprints are not keyed (a consumer's [`crate::state::State`] keys an HMAC), so it is
/// no place for real passwords.
#[derive(Clone, Debug, Default)]
pub struct MemoryLedger {
    seen: HashMap<String, u64>,
    user_hlc: HashMap<String, u64>,
    account: HashMap<String, (u64, AccountState)>,
    fingerprint: HashMap<String, [u8; 32]>,
    value_tail: HashMap<String, ValueTail>,
}

impl Ledger for MemoryLedger {
    fn seen(&self, agent: &str) -> u64 {
        self.seen.get(agent).copied().unwrap_or(0)
    }
    fn mark_seen(&mut self, agent: &str, seq: u64) {
        self.seen.insert(agent.into(), seq);
    }
    fn user_hlc(&self, user: &str) -> u64 {
        self.user_hlc.get(user).copied().unwrap_or(0)
    }
    fn set_user_hlc(&mut self, user: &str, hlc: u64) {
        self.user_hlc.insert(user.into(), hlc);
    }
    fn account(&self, user: &str) -> (u64, AccountState) {
        self.account.get(user).copied().unwrap_or_default()
    }
    fn set_account(&mut self, user: &str, hlc: u64, state: AccountState) {
        self.account.insert(user.into(), (hlc, state));
    }
    fn fingerprint(&self, user: &str) -> Option<[u8; 32]> {
        self.fingerprint.get(user).copied()
    }
    fn set_fingerprint(&mut self, user: &str, fp: Option<[u8; 32]>) {
        match fp {
            Some(fp) => self.fingerprint.insert(user.into(), fp),
            None => self.fingerprint.remove(user),
        };
    }
    fn fingerprint_of(&self, user: &str, values: &[pwsync_proto::Secret]) -> [u8; 32] {
        let mut bytes = user.as_bytes().to_vec();
        for v in values {
            bytes.push(0);
            bytes.extend_from_slice(v.expose());
        }
        let mut out = [0u8; 32];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (i, &bytes).hash(&mut h);
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
        out
    }
    fn value_tail(&self, user: &str) -> Option<ValueTail> {
        self.value_tail.get(user).cloned()
    }
    fn set_value_tail(&mut self, user: &str, tail: Option<ValueTail>) {
        match tail {
            Some(t) => self.value_tail.insert(user.into(), t),
            None => self.value_tail.remove(user),
        };
    }
}

/// How many adds and deletes a [`ValueTail`] keeps; past it the oldest goes, and a value op
/// arriving later than that and older than it is stale.
pub const VALUE_TAIL_MAX: usize = 64;

/// A user's value adds and deletes after their newest replace, in order, each with its sealed
/// envelope (never a value in the clear). A value op that arrives after some of them but was
/// captured before them (and after the replace) is put in its place: the shell applies it, then
/// those after it again at each target that has them, so every system ends where the ops
/// folded in capture order put it (adds and deletes are set operations: the last one touching a
/// value decides it). Kept only while the newest value op is an add or delete.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueTail {
    /// The place of the newest replace: a value op before it is superseded.
    pub replace: OrderKey,
    /// The place of the newest replace, or of the newest add or delete dropped from the front
    /// past [`VALUE_TAIL_MAX`]: a value op at or before it cannot be put in its place.
    pub floor: OrderKey,
    /// The adds and deletes after `floor`, in order.
    pub ops: Vec<KeptOp>,
}

/// An add or delete in a [`ValueTail`]: its place and its envelope, still sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptOp {
    pub at: OrderKey,
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

impl ValueTail {
    /// The tail after value op `op` at `at` (its sealed `envelope`) is kept: in order or late,
    /// as [`order`] decided. A replace ends everything before it; an add or delete takes its
    /// place. `newest` is the user's newest value op's capture before this one (where a new
    /// tail starts). `None`: the newest value op is a replace, nothing to keep.
    fn keep(
        tail: Option<ValueTail>,
        newest: u64,
        at: OrderKey,
        op: Op,
        envelope: &[u8],
    ) -> Option<ValueTail> {
        let mut tail = tail.unwrap_or_else(|| ValueTail {
            // Of the op before (a replace, or one of an earlier build), only its capture time
            // is known: an op with that capture time is neither superseded by it nor put in
            // its place (it is judged against what its target has, as before tails).
            replace: OrderKey {
                capture: newest,
                offset: 0,
            },
            floor: OrderKey {
                capture: newest,
                offset: if newest == 0 { 0 } else { u64::MAX },
            },
            ops: Vec::new(),
        });
        if op == Op::Replace {
            tail.replace = at;
            tail.floor = at;
            tail.ops.retain(|k| k.at > at);
        } else {
            let place = tail.ops.partition_point(|k| k.at < at);
            if tail.ops.get(place).is_some_and(|k| k.at == at) {
                return Some(tail); // kept already
            }
            tail.ops.insert(
                place,
                KeptOp {
                    at,
                    envelope: envelope.to_vec(),
                },
            );
            if tail.ops.len() > VALUE_TAIL_MAX {
                tail.floor = tail.ops.remove(0).at;
            }
        }
        (!tail.ops.is_empty()).then_some(tail)
    }

    /// Whether a value op at `at` is superseded: the newest replace came after it.
    pub fn supersedes(&self, at: OrderKey) -> bool {
        at < self.replace
    }

    /// The kept ops after `at`, in order.
    pub fn after(&self, at: OrderKey) -> impl Iterator<Item = &KeptOp> {
        self.ops.iter().filter(move |k| k.at > at)
    }
}

/// The register an op belongs to ([`Ledger`]): `"password"` (replace, add, delete) or
/// `"account"` (revoke, resume, remove); none for a lost placeholder.
pub fn register_of(op: Op) -> Option<&'static str> {
    match op {
        Op::Replace | Op::Add | Op::Delete => Some("password"),
        Op::Revoke | Op::Resume | Op::Remove => Some("account"),
        Op::Lost => None,
    }
}

/// Why a record is not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// An agent's placeholder for a change it could not read back from its spool.
    Lost,
    /// The agent may not speak for this user.
    OutOfScope,
    /// This `(agent, seq)` was processed already.
    Replayed,
    /// Older than the user's newest op of the same register.
    Stale,
    /// The user's newest values again (pwsync's own write, reported back).
    Echo,
    /// The account was removed, which is final.
    AfterRemove,
    /// A backfill (a password seen at a login) for a user of whom a real change, or an
    /// account op, was seen: it never overrides.
    BackfillSuperseded,
}

impl Skip {
    /// The counter it is counted under.
    pub fn counter(self) -> &'static str {
        match self {
            Skip::Lost => "lost",
            Skip::OutOfScope => "out_of_scope",
            Skip::Replayed => "replayed",
            Skip::Stale => "stale",
            Skip::Echo => "echo",
            Skip::AfterRemove => "after_remove",
            Skip::BackfillSuperseded => "backfill_superseded",
        }
    }
}

/// The decision for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it at every target that routes it, ordered at `capture` (see [`capture_time`]).
    /// `clock_ahead_ms`: the agent's clock ran this far ahead of the relay's (past
    /// [`MAX_FORWARD_DRIFT_MS`]), to be reported.
    Apply {
        capture: u64,
        clock_ahead_ms: Option<u64>,
    },
    Skip(Skip),
}

/// What the shell knows of a record besides its change.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub agent: &'a str,
    pub seq: u64,
    pub hlc: Hlc,
    /// Where the relay journaled it, and when (its signed time).
    pub offset: u64,
    pub journaled_ms: u64,
    /// The record's envelope, still sealed (kept in a [`ValueTail`] for an add or delete).
    pub envelope: &'a [u8],
    /// Whether the agent may speak for the change's user.
    pub in_scope: bool,
}

/// Decides `change`, carried by `record`, against `ledger`, and records what it decided.
pub fn decide(ledger: &mut impl Ledger, record: Record<'_>, change: &Change) -> Verdict {
    if change.op == Op::Lost {
        return Verdict::Skip(Skip::Lost);
    }
    if !record.in_scope {
        return Verdict::Skip(Skip::OutOfScope);
    }
    if record.seq <= ledger.seen(record.agent) {
        return Verdict::Skip(Skip::Replayed);
    }
    ledger.mark_seen(record.agent, record.seq);
    let (capture, clock_ahead_ms) = capture_time(record.hlc, record.journaled_ms);
    let at = OrderKey {
        capture,
        offset: record.offset,
    };
    match order(ledger, change, at, record.envelope) {
        Some(skip) => Verdict::Skip(skip),
        None => Verdict::Apply {
            capture,
            clock_ahead_ms,
        },
    }
}

/// Where a change stands in the order every target is held to: its capture time
/// ([`capture_time`]), then its journal offset ([`decide`] takes records in journal order, and
/// of two with one capture time the later wins). Retries and dead letters keep theirs, so one
/// applied late never goes over a change after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct OrderKey {
    pub capture: u64,
    pub offset: u64,
}

/// The capture time to order a record by: the smaller of its HLC and the relay's time of
/// journaling it (a change cannot have been captured after that), with ties within one
/// millisecond of relay time going to journal order. Also how far past
/// [`MAX_FORWARD_DRIFT_MS`] the agent's clock ran ahead, if it did.
pub fn capture_time(hlc: Hlc, journaled_ms: u64) -> (u64, Option<u64>) {
    let bound = Hlc::new(journaled_ms, u16::MAX);
    if hlc <= bound {
        return (hlc.0, None);
    }
    let ahead_ms = hlc.physical_ms() - journaled_ms;
    (
        bound.0,
        (ahead_ms > MAX_FORWARD_DRIFT_MS).then_some(ahead_ms),
    )
}

/// Orders `change` (standing at `at`, sealed in `envelope`) against what its user already had,
/// and records it; `Some` when it is not to be applied.
fn order(ledger: &mut impl Ledger, change: &Change, at: OrderKey, envelope: &[u8]) -> Option<Skip> {
    let capture = at.capture;
    let user = change.user.as_str();
    let (account_hlc, account) = ledger.account(user);
    if account == AccountState::Removed {
        return Some(Skip::AfterRemove);
    }
    if change.is_backfill() {
        // A backfill leaves both registers as they are: it is no change of the person's, and a
        // real change captured before it still applies after it.
        let untouched = ledger.user_hlc(user) == 0 && account_hlc == 0;
        return (change.op != Op::Replace || !untouched).then_some(Skip::BackfillSuperseded);
    }
    match change.op {
        Op::Replace | Op::Add | Op::Delete => {
            let newest = ledger.user_hlc(user);
            let tail = ledger.value_tail(user);
            if capture < newest {
                // Late: in its place after the newest replace, or superseded by it.
                return match tail {
                    Some(tail) if at > tail.floor => {
                        let kept = ValueTail::keep(Some(tail), newest, at, change.op, envelope);
                        ledger.set_value_tail(user, kept);
                        None
                    }
                    _ => Some(Skip::Stale),
                };
            }
            if tail.is_some() || change.op != Op::Replace {
                let kept = ValueTail::keep(tail, newest, at, change.op, envelope);
                ledger.set_value_tail(user, kept);
            }
            ledger.set_user_hlc(user, capture);
            if change.op == Op::Replace {
                let fp = ledger.fingerprint_of(user, &change.values);
                if ledger.fingerprint(user) == Some(fp) {
                    return Some(Skip::Echo);
                }
                ledger.set_fingerprint(user, Some(fp));
            } else {
                ledger.set_fingerprint(user, None);
            }
        }
        Op::Revoke | Op::Resume | Op::Remove => {
            if capture < account_hlc && change.op != Op::Remove {
                return Some(Skip::Stale);
            }
            let state = match change.op {
                Op::Revoke => AccountState::Revoked,
                Op::Resume => AccountState::Active,
                _ => AccountState::Removed,
            };
            ledger.set_account(user, capture.max(account_hlc), state);
            ledger.set_fingerprint(user, None);
        }
        Op::Lost => return Some(Skip::Lost),
    }
    None
}

/// Whether a change made on a target's own system is applied there after all. It is not as a
/// rule (G6: the system has it already), unless pwsync wrote a change for that user there at
/// `last_write_ms` at or after the change was captured ([`ORIGIN_CLOCK_TOLERANCE_MS`]): a retry or a
/// backlog that landed after the person's own change, so the system now holds the older value.
/// Then it is applied there too and every system ends at the newest change. (Found by the
/// simulator; a redundant write here costs one echo, which is dropped.)
pub fn restore_at_origin(last_write_ms: Option<u64>, capture: u64) -> bool {
    last_write_ms
        .is_some_and(|w| w.saturating_add(ORIGIN_CLOCK_TOLERANCE_MS) >= Hlc(capture).physical_ms())
}

/// What becomes of a change at one target, before anything is written there
/// ([`at_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtTarget {
    /// Not this target's change (the routing says why).
    NotRouted(&'static str),
    /// A backfill where pwsync has written this user's password (or its record of that cannot
    /// be read): a password seen at a login only fills gaps, so the target keeps what it has.
    BackfillKept,
    /// An earlier change of this user waits at this target: this one queues behind it.
    QueueBehind { account: String, restored: bool },
    /// Applied to `account` now; `restored` when it was made on this system itself and is
    /// applied there after all ([`restore_at_origin`]).
    Apply { account: String, restored: bool },
}

/// The one rule for a change (captured at `capture`) at one target, for the consumer and the
/// simulator alike: routed (or restored at its origin), a backfill only where pwsync never
/// wrote, and behind an earlier change of the user that waits there (`waiting`), so each
/// target gets a user's changes in order. `last_written` reads when pwsync last wrote a change
/// of this user there (read at most once, and only for a restore or a backfill); an unreadable
/// record of that (`Err`) counts as a write (a redundant write is harmless; a missed one leaves
/// the older value). The same rule restores a value op that arrives late at its own system:
/// pwsync wrote the later ops there after they were captured, so after this one was, and
/// applying it there again is followed by them ([`crate::pipeline`]'s replay of a
/// [`ValueTail`]).
pub fn at_target(
    routing: &crate::targets::Routing,
    change: &Change,
    capture: u64,
    last_written: impl FnOnce() -> Result<Option<u64>, ()>,
    waiting: bool,
) -> AtTarget {
    let mut unread = Some(last_written);
    let mut read = None;
    let mut last_written = move || -> Result<Option<u64>, ()> {
        if let Some(f) = unread.take() {
            read = Some(f());
        }
        read.unwrap_or(Err(()))
    };
    let restore = || match last_written() {
        Ok(last) => restore_at_origin(last, capture),
        Err(()) => true,
    };
    let (account, restored) = match routing.route_or_restore(change, restore) {
        Ok(routed) => routed,
        Err(why) => return AtTarget::NotRouted(why),
    };
    if change.is_backfill() && last_written() != Ok(None) {
        return AtTarget::BackfillKept;
    }
    if waiting {
        AtTarget::QueueBehind { account, restored }
    } else {
        AtTarget::Apply { account, restored }
    }
}

/// How far the consumer's clock (which times its writes) and the relay's (which bounds capture
/// times) may disagree for [`restore_at_origin`]: hosts that keep time by NTP agree within
/// milliseconds. Too small misses a restore when the consumer's clock is behind; too large only
/// writes a system's own newest value to it again (one echo, dropped).
pub const ORIGIN_CLOCK_TOLERANCE_MS: u64 = 2_000;

/// Whether, after `change` applied, the account's lock must be put back: a password change of
/// a revoked account (LDAP's ppolicy and htpasswd drop the lock on a new password), so a revoke
/// holds until resume on every target.
pub fn relock_after(change: &Change, account: AccountState) -> bool {
    change.op.carries_values() && account == AccountState::Revoked
}

/// Changes waiting in retry queues, counted per target and user. While one waits, that user's
/// later changes at that target queue behind it, so each target gets a user's changes in order.
#[derive(Debug, Default, Clone)]
pub struct Waiting(HashMap<(String, String), u64>);

impl Waiting {
    /// Whether a change of `user` waits at `target`.
    pub fn holds(&self, target: &str, user: &str) -> bool {
        self.0.contains_key(&(target.to_string(), user.to_string()))
    }
    pub fn add(&mut self, target: &str, user: &str) {
        *self
            .0
            .entry((target.to_string(), user.to_string()))
            .or_default() += 1;
    }
    pub fn remove(&mut self, target: &str, user: &str) {
        let key = (target.to_string(), user.to_string());
        if let Some(n) = self.0.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.remove(&key);
            }
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one attempt at a target came to, as the retry rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Applied,
    /// A passing condition at the target's server.
    RetryLater,
    /// The account does not exist (yet).
    NoSuchUser,
    /// The target itself cannot be used now (its server down, its own login refused).
    Unavailable,
    /// It can never apply as it is.
    Failed,
}

/// What becomes of a change at a target after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    Done,
    /// Try again at this time (ms), as attempt number `attempts` failed.
    RetryAt {
        at_ms: u64,
        attempts: u32,
    },
    DeadLetter,
}

/// The retry schedule's settings (`[retry]`), in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct RetryRules {
    pub base_ms: u64,
    pub max_ms: u64,
    pub no_such_user_ms: u64,
}

/// The retry rules: a passing failure is retried on [`backoff_ms`] for as long as it takes, a
/// missing account for `no_such_user_ms` from its first failure, and a change that can never
/// apply is a dead letter at once. `failed_before` is how many attempts failed already.
pub fn after_attempt(
    attempt: Attempt,
    failed_before: u32,
    first_failed_ms: u64,
    now_ms: u64,
    rules: &RetryRules,
    random: u32,
) -> AfterAttempt {
    let expired = attempt == Attempt::NoSuchUser
        && now_ms.saturating_sub(first_failed_ms) >= rules.no_such_user_ms;
    match attempt {
        Attempt::Applied => AfterAttempt::Done,
        Attempt::RetryLater | Attempt::NoSuchUser | Attempt::Unavailable if !expired => {
            let attempts = failed_before.saturating_add(1);
            AfterAttempt::RetryAt {
                at_ms: now_ms + backoff_ms(attempts, rules.base_ms, rules.max_ms, random),
                attempts,
            }
        }
        _ => AfterAttempt::DeadLetter,
    }
}

/// The delay before retry number `attempts` (1, 2, …): `base_ms` doubling per attempt up to
/// `max_ms`, then a uniformly random point in its upper half (`random` is the randomness).
pub fn backoff_ms(attempts: u32, base_ms: u64, max_ms: u64, random: u32) -> u64 {
    let exp = base_ms.saturating_mul(1u64 << attempts.min(20).saturating_sub(1));
    let top = exp.min(max_ms).max(1);
    top / 2 + u64::from(random) % (top / 2 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::Secret;

    fn record(seq: u64, hlc_ms: u64) -> Record<'static> {
        Record {
            agent: "a",
            seq,
            hlc: Hlc::new(hlc_ms, 0),
            offset: seq,
            journaled_ms: 1_000_000,
            envelope: b"sealed",
            in_scope: true,
        }
    }

    fn change(op: Op, pw: Option<&str>) -> Change {
        Change::new("alice", "x", op, pw.map(Secret::from).into_iter().collect())
    }

    fn backfill(pw: &str) -> Change {
        let mut c = change(Op::Replace, Some(pw));
        c.attributes
            .insert(pwsync_proto::change::BACKFILL_ATTRIBUTE.into(), "1".into());
        c
    }

    #[test]
    fn a_backfill_fills_only_a_user_never_changed_and_never_overrides() {
        let mut l = MemoryLedger::default();
        let apply = |v: Verdict| matches!(v, Verdict::Apply { .. });
        assert!(apply(decide(
            &mut l,
            record(1, 50),
            &backfill("seen-at-login")
        )));
        // It left the registers alone: a real change captured before it still applies.
        assert!(apply(decide(
            &mut l,
            record(2, 10),
            &change(Op::Replace, Some("real"))
        )));
        // Once a real change was seen, no backfill applies, however new.
        assert_eq!(
            decide(&mut l, record(3, 99), &backfill("old-password")),
            Verdict::Skip(Skip::BackfillSuperseded)
        );
        // Nor after an account op, nor as anything but a replace.
        let mut l = MemoryLedger::default();
        assert!(apply(decide(
            &mut l,
            record(1, 5),
            &change(Op::Revoke, None)
        )));
        assert_eq!(
            decide(&mut l, record(2, 6), &backfill("x")),
            Verdict::Skip(Skip::BackfillSuperseded)
        );
        let mut l = MemoryLedger::default();
        let mut delete = backfill("x");
        delete.op = Op::Delete;
        assert_eq!(
            decide(&mut l, record(1, 6), &delete),
            Verdict::Skip(Skip::BackfillSuperseded)
        );
    }

    /// The places (capture ms) of the adds and deletes kept for alice, and the floor's.
    fn kept(l: &MemoryLedger) -> Option<(u64, Vec<u64>)> {
        l.value_tail("alice").map(|t| {
            (
                Hlc(t.floor.capture).physical_ms(),
                t.ops
                    .iter()
                    .map(|k| Hlc(k.at.capture).physical_ms())
                    .collect(),
            )
        })
    }

    #[test]
    fn a_value_op_arriving_late_takes_its_place_after_the_newest_replace() {
        let mut l = MemoryLedger::default();
        let apply = |v: Verdict| matches!(v, Verdict::Apply { .. });
        assert!(apply(decide(
            &mut l,
            record(1, 10),
            &change(Op::Replace, Some("r"))
        )));
        assert_eq!(kept(&l), None, "nothing kept after a replace");
        assert!(apply(decide(
            &mut l,
            record(2, 30),
            &change(Op::Add, Some("a"))
        )));
        assert!(apply(decide(
            &mut l,
            record(3, 40),
            &change(Op::Delete, Some("a"))
        )));
        assert_eq!(kept(&l), Some((10, vec![30, 40])));
        // Captured between them: applied (the shell then applies the later ones again).
        assert!(apply(decide(
            &mut l,
            record(4, 35),
            &change(Op::Add, Some("b"))
        )));
        assert_eq!(kept(&l), Some((10, vec![30, 35, 40])));
        // Before the newest replace: the replace set the whole value after it.
        assert_eq!(
            decide(&mut l, record(5, 9), &change(Op::Add, Some("c"))),
            Verdict::Skip(Skip::Stale)
        );
        // A late replace is the newest replace now: what was before it is gone.
        assert!(apply(decide(
            &mut l,
            record(6, 33),
            &change(Op::Replace, Some("s"))
        )));
        assert_eq!(kept(&l), Some((33, vec![35, 40])));
        let tail = l.value_tail("alice").expect("a tail");
        let at = |ms: u64| OrderKey {
            capture: Hlc::new(ms, 0).0,
            offset: 0,
        };
        assert!(tail.supersedes(at(32)) && !tail.supersedes(at(34)));
        assert_eq!(
            decide(&mut l, record(7, 31), &change(Op::Delete, None)),
            Verdict::Skip(Skip::Stale)
        );
        // A replace in order ends the tail.
        assert!(apply(decide(
            &mut l,
            record(8, 50),
            &change(Op::Replace, Some("t"))
        )));
        assert_eq!(kept(&l), None);
        assert_eq!(
            decide(&mut l, record(9, 45), &change(Op::Add, Some("d"))),
            Verdict::Skip(Skip::Stale)
        );
        // Only so many are kept: one older than those kept is stale.
        for n in 0..VALUE_TAIL_MAX as u64 + 2 {
            assert!(apply(decide(
                &mut l,
                record(10 + n, 100 + n),
                &change(Op::Add, Some("e"))
            )));
        }
        let (floor, ops) = kept(&l).expect("a tail");
        assert_eq!((floor, ops.len()), (101, VALUE_TAIL_MAX));
        assert_eq!(
            decide(&mut l, record(200, 100), &change(Op::Add, Some("f"))),
            Verdict::Skip(Skip::Stale)
        );
        assert!(apply(decide(
            &mut l,
            record(201, 102),
            &change(Op::Add, Some("f"))
        )));
    }

    #[test]
    fn replays_stale_echoes_and_removed_accounts_are_skipped_by_reason() {
        let mut l = MemoryLedger::default();
        let apply = |v: Verdict| matches!(v, Verdict::Apply { .. });
        assert!(apply(decide(
            &mut l,
            record(1, 10),
            &change(Op::Replace, Some("p"))
        )));
        assert_eq!(
            decide(&mut l, record(1, 10), &change(Op::Replace, Some("p"))),
            Verdict::Skip(Skip::Replayed)
        );
        assert_eq!(
            decide(&mut l, record(2, 11), &change(Op::Replace, Some("p"))),
            Verdict::Skip(Skip::Echo)
        );
        assert_eq!(
            decide(&mut l, record(3, 5), &change(Op::Replace, Some("q"))),
            Verdict::Skip(Skip::Stale)
        );
        // Delete clears the fingerprint: the same value again is a real change.
        assert!(apply(decide(
            &mut l,
            record(4, 12),
            &change(Op::Delete, Some("p"))
        )));
        assert!(apply(decide(
            &mut l,
            record(5, 13),
            &change(Op::Replace, Some("p"))
        )));
        // Account register: an older revoke after a newer resume changes nothing.
        assert!(apply(decide(
            &mut l,
            record(6, 20),
            &change(Op::Resume, None)
        )));
        assert_eq!(
            decide(&mut l, record(7, 15), &change(Op::Revoke, None)),
            Verdict::Skip(Skip::Stale)
        );
        assert!(apply(decide(
            &mut l,
            record(8, 1),
            &change(Op::Remove, None)
        )));
        assert_eq!(
            decide(&mut l, record(9, 30), &change(Op::Resume, None)),
            Verdict::Skip(Skip::AfterRemove)
        );
    }

    #[test]
    fn a_clock_ahead_of_the_relay_is_bounded_by_the_relay_and_reported() {
        assert_eq!(
            capture_time(Hlc::new(900, 3), 1_000),
            (Hlc::new(900, 3).0, None)
        );
        let far = 1_000 + MAX_FORWARD_DRIFT_MS + 1;
        assert_eq!(
            capture_time(Hlc::new(far, 0), 1_000),
            (Hlc::new(1_000, u16::MAX).0, Some(MAX_FORWARD_DRIFT_MS + 1))
        );
        assert_eq!(capture_time(Hlc::new(1_001, 0), 1_000).1, None);
    }

    #[test]
    fn failures_are_retried_or_dead_lettered_by_what_fixes_them() {
        let rules = RetryRules {
            base_ms: 100,
            max_ms: 10_000,
            no_such_user_ms: 60_000,
        };
        let at = |a, before, first, now| after_attempt(a, before, first, now, &rules, 0);
        assert_eq!(at(Attempt::Applied, 3, 0, 5), AfterAttempt::Done);
        assert_eq!(
            at(Attempt::RetryLater, 0, 0, 1_000),
            AfterAttempt::RetryAt {
                at_ms: 1_050,
                attempts: 1
            }
        );
        // Passing failures are retried for as long as it takes; a missing account for a while.
        assert!(matches!(
            at(Attempt::Unavailable, 30, 0, 10_000_000),
            AfterAttempt::RetryAt { .. }
        ));
        assert!(matches!(
            at(Attempt::NoSuchUser, 2, 0, 59_999),
            AfterAttempt::RetryAt { .. }
        ));
        assert_eq!(
            at(Attempt::NoSuchUser, 2, 0, 60_000),
            AfterAttempt::DeadLetter
        );
        assert_eq!(at(Attempt::Failed, 0, 0, 0), AfterAttempt::DeadLetter);
        let mut w = Waiting::default();
        w.add("web", "alice");
        w.add("web", "alice");
        assert!(w.holds("web", "alice") && !w.holds("dir", "alice"));
        w.remove("web", "alice");
        assert!(w.holds("web", "alice"));
        w.remove("web", "alice");
        assert!(w.is_empty());
    }

    #[test]
    fn backoff_doubles_to_its_cap_in_the_upper_half() {
        assert_eq!(backoff_ms(1, 1000, 300_000, 0), 500);
        assert_eq!(
            backoff_ms(3, 1000, 300_000, u32::MAX),
            2000 + u64::from(u32::MAX) % 2001
        );
        for r in [0, 7, u32::MAX] {
            let d = backoff_ms(40, 1000, 300_000, r);
            assert!((150_000..=300_000).contains(&d));
        }
    }
}
