//! The pipeline: what happens to one journal record, in order.
//!
//! 1. the relay's signature on the delivery (a batch of consecutive records, binding group and
//!    offsets) verifies, and each record's offset is the next one (older: a redelivery,
//!    dropped; newer: a gap, the relay is asked to go back);
//! 2. the envelope decodes, its agent is enrolled, and [`Opener::open`] verifies the agent's
//!    signature before it decrypts;
//! 3. the agent may speak for the user (agent scope); the `(agent, seq)` is new (replays are
//!    dropped); a change is not older than what this user already had (G3: capture order, by
//!    [`crate::decide`]; a value op older than some adds and deletes but newer than the newest
//!    replace is put in its place, see [`Pipeline::apply_owned`]); a replace is not the echo
//!    of the newest value seen for the user (keyed fingerprint, G6);
//! 4. each target whose routing takes the change (not its origin system, user in scope, name
//!    mapped) applies it, unless that target holds an earlier change of this user in its retry
//!    queue, in which case the change queues behind it;
//! 5. outcomes: applied; retry later / no such user (into the target's durable retry queue);
//!    failed (a dead letter). Queues and dead letters keep the envelope as it arrived, sealed.
//!
//! A record that fails a check is counted by reason, logged without any secret, and committed
//! past: it can never apply, and the stream goes on. The offset is committed to the relay only
//! after the state transaction that records all of the above is durable.

use crate::config::{ConsumerConfig, RetryConfig};
use crate::decide::{
    after_attempt, at_target, decide, register_of, relock_after, AfterAttempt, AtTarget, Attempt,
    OrderKey, Record, RetryRules, Skip, Verdict, Waiting,
};
use crate::state::{DeadLetter, RetryEntry, State, ALL_TARGETS};
use crate::targets::{Configured, Outcome};
use crate::unseal::{Open, OpenResult, Opened, Unsealed};
use glob::Pattern;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::untrusted::{Untrusted, UntrustedReason};
use pwsync_proto::window::{accept, Acceptance};
use pwsync_proto::{Change, Envelope, Offset, Op};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;

use std::collections::{BTreeMap, HashMap};

/// When a change stamped `hlc` was captured, for an operator.
fn captured(hlc: u64) -> String {
    let ms = pwsync_proto::hlc::Hlc(hlc).physical_ms();
    pwsync_runtime::wall_time_ms(ms)
}

/// What the pipeline made of one delivery (a batch of consecutive records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Processed; the committed offset moved to this. Records of the batch beyond a gap (none
    /// in practice: a batch is consecutive) wait for the relay to send them again.
    Advanced(Offset),
    /// Already processed, forged or for another group: nothing to do.
    Ignored,
    /// Beyond the next expected offset: the relay should send again from our cursor.
    Gap,
}

/// Per-target figures for `status`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetStats {
    pub applied: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub retry_depth: u64,
    pub last_applied: Option<LastApplied>,
    /// Why the target itself cannot be used (its server down, its own login refused), from the
    /// last attempt; cleared when a change applies again.
    pub unavailable: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LastApplied {
    pub user: String,
    pub op: String,
    pub agent: String,
    pub seq: u64,
    pub time_ms: u64,
}

/// The consumer's one status report: written to `status.json` in the state folder every second,
/// read back (typed) by `pwsync-consumer status` and `/healthz`, and the source of its metrics.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub group: String,
    pub committed: u64,
    pub counters: BTreeMap<Cow<'static, str>, u64>,
    pub targets: BTreeMap<String, TargetStats>,
    /// user → target → what was last done there for that user, for the last
    /// [`STATUS_USERS`] users the consumer handled.
    pub users: BTreeMap<String, BTreeMap<String, String>>,
    pub written_ms: u64,
    /// Dead letters kept now (every target), for `status` without stopping anything.
    #[serde(default)]
    pub dead_letters: u64,
    /// The users in `users`, oldest first.
    #[serde(skip, default)]
    users_order: std::collections::VecDeque<String>,
}

/// Users whose last outcome `status.json` keeps: bounded, so a directory of any size costs the
/// consumer the same memory and the same status file.
pub const STATUS_USERS: usize = 1_000;

impl StatusReport {
    /// The report a running (or stopped) consumer left at `path`.
    pub fn read(path: &std::path::Path) -> Result<StatusReport, String> {
        let bytes = std::fs::read(path).map_err(|e| {
            format!(
                "reading {}: {e} (is the consumer running with this config?)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not a status report of this build: {e}",
                path.display()
            )
        })
    }

    /// Writes the report to `path` atomically (a reader never sees half of one).
    pub fn write(&self, path: &std::path::Path) -> std::io::Result<()> {
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, path)
    }

    /// `/healthz` for each target: healthy while it applies and holds nothing for a retry.
    pub fn target_checks(&self) -> Vec<pwsync_runtime::observe::Check> {
        use pwsync_runtime::observe::Check;
        self.targets
            .iter()
            .map(|(name, t)| {
                let waiting = t.retry_depth;
                match &t.unavailable {
                    Some(why) => Check::new(
                        "target",
                        false,
                        format!("{name}: unavailable ({why}); {waiting} changes waiting"),
                    ),
                    None if waiting == 0 => Check::new("target", true, format!("{name}: applying")),
                    None => Check::new(
                        "target",
                        false,
                        format!("{name}: {waiting} changes waiting to be retried"),
                    ),
                }
            })
            .collect()
    }

    /// Records what was done for `user` at `target`, forgetting the user first seen longest ago
    /// once more than [`STATUS_USERS`] are kept.
    fn note(&mut self, user: &str, target: &str, what: String) {
        let targets = match self.users.get_mut(user) {
            Some(t) => t,
            None => {
                if self.users.len() >= STATUS_USERS {
                    if let Some(oldest) = self.users_order.pop_front() {
                        self.users.remove(&oldest);
                    }
                }
                self.users_order.push_back(user.to_string());
                self.users.entry(user.to_string()).or_default()
            }
        };
        targets.insert(target.to_string(), what);
    }
}

/// Checks every target once, at start-up: a configuration error stops the consumer; a target
/// that is only down now is logged, and its changes are retried later.
pub fn check_targets(targets: &[Configured]) -> anyhow::Result<()> {
    for t in targets {
        match t.target.check() {
            Ok(()) => {}
            Err(crate::targets::Unusable::Config(e)) => {
                anyhow::bail!(
                    "target {}: {e}; fix the configuration and start again",
                    t.name
                )
            }
            Err(e) => {
                tracing::warn!(target = %t.name, error = %Untrusted(&e.to_string()), "target not usable now; its changes will be retried")
            }
        }
    }
    Ok(())
}

/// The wall clock, in ms since the epoch: [`wall_ms`] in the daemon, the simulator's in it.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;
/// Randomness for the retry schedule's jitter.
pub type Jitter = Arc<dyn Fn() -> u32 + Send + Sync>;

pub struct Pipeline {
    pub state: State,
    /// Opens kept envelopes again (retries, dead letters).
    opener: Arc<dyn Open>,
    clock: Clock,
    jitter: Jitter,
    targets: Vec<Configured>,
    agent_scope: HashMap<String, Vec<Pattern>>,
    default_scope: Vec<Pattern>,
    retry: RetryConfig,
    dry_run: bool,
    waiting: Waiting,
    pub status: StatusReport,
}

fn patterns(list: &[String]) -> Result<Vec<Pattern>, String> {
    list.iter()
        .map(|p| Pattern::new(p).map_err(|e| format!("pattern {p:?}: {e}")))
        .collect()
}

impl Pipeline {
    /// The pipeline of `cfg`'s group over `state` and `targets`, opening kept envelopes with
    /// `opener`, on the wall clock (see [`Pipeline::with_clock`]).
    pub fn new(
        cfg: &ConsumerConfig,
        state: State,
        opener: Arc<dyn Open>,
        targets: Vec<Configured>,
        dry_run: bool,
    ) -> anyhow::Result<Pipeline> {
        let mut agent_scope = HashMap::new();
        for (agent, list) in &cfg.agent_scope {
            agent_scope.insert(
                agent.clone(),
                patterns(list).map_err(|e| anyhow::anyhow!("agent_scope.{agent}: {e}"))?,
            );
        }
        let mut p = Pipeline {
            state,
            opener,
            clock: Arc::new(wall_ms),
            jitter: Arc::new(|| {
                let mut r = [0u8; 4];
                let _ = aws_lc_rs::rand::fill(&mut r);
                u32::from_le_bytes(r)
            }),
            agent_scope,
            default_scope: patterns(&cfg.default_agent_scope).map_err(anyhow::Error::msg)?,
            retry: cfg.retry.clone(),
            dry_run,
            waiting: Waiting::default(),
            status: StatusReport {
                group: cfg.group.to_string(),
                ..Default::default()
            },
            targets,
        };
        for t in &p.targets {
            p.status
                .targets
                .insert(t.name.clone(), TargetStats::default());
        }
        for (_, e) in p.state.retries()? {
            p.waiting.add(&e.target, &e.user);
            if let Some(s) = p.status.targets.get_mut(&e.target) {
                s.retry_depth += 1;
            }
        }
        p.status.committed = p.state.committed().0;
        p.status.dead_letters = p.state.dead_letter_count()?;
        let quarantined = p.state.quarantined()?;
        if quarantined > 0 {
            p.status
                .counters
                .insert(Cow::Borrowed("quarantined"), quarantined);
            tracing::error!(quarantined, "consumer state records that cannot be read are kept in its quarantine table and not applied; a newer build may read them");
        }
        Ok(p)
    }

    /// Target `i` applies `change` to `account`; the time it took is recorded per target.
    fn apply_timed(&self, i: usize, change: &Change, account: &str) -> Outcome {
        let started = std::time::Instant::now();
        let outcome = self.targets[i].apply(change, account);
        metrics::histogram!("pwsync_consumer_apply_seconds", "target" => self.targets[i].name.clone())
            .record(started.elapsed().as_secs_f64());
        outcome
    }

    fn count(&mut self, what: &'static str) {
        *self.status.counters.entry(Cow::Borrowed(what)).or_default() += 1;
    }

    fn reject(&mut self, what: &'static str, detail: &str) {
        self.count(what);
        tracing::warn!(reason = what, detail = %Untrusted(detail), "change not applied");
    }

    /// The same pipeline on another clock and randomness (the simulator's).
    pub fn with_clock(mut self, clock: Clock, jitter: Jitter) -> Pipeline {
        self.clock = clock;
        self.jitter = jitter;
        self
    }

    /// The pipeline stops: its state, as it is (flushed or not).
    pub fn into_state(self) -> State {
        self.state
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Handles one delivery from the relay, unsealed by [`crate::unseal::Unsealer::unseal`].
    pub fn take(&mut self, delivery: Unsealed) -> Taken {
        let records = match delivery {
            Unsealed::Records(records) => records,
            Unsealed::Forged(detail) => {
                self.reject("forged_delivery", &detail);
                return Taken::Ignored;
            }
            Unsealed::Pruned(next) => return self.take_up_after_pruned(next),
        };
        let mut advanced = None;
        for record in records {
            let offset = record.offset;
            match accept(self.state.committed().0, offset.0) {
                Acceptance::Duplicate => continue, // a redelivery of what is processed already
                Acceptance::Gap { .. } => return advanced.map_or(Taken::Gap, Taken::Advanced),
                Acceptance::Next => {}
            }
            self.process(&record.bytes, offset.0, record.journaled_ms, record.opened);
            self.state.set_committed(offset);
            self.status.committed = offset.0;
            advanced = Some(offset);
        }
        advanced.map_or(Taken::Ignored, Taken::Advanced)
    }

    /// The relay holds no record below `next`: records after our committed offset and below
    /// `next` were deleted while this group was not declared at the relay (a group declared
    /// later), or after this group committed them (a consumer whose state folder was lost or
    /// replaced). Nothing of them can be applied; we take up at `next`, and say so.
    fn take_up_after_pruned(&mut self, next: Offset) -> Taken {
        let committed = self.state.committed();
        if next.0 <= committed.0.saturating_add(1) {
            return Taken::Ignored;
        }
        let at = Offset(next.0 - 1);
        tracing::warn!(
            from = committed.0 + 1,
            to = at.0,
            "the relay no longer holds these journal offsets (deleted while this group was not declared at the relay, or after this group committed them and this consumer's state was lost); taking up after them. Their changes were not applied by this consumer: a password changed before then reaches its targets at the person's next change or login backfill"
        );
        *self
            .status
            .counters
            .entry(Cow::Borrowed("pruned_offsets_skipped"))
            .or_default() += at.0 - committed.0;
        self.state.set_committed(at);
        self.status.committed = at.0;
        Taken::Advanced(at)
    }

    /// Whether `agent` may speak for `user`: by the scope its certificate carries, or by
    /// `[agent_scope]` for an agent enrolled by key file.
    fn scope_admits(&self, agent: &str, certified: Option<&[String]>, user: &str) -> bool {
        if let Some(scope) = certified {
            return scope
                .iter()
                .any(|p| Pattern::new(p).is_ok_and(|p| p.matches(user)));
        }
        self.agent_scope
            .get(agent)
            .unwrap_or(&self.default_scope)
            .iter()
            .any(|p| p.matches(user))
    }

    /// Takes one record (journaled at `offset`, `journaled_ms`) through the steps above.
    fn process(&mut self, bytes: &[u8], offset: u64, journaled_ms: u64, opened: OpenResult) {
        self.count("records");
        let Opened {
            agent,
            seq,
            hlc,
            change,
            certified,
        } = match opened {
            Ok(x) => x,
            Err((why, detail)) => {
                if why.may_open_later() && !self.dry_run {
                    self.keep_unopened(bytes, offset, why.counter(), &detail);
                }
                return self.reject(why.counter(), &detail);
            }
        };
        let record = Record {
            agent: &agent,
            seq,
            hlc,
            offset,
            journaled_ms,
            envelope: bytes,
            in_scope: self.scope_admits(&agent, certified.as_deref(), &change.user),
        };
        let capture = match decide(&mut self.state, record, &change) {
            Verdict::Apply {
                capture,
                clock_ahead_ms,
            } => {
                if let Some(ahead_ms) = clock_ahead_ms {
                    self.count("clock_ahead");
                    metrics::counter!("pwsync_consumer_clock_ahead_total", "agent" => agent.clone())
                        .increment(1);
                    let ahead_s = ahead_ms / 1000;
                    tracing::warn!(%agent, ahead_s, "this agent's clock ran ahead of the relay's; its change is ordered by the relay's time (fix the host's clock)");
                }
                capture
            }
            Verdict::Skip(skip) => return self.skipped(skip, &agent, seq, &change),
        };
        if change.is_backfill() {
            self.count("backfill");
        }
        let at = OrderKey { capture, offset };
        for i in 0..self.targets.len() {
            let name = self.targets[i].name.clone();
            let step = at_target(
                &self.targets[i].routing,
                &change,
                capture,
                || self.state.written(&name, &change.user).map_err(|_| ()),
                self.waiting.holds(&name, &change.user),
            );
            let (account, restored, queue) = match step {
                AtTarget::NotRouted(why) => {
                    tracing::debug!(target = %name, user = %Untrusted(&change.user), why, "not routed");
                    continue;
                }
                AtTarget::BackfillKept => {
                    tracing::info!(target = %name, user = %Untrusted(&change.user), seq, "backfill not applied here: pwsync has written this user's password here");
                    continue;
                }
                AtTarget::QueueBehind { account, restored } => (account, restored, true),
                AtTarget::Apply { account, restored } => (account, restored, false),
            };
            if restored {
                self.count("origin_restored");
                tracing::info!(target = %name, user = %Untrusted(&change.user), %agent, seq, "made on this system, but pwsync wrote an older change there since: applied there too");
            }
            if self.dry_run {
                tracing::info!(target = %name, user = %Untrusted(&change.user), account = %Untrusted(&account), op = %change.op, %agent, seq, "dry run: would apply");
                continue;
            }
            let entry = RetryEntry {
                target: name.clone(),
                user: change.user.clone(),
                op: change.op,
                agent: agent.clone(),
                seq,
                capture,
                offset,
                envelope: bytes.to_vec(),
                attempts: 0,
                next_at_ms: self.now(),
                first_failed_ms: self.now(),
                last_error: String::new(),
            };
            if queue {
                tracing::info!(target = %name, user = %Untrusted(&change.user), seq, "queued behind an earlier change of this user");
                self.enqueue(entry);
                continue;
            }
            let outcome = self.apply_owned(i, &change, &account, at);
            let backfilled = change.is_backfill() && outcome == Outcome::Applied;
            self.settle(None, entry, outcome);
            if backfilled {
                self.count("backfill_applied");
                self.status.note(
                    &change.user,
                    &name,
                    format!("applied replace as a backfill (agent {agent} seq {seq}): a password seen at a login, where pwsync had written none"),
                );
            }
        }
    }

    /// Counts and logs a record [`decide`] did not apply, by its reason.
    fn skipped(&mut self, skip: Skip, agent: &str, seq: u64, change: &Change) {
        let user = Untrusted(&change.user);
        let op = change.op;
        match skip {
            Skip::Lost => {
                self.count(skip.counter());
                tracing::error!(%agent, seq, "agent {agent} lost change {seq} (an unreadable spool record); the person may need to set the password again");
            }
            Skip::OutOfScope => self.reject(
                skip.counter(),
                &format!("agent {agent} may not speak for user {}", change.user),
            ),
            Skip::Replayed => self.reject(
                skip.counter(),
                &format!("agent {agent} seq {seq} was already processed"),
            ),
            Skip::Stale => {
                self.count(skip.counter());
                tracing::info!(%user, %agent, seq, %op, "older change skipped: a newer one of its kind (password or account) for this user was already applied");
            }
            Skip::Echo => {
                self.count(skip.counter());
                tracing::info!(%user, origin = %Untrusted(&change.origin), "echo of the newest value dropped");
            }
            Skip::BackfillSuperseded => {
                self.count(skip.counter());
                tracing::info!(%user, %agent, seq, "backfill not applied: a real change (or an account op) of this user was seen, which a password seen at a login never overrides");
            }
            Skip::AfterRemove => {
                self.count(skip.counter());
                tracing::warn!(%user, %agent, seq, %op, "not applied: the account was removed, which is final");
                for t in &self.targets {
                    self.status.note(
                        &change.user,
                        &t.name,
                        format!("{op} not applied: the account was removed (final)"),
                    );
                }
            }
        }
    }

    /// Applies `change` (standing at `at`) at target `i` unless another source user holds
    /// `account` there: the first source user whose change applied to an account holds it (as
    /// the target folds names), and a change for another user that the target takes for the
    /// same account (`Alice` and `alice` on LDAP, two users a `map` joins) is refused with both
    /// names and counted (`account_collision`), so neither overwrites the other. Once the change
    /// is written, the target is on it (standing at `at` in the order), whatever follows: its
    /// user holds the account, and `written` and `newest` say so.
    ///
    /// A value op is followed by the user's kept adds and deletes after it ([`ValueTail`]) that
    /// this target has: those pwsync wrote here (up to the newest it wrote) and those made on
    /// this system itself. So a value op that arrives late takes its place in capture order:
    /// each value is decided by the last op touching it, as if they had all arrived in order.
    ///
    /// [`ValueTail`]: crate::decide::ValueTail
    fn apply_owned(&mut self, i: usize, change: &Change, account: &str, at: OrderKey) -> Outcome {
        let t = &self.targets[i];
        let (name, folding) = (t.name.clone(), t.limits.folding);
        let folded = folding.fold(account);
        let owner = match self.state.owner(&name, &folded) {
            Ok(o) => o,
            Err(e) => return Outcome::RetryLater(e.to_string()),
        };
        if let Some(owner) = owner.as_ref().filter(|o| **o != change.user) {
            self.count("account_collision");
            return Outcome::Failed(format!(
                "refused: account {account:?} here is held by source user {owner:?}, and user {:?} is the same account under this target's {} name matching; give one of them an account of its own ([targets.{name}] map) and retry",
                change.user,
                folding.describe()
            ));
        }
        let register = register_of(change.op);
        let written_before = match register {
            Some(r) => match self.state.newest_applied(&name, &change.user, r) {
                Ok(n) => n,
                Err(e) => return Outcome::RetryLater(e.to_string()),
            },
            None => None,
        };
        let outcome = self.apply_timed(i, change, account);
        if outcome != Outcome::Applied {
            return outcome;
        }
        // The account is written now, even if its lock cannot be put back yet (that is retried
        // with the whole change): it is this user's, and no older change goes over it.
        if owner.is_none() {
            self.state.set_owner(&name, &folded, &change.user);
        }
        self.state.set_written(&name, &change.user, self.now());
        // A backfill stands outside the registers: a real change captured before it still
        // applies after it.
        if let Some(register) = register.filter(|_| !change.is_backfill()) {
            self.state
                .set_newest_applied(&name, &change.user, register, at);
        }
        if change.op.carries_values() && !change.is_backfill() {
            let replayed = self.apply_later_value_ops(i, change, at, written_before);
            if replayed != Outcome::Applied {
                return replayed;
            }
        }
        let outcome = self.lock_again_if_revoked(i, change, account);
        if outcome == Outcome::Applied && change.op.carries_values() {
            self.mark_for_audit(i, &change.user, account);
        }
        outcome
    }

    /// Keeps what target `i` records of `account`'s password right after pwsync wrote it (its
    /// change time, a keyed fingerprint of the stored hash, or a key version), so the account
    /// audit can tell pwsync's write from a later one made outside it ([`crate::audit`]).
    fn mark_for_audit(&mut self, i: usize, user: &str, account: &str) {
        let observed = self.targets[i].target.observe(account);
        if matches!(observed, crate::audit::Observed::Unsupported) {
            return;
        }
        let name = self.targets[i].name.clone();
        let mark = crate::audit::WriteMark::of(self.now(), &observed, |stored| {
            self.state.fingerprint_verifier(&name, account, stored)
        });
        self.state.set_audit_mark(&name, user, mark);
    }

    /// After value op `change` at `at` applied at target `i`, applies again the user's kept
    /// adds and deletes after it that the target has: written there by pwsync (at or before
    /// `written_before`, the newest it wrote) or made on that system itself. One the target
    /// refuses for good is left as it is (it was refused when it came, or is refused now; its
    /// dead letter, if any, stands); one that cannot be applied yet makes `change` retried,
    /// with them all.
    fn apply_later_value_ops(
        &mut self,
        i: usize,
        change: &Change,
        at: OrderKey,
        written_before: Option<OrderKey>,
    ) -> Outcome {
        let Some(tail) = self.state.value_tail(&change.user) else {
            return Outcome::Applied;
        };
        let name = self.targets[i].name.clone();
        for kept in tail.after(at) {
            let later = match self.opener.open(&kept.envelope) {
                Ok(opened) => opened.change,
                Err((why, detail)) => {
                    return Outcome::Failed(format!(
                        "applied, but a later add or delete of the user, to be applied again after it, cannot be opened ({}): {detail}",
                        why.counter()
                    ))
                }
            };
            let Ok((account, made_here)) =
                self.targets[i].routing.route_or_restore(&later, || true)
            else {
                continue;
            };
            if !made_here && written_before.is_none_or(|w| kept.at > w) {
                continue; // not written here yet: it comes after, in order
            }
            self.count("value_ops_reapplied");
            match self.apply_timed(i, &later, &account) {
                Outcome::Applied => {}
                Outcome::Failed(e) => {
                    tracing::warn!(target = %name, user = %Untrusted(&change.user), op = %later.op, error = %UntrustedReason(&e), "a later add or delete, applied again after an earlier one that arrived late, was refused; left as it is")
                }
                Outcome::RetryLater(e) | Outcome::NoSuchUser(e) => {
                    return Outcome::RetryLater(format!(
                        "applied, but a later add or delete of the user could not be applied again after it yet: {e}"
                    ))
                }
                Outcome::Unavailable(e) => {
                    return Outcome::Unavailable(format!(
                        "applied, but a later add or delete of the user could not be applied again after it yet: {e}"
                    ))
                }
            }
        }
        Outcome::Applied
    }

    /// After `change` applied at target `i`, keeps the account as the account ops left it: after
    /// a password change of a revoked account the lock is put back (LDAP's ppolicy and htpasswd
    /// drop it on a new password), so a revoke holds until resume on every target. A lock that
    /// cannot be put back makes the whole change retried.
    fn lock_again_if_revoked(&self, i: usize, change: &Change, account: &str) -> Outcome {
        if !relock_after(change, self.state.account(&change.user).1) {
            return Outcome::Applied;
        }
        let lock = Change::new(
            change.user.clone(),
            change.origin.clone(),
            Op::Revoke,
            vec![],
        );
        match self.apply_timed(i, &lock, account) {
            Outcome::Applied => Outcome::Applied,
            Outcome::Failed(e) => Outcome::Failed(format!(
                "the password was set but the account's lock could not be put back: {e}"
            )),
            Outcome::RetryLater(e) | Outcome::NoSuchUser(e) => Outcome::RetryLater(format!(
                "the password was set but the account's lock could not be put back yet: {e}"
            )),
            Outcome::Unavailable(e) => Outcome::Unavailable(format!(
                "the password was set but the account's lock could not be put back yet: {e}"
            )),
        }
    }

    /// A record signed by an agent this consumer does not know (yet), or sealed for a key it does
    /// not hold (yet), may be genuine: the relay checked its signature. It is kept sealed as a
    /// dead letter for every target (`target = "*"`), so an operator who enrols the agent or
    /// adds the key can `deadletter retry` it instead of the change being lost.
    fn keep_unopened(&mut self, bytes: &[u8], offset: u64, why: &str, detail: &str) {
        let (agent, seq) = Envelope::decode(bytes)
            .map(|e| (e.agent().to_string(), e.seq().0))
            .unwrap_or_else(|_| ("?".into(), 0));
        self.status.dead_letters += 1;
        self.state.dead_letter(DeadLetter {
            target: ALL_TARGETS.into(),
            user: "?".into(),
            op: Op::Lost,
            agent,
            seq,
            capture: 0,
            offset,
            error: format!(
                "{why}: {detail}; enrol the agent or add the key, then `deadletter retry`"
            ),
            time_ms: self.now(),
            envelope: bytes.to_vec(),
        });
    }

    fn retry_rules(&self) -> RetryRules {
        RetryRules {
            base_ms: self.retry.base_ms,
            max_ms: self.retry.max_secs.saturating_mul(1000),
            no_such_user_ms: self.retry.no_such_user_secs.saturating_mul(1000),
        }
    }

    fn enqueue(&mut self, entry: RetryEntry) {
        self.waiting.add(&entry.target, &entry.user);
        if let Some(s) = self.status.targets.get_mut(&entry.target) {
            s.retry_depth += 1;
        }
        self.state.queue_retry(entry);
    }

    fn dequeue(&mut self, id: u64, entry: &RetryEntry) {
        self.state.remove_retry(id);
        self.waiting.remove(&entry.target, &entry.user);
        if let Some(s) = self.status.targets.get_mut(&entry.target) {
            s.retry_depth = s.retry_depth.saturating_sub(1);
        }
    }

    /// Records an outcome. `queued` is the retry id when the entry came from the retry queue.
    fn settle(&mut self, queued: Option<u64>, mut entry: RetryEntry, outcome: Outcome) {
        let now = self.now();
        let note = |s: &mut StatusReport, e: &RetryEntry, what: String| {
            s.note(&e.user, &e.target, what);
        };
        if let Some(s) = self.status.targets.get_mut(&entry.target) {
            let up = match &outcome {
                Outcome::Unavailable(e) => {
                    if s.unavailable.is_none() {
                        tracing::error!(target = %entry.target, error = %Untrusted(e), "target unavailable: its changes wait and are retried");
                    }
                    s.unavailable = Some(e.clone());
                    false
                }
                Outcome::Applied => {
                    s.unavailable = None;
                    true
                }
                _ => s.unavailable.is_none(),
            };
            metrics::gauge!("pwsync_consumer_target_up", "target" => entry.target.clone())
                .set(if up { 1.0 } else { 0.0 });
        }
        let attempt = match &outcome {
            Outcome::Applied => Attempt::Applied,
            Outcome::RetryLater(_) => Attempt::RetryLater,
            Outcome::NoSuchUser(_) => Attempt::NoSuchUser,
            Outcome::Unavailable(_) => Attempt::Unavailable,
            Outcome::Failed(_) => Attempt::Failed,
        };
        let next = after_attempt(
            attempt,
            entry.attempts,
            entry.first_failed_ms,
            now,
            &self.retry_rules(),
            (self.jitter)(),
        );
        let reason = outcome.reason().to_string();
        match next {
            AfterAttempt::Done => {
                if let Some(id) = queued {
                    self.dequeue(id, &entry);
                }
                let s = self.status.targets.entry(entry.target.clone()).or_default();
                s.applied += 1;
                s.last_applied = Some(LastApplied {
                    user: entry.user.clone(),
                    op: entry.op.to_string(),
                    agent: entry.agent.clone(),
                    seq: entry.seq,
                    time_ms: now,
                });
                note(
                    &mut self.status,
                    &entry,
                    format!(
                        "applied {} (agent {} seq {})",
                        entry.op, entry.agent, entry.seq
                    ),
                );
                tracing::info!(target = %entry.target, user = %Untrusted(&entry.user), op = %entry.op, agent = %entry.agent, seq = entry.seq, "applied");
            }
            AfterAttempt::RetryAt { at_ms, attempts } => {
                entry.attempts = attempts;
                entry.next_at_ms = at_ms;
                entry.last_error = reason;
                if let Some(s) = self.status.targets.get_mut(&entry.target) {
                    s.retried += 1;
                }
                tracing::warn!(target = %entry.target, user = %Untrusted(&entry.user), attempts = entry.attempts, error = %UntrustedReason(&entry.last_error), "will retry");
                note(
                    &mut self.status,
                    &entry,
                    format!(
                        "retrying {} (attempt {}): {}",
                        entry.op, entry.attempts, entry.last_error
                    ),
                );
                match queued {
                    Some(id) => self.state.update_retry(id, entry),
                    None => self.enqueue(entry),
                }
            }
            AfterAttempt::DeadLetter => {
                let e = reason;
                if let Some(id) = queued {
                    self.dequeue(id, &entry);
                }
                if let Some(s) = self.status.targets.get_mut(&entry.target) {
                    s.dead_lettered += 1;
                }
                self.status.dead_letters += 1;
                tracing::error!(target = %entry.target, user = %Untrusted(&entry.user), op = %entry.op, error = %UntrustedReason(&e), "dead letter");
                note(
                    &mut self.status,
                    &entry,
                    format!("dead letter {}: {e}", entry.op),
                );
                self.state.dead_letter(DeadLetter {
                    target: entry.target,
                    user: entry.user,
                    op: entry.op,
                    agent: entry.agent,
                    seq: entry.seq,
                    capture: entry.capture,
                    offset: entry.offset,
                    error: e,
                    time_ms: now,
                    envelope: entry.envelope,
                });
            }
        }
    }

    /// Applies what is due in the retry queues: per target and user only the oldest entry, so a
    /// user's changes stay in order. Returns how many were tried.
    pub fn run_retries(&mut self) -> anyhow::Result<usize> {
        if self.waiting.is_empty() || self.dry_run {
            return Ok(0);
        }
        self.state.flush()?;
        let now = self.now();
        let mut oldest: BTreeMap<(String, String), (u64, RetryEntry)> = BTreeMap::new();
        for (id, e) in self.state.retries()? {
            oldest
                .entry((e.target.clone(), e.user.clone()))
                .or_insert((id, e));
        }
        let mut tried = 0;
        for (_, (id, entry)) in oldest {
            if entry.next_at_ms > now {
                continue;
            }
            tried += 1;
            let Some(i) = self.targets.iter().position(|t| t.name == entry.target) else {
                self.settle(
                    Some(id),
                    entry,
                    Outcome::Failed("target no longer configured".into()),
                );
                continue;
            };
            let opened = self.opener.open(&entry.envelope);
            if let Ok(Opened { change, .. }) = &opened {
                if self.superseded(change, entry.order_key()) {
                    self.settle_superseded(id, entry);
                    continue;
                }
            }
            let outcome = match opened {
                // Never over a newer change applied there since it was queued (a dead letter
                // put back by an operator while the consumer was stopped).
                Ok(Opened { change, .. })
                    if self.newest_applied_after(i, &change, entry.order_key()) =>
                {
                    Outcome::Failed(format!(
                        "not applied: a newer {} change of {} is already applied here, which this older one would overwrite",
                        register_of(change.op).unwrap_or("lost"),
                        change.user
                    ))
                }
                // Queued for the system it was made on, it was queued as a restore.
                Ok(Opened { change, .. }) => {
                    match self.targets[i].routing.route_or_restore(&change, || true) {
                        Ok((account, _)) => {
                            self.apply_owned(i, &change, &account, entry.order_key())
                        }
                        Err(why) => Outcome::Failed(format!("no longer routed here: {why}")),
                    }
                }
                Err((why, detail)) => Outcome::Failed(format!(
                    "cannot open the queued change ({}): {detail}",
                    why.counter()
                )),
            };
            self.settle(Some(id), entry, outcome);
        }
        Ok(tried)
    }

    /// Retries the dead letters `ids` (all when empty) now, for an operator, saying what became
    /// of each in words (`say`) and how far it got (`progress`). A letter kept for every target
    /// (not opened when it arrived) is processed as if it arrived now, through [`decide`]. One
    /// kept for a target is applied there, unless that would go back in time: a newer change of
    /// the same kind for the user already applied there, or waiting in its retry queue, or
    /// the account removed. Those are refused and kept, with the reason.
    pub fn retry_dead_letters(
        &mut self,
        ids: &[u64],
        say: &mut dyn FnMut(String),
        progress: &mut dyn FnMut(u64, u64),
    ) -> anyhow::Result<()> {
        self.state.flush()?;
        let chosen: Vec<(u64, DeadLetter)> = self
            .state
            .dead_letters()?
            .into_iter()
            .filter(|(id, _)| ids.is_empty() || ids.contains(id))
            .collect();
        for wanted in ids {
            if !chosen.iter().any(|(id, _)| id == wanted) {
                say(format!("{wanted}: no such dead letter"));
            }
        }
        let total = chosen.len() as u64;
        for (n, (id, d)) in chosen.into_iter().enumerate() {
            progress(n as u64, total);
            let line = self.retry_one_dead_letter(id, d)?;
            say(format!("{id}: {line}"));
            // Each letter's outcome is durable before the next is tried.
            self.state.flush()?;
        }
        progress(total, total);
        self.status.dead_letters = self.state.dead_letter_count()?;
        Ok(())
    }

    fn retry_one_dead_letter(&mut self, id: u64, d: DeadLetter) -> anyhow::Result<String> {
        let change = match self.opener.open(&d.envelope) {
            Ok(opened) => {
                if d.target == ALL_TARGETS {
                    // Never through `decide` yet: it is processed as the record it was.
                    let user = opened.change.user.clone();
                    self.process(&d.envelope, d.offset, d.time_ms, Ok(opened));
                    self.state.remove_dead(id);
                    let what = self.status.users.get(&user).map(|m| {
                        m.iter()
                            .map(|(t, w)| format!("{t}: {w}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    });
                    return Ok(format!(
                        "opened and processed as it arrived (user {user}): {}",
                        what.unwrap_or_else(|| "applied nowhere (see the log)".into())
                    ));
                }
                opened.change
            }
            Err((why, detail)) => {
                return Ok(format!(
                    "kept: still cannot be opened ({}): {detail}",
                    why.counter()
                ))
            }
        };
        let Some(i) = self.targets.iter().position(|t| t.name == d.target) else {
            return Ok(format!(
                "kept: target {} is no longer configured (add it back and reload, or drop this letter)",
                d.target
            ));
        };
        let user = change.user.clone();
        if let Some(why) = self.newer_than(&d.target, &change, d.order_key())? {
            self.count("retry_refused_older");
            return Ok(format!(
                "refused, kept: {why}; applying this older {} of {user} would overwrite it. Drop it with `deadletter drop {id}`",
                change.op
            ));
        }
        let entry = RetryEntry {
            target: d.target.clone(),
            user: user.clone(),
            op: d.op,
            agent: d.agent.clone(),
            seq: d.seq,
            capture: d.capture,
            offset: d.offset,
            envelope: d.envelope.clone(),
            attempts: 0,
            next_at_ms: self.now(),
            first_failed_ms: self.now(),
            last_error: String::new(),
        };
        self.state.remove_dead(id);
        if self.waiting.holds(&d.target, &user) {
            self.enqueue(entry);
            return Ok(format!(
                "queued at {} behind an earlier change of {user} that waits for a retry",
                d.target
            ));
        }
        let outcome = match self.targets[i].routing.route_or_restore(&change, || true) {
            Ok((account, _)) => self.apply_owned(i, &change, &account, d.order_key()),
            Err(why) => Outcome::Failed(format!("no longer routed here: {why}")),
        };
        let line = match &outcome {
            Outcome::Applied => format!("applied {} of {user} at {}", change.op, d.target),
            Outcome::Failed(e) => format!(
                "failed again at {}, kept as a new dead letter: {e}",
                d.target
            ),
            Outcome::RetryLater(e) | Outcome::NoSuchUser(e) | Outcome::Unavailable(e) => {
                format!("not applied yet at {} ({e}): in its retry queue", d.target)
            }
        };
        self.settle(None, entry, outcome);
        Ok(line)
    }

    /// Why a change of `change.user` standing at `at` must not apply at `target` now: a newer
    /// one of its register applied there or waiting in its retry queue, or the account removed.
    fn newer_than(
        &self,
        target: &str,
        change: &Change,
        at: OrderKey,
    ) -> anyhow::Result<Option<String>> {
        let user = &change.user;
        if change.op != Op::Remove
            && self.state.account(user).1 == crate::state::AccountState::Removed
        {
            return Ok(Some(format!(
                "the account {user} was removed, which is final"
            )));
        }
        let Some(register) = register_of(change.op) else {
            return Ok(Some("it is a lost change's placeholder".into()));
        };
        // A remove is final whenever it was captured: nothing newer stands in its way. A value
        // op after the newest replace takes its place, the later adds and deletes after it.
        if change.op == Op::Remove || self.value_op_in_its_place(change, at) {
            return Ok(None);
        }
        if let Some(newest) = self.state.newest_applied(target, user, register)? {
            if newest > at {
                return Ok(Some(format!(
                    "a newer {register} change of {user} (captured {}, this one {}) is already applied at {target}",
                    captured(newest.capture),
                    captured(at.capture)
                )));
            }
        }
        if self.waiting.holds(target, user) {
            for (_, queued) in self.state.retries()? {
                if queued.target != target || &queued.user != user {
                    continue;
                }
                if queued.order_key() > at && register_of(queued.op) == Some(register) {
                    return Ok(Some(format!(
                        "a newer {register} change of {user} (agent {} seq {}) waits in {target}'s retry queue",
                        queued.agent, queued.seq
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Whether a change of the same register later than `at` in the order applied at target `i` for
    /// `change.user`, which this one would go over (an unreadable record counts as none: the
    /// queue's order stands). A remove is final whenever it was captured, and a value op after
    /// the newest replace takes its place ([`Pipeline::value_op_in_its_place`]).
    fn newest_applied_after(&self, i: usize, change: &Change, at: OrderKey) -> bool {
        change.op != Op::Remove
            && !self.value_op_in_its_place(change, at)
            && register_of(change.op).is_some_and(|register| {
            matches!(self.state.newest_applied(&self.targets[i].name, &change.user, register), Ok(Some(n)) if n > at)
        })
    }

    /// Whether value op `change` at `at` was captured before the user's newest replace, which
    /// sets the whole value after it (and reaches each target after it, or is there already).
    fn superseded(&self, change: &Change, at: OrderKey) -> bool {
        if !change.op.carries_values() || change.is_backfill() {
            return false;
        }
        match self.state.value_tail(&change.user) {
            Some(tail) => tail.supersedes(at),
            // The newest value op is a replace.
            None => at.capture < self.state.user_hlc(&change.user),
        }
    }

    /// A queued value op superseded while it waited ([`Pipeline::superseded`]): it has nothing
    /// left to do there and leaves the queue, counted (`superseded`), not a dead letter.
    fn settle_superseded(&mut self, id: u64, entry: RetryEntry) {
        self.count("superseded");
        tracing::info!(target = %entry.target, user = %Untrusted(&entry.user), op = %entry.op, agent = %entry.agent, seq = entry.seq, "not applied: a newer replace of this user, captured after it, sets the whole value there");
        self.status.note(
            &entry.user,
            &entry.target,
            format!(
                "{} (agent {} seq {}) not applied: superseded by a newer replace",
                entry.op, entry.agent, entry.seq
            ),
        );
        self.dequeue(id, &entry);
    }

    /// Whether value op `change` at `at` is at or after the user's newest replace, with the
    /// adds and deletes after it kept: applied now, it is followed by them
    /// ([`Pipeline::apply_owned`]) and goes over nothing newer.
    fn value_op_in_its_place(&self, change: &Change, at: OrderKey) -> bool {
        change.op.carries_values()
            && !change.is_backfill()
            && self
                .state
                .value_tail(&change.user)
                .is_some_and(|tail| at >= tail.floor)
    }

    /// Deletes the dead letters `ids` (every one with `all`); returns how many.
    pub fn drop_dead_letters(&mut self, ids: &[u64], all: bool) -> anyhow::Result<usize> {
        self.state.flush()?;
        let mut n = 0;
        for (id, _) in self.state.dead_letters()? {
            if all || ids.contains(&id) {
                self.state.remove_dead(id);
                n += 1;
            }
        }
        self.state.flush()?;
        self.status.dead_letters = self.state.dead_letter_count()?;
        Ok(n)
    }

    /// Applies a reloaded configuration: the targets (routing, protect lists, limits), the
    /// agents' scopes and the retry rules. What is in flight is not touched: the caller swaps
    /// between two deliveries, and retry entries of a target that is gone are dead-lettered
    /// with the reason at their next turn.
    pub fn reconfigure(
        &mut self,
        cfg: &ConsumerConfig,
        targets: Vec<Configured>,
    ) -> anyhow::Result<()> {
        let mut agent_scope = HashMap::new();
        for (agent, list) in &cfg.agent_scope {
            agent_scope.insert(
                agent.clone(),
                patterns(list).map_err(|e| anyhow::anyhow!("agent_scope.{agent}: {e}"))?,
            );
        }
        self.default_scope = patterns(&cfg.default_agent_scope).map_err(anyhow::Error::msg)?;
        self.agent_scope = agent_scope;
        self.retry = cfg.retry.clone();
        self.targets = targets;
        let names: Vec<String> = self.targets.iter().map(|t| t.name.clone()).collect();
        for name in &names {
            self.status.targets.entry(name.clone()).or_default();
        }
        self.status
            .targets
            .retain(|name, s| names.contains(name) || s.retry_depth > 0);
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        if !self.dry_run {
            self.state.flush()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_keeps_the_last_users_only() {
        let mut s = StatusReport::default();
        for i in 0..STATUS_USERS + 10 {
            s.note(&format!("user{i}"), "ht", "applied".into());
            s.note(&format!("user{i}"), "ldap", "applied".into());
        }
        assert_eq!(s.users.len(), STATUS_USERS);
        assert!(!s.users.contains_key("user0") && !s.users.contains_key("user9"));
        assert_eq!(s.users[&format!("user{}", STATUS_USERS + 9)].len(), 2);
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("users_order"));
    }

    #[test]
    fn the_status_report_reads_back_typed_and_makes_the_health_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let mut s = StatusReport {
            group: "g1".into(),
            committed: 7,
            ..Default::default()
        };
        s.counters.insert(Cow::Borrowed("records"), 7);
        s.targets.insert("web".into(), TargetStats::default());
        s.targets.insert(
            "dir".into(),
            TargetStats {
                retry_depth: 2,
                unavailable: Some("bind refused".into()),
                ..Default::default()
            },
        );
        s.note("alice", "web", "applied replace".into());
        s.write(&path).unwrap();
        let back = StatusReport::read(&path).unwrap();
        assert_eq!((back.group.as_str(), back.committed), ("g1", 7));
        assert_eq!(back.counters[&Cow::Borrowed("records")], 7);
        assert_eq!(back.targets, s.targets);
        assert_eq!(back.users["alice"]["web"], "applied replace");
        let checks: Vec<(bool, String)> = back
            .target_checks()
            .into_iter()
            .map(|c| (c.ok, c.detail))
            .collect();
        assert!(checks.contains(&(
            false,
            "dir: unavailable (bind refused); 2 changes waiting".into()
        )));
        assert!(checks.contains(&(true, "web: applying".into())));
        assert!(StatusReport::read(&dir.path().join("none.json")).is_err());
    }
}
