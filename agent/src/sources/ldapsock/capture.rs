//! The capture of one change, from slapd's request to the agent's spool.
//!
//! For each MODIFY of `userPassword` and each Password Modify, before slapd goes on:
//! 1. **The account** is read from the directory ([`Directory::stored_dn`]): the entry's DN as
//!    stored, mapped by [`UserNaming`]. Never the request's spelling.
//! 2. **What the directory will hold** is the [`modification`] model's [`Effect`], and the pwsync
//!    operations that carry it; what cannot be carried whole is a refusal.
//! 3. **The agent vets** each operation exactly as it will be submitted (`Request::Vet`: the
//!    user name, every value, the password policy on every new value, room in the spool).
//! 4. The change is **committed pending** ([`PendingStore`]), then slapd is told to go on.
//!
//! A refusal is slapd's answer to the person: `constraintViolation` with the reason (the policy,
//! a hashed value, a name or value the agent refuses) or `unavailable` when pwsync cannot take
//! a change now. In `lenient` mode only the policy refuses; anything else lets the change
//! through, counted (`not_synchronised`), logged, and listed with its time in the status file
//! until a later change of that account is forwarded.
//!
//! After slapd's result (or, when none came, after the directory was asked: see the module
//! [`super`]), the operations are handed to the agent in order, marked committed, and the
//! pending record is removed once the agent has them all.

use super::directory::{Directory, Stored};
use super::message::{Message, OpId, Verb};
use super::modification::{self, Effect, Refusal};
use super::naming::{norm_dn, UserNaming};
use super::store::{Pending, PendingOp, PendingStore};
use super::{failpoint, SockError};
use super::{LdapSockConfig, SockMode};
use crate::api::{Request, Response};
use pwsync_proto::{Op, Secret};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// LDAP result code noSuchObject.
pub const NO_SUCH_OBJECT: u32 = 32;
/// LDAP result code `unavailable`.
pub const UNAVAILABLE: u32 = 52;
/// LDAP result code constraintViolation (19): the change is refused for what it is.
pub const CONSTRAINT_VIOLATION: u32 = 19;
/// LDAP result code `other`.
const OTHER: u32 = 80;

/// A pending change older than this (or than 3 × `settle_secs`, when more) makes `/healthz` fail.
pub const STUCK_AFTER_SECS: u64 = 60;
/// Accounts listed as not synchronised in the status file: at most this many.
const MAX_UNSYNCHRONISED: usize = 10_000;

/// The counters of `ldap-sock-status.json`: every one is there, from 0. `forwarded` counts
/// operations the agent took, `delivered` captured changes whose every operation it took; every
/// capture ends `delivered`, `refused_by_slapd`, `settled_discarded` or `settled_unknown`.
pub const COUNTED: [&str; 15] = [
    "captured",
    "forwarded",
    "delivered",
    "refused_by_slapd",
    "settled_applied",
    "settled_discarded",
    "settled_unknown",
    "hashed_not_synchronised",
    "generated_not_synchronised",
    "refused_strict",
    "refused_uncarriable",
    "not_captured_lenient",
    "not_synchronised",
    "backfills",
    "refused_policy",
];

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What to answer slapd.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Continue,
    Refuse(u32, String),
    /// A RESULT message (after an operation): nothing to answer.
    Nothing,
}

impl Answer {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Answer::Continue => b"CONTINUE\n".to_vec(),
            Answer::Refuse(code, info) => {
                // The info is one line: slapd reads the message line by line.
                let info: String = info
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                format!("RESULT\ncode: {code}\ninfo: {info}\n\n").into_bytes()
            }
            Answer::Nothing => vec![],
        }
    }
}

/// What happened here, for the status file and `/healthz`.
struct Seen {
    /// By kind ([`COUNTED`]).
    counters: BTreeMap<&'static str, u64>,
    /// Accounts whose latest change went through not synchronised (lenient), since when (ms).
    unsynchronised: BTreeMap<String, u64>,
    /// The pending changes when last settled: how many, and the oldest one's age in ms.
    waiting: (usize, u64),
}

/// Whose change a DN's change is.
enum Account {
    /// The entry's stored DN and the user it names.
    Named { dn: String, user: String },
    /// Not pwsync's to carry: outside `sync_base`, or a DN the naming does not fit.
    NotOurs,
}

/// The capture service: the config, the directory, the store, and the agent's socket.
pub struct Capture {
    pub(super) cfg: LdapSockConfig,
    pub(super) naming: UserNaming,
    pub(super) directory: Directory,
    agent_socket: PathBuf,
    store: PendingStore,
    /// Held while a change is handed to the agent and removed, so the result and the settler
    /// never forward one twice.
    forwarding: Mutex<()>,
    /// What was forwarded from here, for backfill ([`crate::backfill`]).
    pub(super) gate: crate::backfill::Gate,
    /// Binds kept for backfill ([`super::binds`]).
    pub(super) binds: super::binds::BindWatch,
    /// Password Modify operations seen lately (→ when), whose own MODIFY follows.
    exops: Mutex<BTreeMap<OpId, u64>>,
    /// What `ldap-sock-status.json`, `/healthz` and `pwsync-agent status` show.
    seen: Mutex<Seen>,
    /// Pending changes the directory showed not applied once (key → when): discarded when it
    /// still does `settle_secs` later.
    doubted: Mutex<BTreeMap<u64, u64>>,
}

impl Capture {
    pub fn open(cfg: LdapSockConfig, agent_socket: &Path) -> Result<Capture, SockError> {
        pwsync_runtime::private_dir(&cfg.state_dir).map_err(|e| SockError::Store {
            path: cfg.state_dir.clone(),
            message: e.to_string(),
        })?;
        let store = PendingStore::open(&cfg.state_dir)?;
        let gate = crate::backfill::Gate::open(&cfg.state_dir, cfg.backfill_interval_secs * 1000)
            .map_err(|message| SockError::Store {
            path: cfg.state_dir.clone(),
            message,
        })?;
        let naming = UserNaming::new(&cfg).map_err(SockError::Config)?;
        Ok(Capture {
            naming,
            directory: Directory::new(&cfg.url),
            cfg,
            agent_socket: agent_socket.to_path_buf(),
            store,
            forwarding: Mutex::new(()),
            gate,
            binds: Default::default(),
            exops: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Seen {
                counters: COUNTED.iter().map(|c| (*c, 0)).collect(),
                unsynchronised: BTreeMap::new(),
                waiting: (0, 0),
            }),
            doubted: Mutex::new(BTreeMap::new()),
        })
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn count(&self, what: &'static str) {
        metrics::counter!("pwsync_ldapsock_events_total", "event" => what).increment(1);
        *self.seen().counters.entry(what).or_default() += 1;
    }

    /// Writes the counters and the accounts not synchronised to
    /// `STATE_DIR/ldap-sock-status.json` (replaced whole).
    pub fn write_status(&self) {
        let status = {
            let seen = self.seen();
            serde_json::json!({
                "counters": seen.counters,
                "not_synchronised_since_ms": seen.unsynchronised,
            })
        };
        let path = self.cfg.state_dir.join("ldap-sock-status.json");
        if pwsync_runtime::replace_private(&path, format!("{status}\n").as_bytes()).is_err() {
            tracing::warn!(path = %path.display(), "writing the status file");
        }
    }

    /// `/healthz`'s one check: no pending change has waited too long.
    pub fn health(&self) -> Vec<pwsync_runtime::observe::Check> {
        let (pending, oldest_ms) = self.seen().waiting;
        let limit = STUCK_AFTER_SECS.max(3 * self.cfg.settle_secs);
        vec![pwsync_runtime::observe::Check::new(
            "pending",
            oldest_ms / 1000 <= limit,
            if pending == 0 {
                "no change pending".to_string()
            } else {
                format!(
                    "{pending} changes pending, the oldest for {} s (over {limit} s: the agent or the directory cannot be reached)",
                    oldest_ms / 1000
                )
            },
        )]
    }

    pub(super) fn agent_socket(&self) -> PathBuf {
        self.agent_socket.clone()
    }

    fn strict(&self) -> bool {
        self.cfg.mode == SockMode::Strict
    }

    /// pwsync cannot take a change now: refused when strict, let through (and said) when
    /// lenient.
    pub(super) fn cannot(&self, user: &str, why: &str) -> Answer {
        if self.strict() {
            self.count("refused_strict");
            tracing::warn!(
                user,
                reason = why,
                "refused a password change: pwsync cannot take it now"
            );
            Answer::Refuse(
                UNAVAILABLE,
                format!("password synchronisation is unavailable ({why}); the password was not changed, try again later"),
            )
        } else {
            self.count("not_captured_lenient");
            tracing::error!(
                user,
                reason = why,
                "lenient: a password change goes through NOT captured"
            );
            self.mark_unsynchronised(user);
            Answer::Continue
        }
    }

    /// pwsync cannot carry this change whole: refused with `why` when strict; when lenient it
    /// goes through, and the account is listed as not synchronised. `reason`: a counter of its
    /// own for why (a hashed value, a generated password), besides the mode's.
    fn uncarriable(&self, user: &str, why: &str, reason: Option<&'static str>) -> Answer {
        if let Some(reason) = reason {
            self.count(reason);
        }
        if self.strict() {
            self.count("refused_uncarriable");
            tracing::warn!(
                user,
                reason = why,
                "refused a password change pwsync cannot carry"
            );
            Answer::Refuse(
                CONSTRAINT_VIOLATION,
                format!("password change rejected: {why}"),
            )
        } else {
            self.count("not_synchronised");
            tracing::error!(
                user,
                reason = why,
                "lenient: a password change goes through that pwsync cannot carry: NOT synchronised"
            );
            self.mark_unsynchronised(user);
            Answer::Continue
        }
    }

    fn mark_unsynchronised(&self, user: &str) {
        if user == "?" {
            return;
        }
        let u = &mut self.seen().unsynchronised;
        if u.len() < MAX_UNSYNCHRONISED || u.contains_key(user) {
            u.entry(user.to_string()).or_insert_with(now_ms);
        }
    }

    pub(super) fn in_scope(&self, dn: &str) -> bool {
        match &self.cfg.sync_base {
            Some(base) => {
                let (dn, base) = (norm_dn(dn), norm_dn(base));
                dn.ends_with(&format!(",{base}"))
            }
            None => true,
        }
    }

    pub(super) fn ignored_writer(&self, binddn: Option<&str>) -> bool {
        binddn.is_some_and(|b| {
            self.cfg
                .ignore_bind_dns
                .iter()
                .any(|i| norm_dn(i) == norm_dn(b))
        })
    }

    /// The account `dn` names, from the entry as stored; `Err` is the answer when it cannot
    /// be read.
    fn account(&self, dn: &str) -> Result<Account, Answer> {
        if !self.in_scope(dn) {
            return Ok(Account::NotOurs);
        }
        let stored = match self.directory.stored_dn(dn) {
            Stored::Dn(stored) => stored,
            Stored::NoEntry => {
                tracing::warn!(
                    dn,
                    "a password change for an entry ldap-sock cannot read (no such entry, or its reads are not allowed: give ldap-sock's connection search access to the entries it captures)"
                );
                return Err(if self.strict() {
                    self.count("refused_strict");
                    Answer::Refuse(
                        NO_SUCH_OBJECT,
                        "no such entry (or password synchronisation may not read it)".into(),
                    )
                } else {
                    self.count("not_captured_lenient");
                    Answer::Continue
                });
            }
            Stored::Unreachable(why) => {
                return Err(self.cannot("?", &format!("reading the entry's name: {why}")))
            }
        };
        if !self.in_scope(&stored) {
            return Ok(Account::NotOurs);
        }
        match self.naming.user_of(&stored) {
            Some(user) => Ok(Account::Named { dn: stored, user }),
            None => {
                tracing::warn!(
                    dn = stored,
                    "a password change on a DN the user naming does not fit: not captured"
                );
                Ok(Account::NotOurs)
            }
        }
    }

    /// Handles one message; the answer to write back.
    pub fn handle(&self, msg: &Message) -> Answer {
        if self.cfg.backfill && self.settle_binds(msg) {
            return Answer::Nothing;
        }
        match &msg.verb {
            Verb::Result => {
                self.on_result(msg);
                Answer::Nothing
            }
            Verb::Extended if msg.text("oid").as_deref() == Some(super::ber::PASSWD_MODIFY_OID) => {
                self.on_passwd_modify(msg)
            }
            Verb::Modify => self.on_modify(msg),
            Verb::Bind => {
                self.on_bind(msg);
                Answer::Continue
            }
            _ => Answer::Continue,
        }
    }

    /// Asks the agent whether it takes each operation as it will be submitted; `None` when it
    /// takes them all.
    fn vet(&self, user: &str, ops: &[PendingOp]) -> Option<Answer> {
        for op in ops {
            let req = Request::Vet {
                user: user.to_string(),
                op: op.op,
                values: op.values.clone(),
                previous: op.previous.clone(),
            };
            let answer = match pwsync_agent_api::blocking::request(
                &self.agent_socket,
                &req,
                Duration::from_secs(5),
            ) {
                Ok(Response::Ready) => continue,
                // Outside the agent's scope: pwsync does not carry this user's changes.
                Ok(Response::Ignored { .. }) => Answer::Continue,
                Ok(Response::Rejected { reason }) => self.rejected(user, op, &reason),
                Ok(Response::NotReady { reason }) => self.cannot(user, &reason),
                // Lenient mode keeps the change pending while the agent cannot answer: it is
                // forwarded once the agent is back.
                Ok(_) | Err(_) if !self.strict() => continue,
                Ok(other) => self.cannot(user, &format!("the agent answered {other:?}")),
                Err(e) => self.cannot(user, &format!("the agent: {e}")),
            };
            return Some(answer);
        }
        None
    }

    /// The agent refuses an operation for what it is: the password policy (always refused),
    /// or a name or value it cannot take (refused when strict). A valid change the agent
    /// refuses was refused by the policy (`Vet` judges validity first).
    fn rejected(&self, user: &str, op: &PendingOp, reason: &str) -> Answer {
        let valid = pwsync_proto::Change {
            user: user.to_string(),
            origin: "ldap-sock".into(),
            op: op.op,
            values: op.values.clone(),
            attributes: Default::default(),
            previous: op.previous.clone(),
        }
        .validate()
        .is_ok();
        if self.strict() || (valid && matches!(op.op, Op::Replace | Op::Add)) {
            self.count(if valid {
                "refused_policy"
            } else {
                "refused_uncarriable"
            });
            tracing::info!(
                user,
                reason,
                "refused a password change: the agent refuses it"
            );
            return Answer::Refuse(
                CONSTRAINT_VIOLATION,
                format!("password change rejected: {reason}"),
            );
        }
        self.uncarriable(user, reason, None)
    }

    /// A change was captured: vetted, kept pending, then slapd goes on (or a refusal).
    fn capture(&self, msg: &Message, account: Account, effect: Result<Effect, Refusal>) -> Answer {
        let Account::Named { dn, user } = account else {
            return Answer::Continue;
        };
        let carried = match effect.and_then(|e| e.carry()) {
            Ok(c) => c,
            Err(r) => {
                let reason = match r {
                    Refusal::HashedValue | Refusal::HashedDelete => Some("hashed_not_synchronised"),
                    Refusal::UnknownKind => None,
                };
                return self.uncarriable(&user, &r.to_string(), reason);
            }
        };
        if carried.is_empty() {
            return Answer::Continue;
        }
        let ops: Vec<PendingOp> = carried
            .into_iter()
            .map(|c| PendingOp {
                op: c.op,
                values: c.values,
                previous: c.previous,
            })
            .collect();
        self.capture_ops(msg, dn, user, ops)
    }

    /// Vets `ops` with the agent, keeps them pending, and lets slapd go on (or refuses).
    fn capture_ops(&self, msg: &Message, dn: String, user: String, ops: Vec<PendingOp>) -> Answer {
        let Some((connid, msgid)) = msg.op_id() else {
            return self.cannot(
                &user,
                "slapd sent no connid and msgid (set `extensions binddn connid`)",
            );
        };
        if let Some(answer) = self.vet(&user, &ops) {
            return answer;
        }
        let p = Pending {
            connid,
            msgid,
            at_ms: now_ms(),
            dn,
            user: user.clone(),
            ops,
            forwarded: 0,
            confirmed: false,
        };
        match self.store.add(&p) {
            Ok(_) => {
                self.count("captured");
                let ops: Vec<&str> = p.ops.iter().map(|o| o.op.as_str()).collect();
                tracing::info!(
                    user,
                    ops = ops.join(" "),
                    connid,
                    msgid,
                    "captured a password change; pending slapd's result"
                );
                failpoint("after-pending");
                Answer::Continue
            }
            Err(e) => self.cannot(&user, &e.to_string()),
        }
    }

    fn on_passwd_modify(&self, msg: &Message) -> Answer {
        // The MODIFY slapd makes for this operation (same connection and message id, the value
        // hashed) is its own, whatever becomes of it here; refused here, slapd makes none.
        let id = msg.op_id();
        if let Some(id) = id {
            let mut exops = self.exops.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_ms();
            exops.retain(|_, at| now.saturating_sub(*at) < 60_000);
            if exops.len() < super::binds::MAX_IN_FLIGHT {
                exops.insert(id, now);
            }
        }
        let answer = self.password_modify(msg);
        if let (Some(id), Answer::Refuse(..)) = (id, &answer) {
            self.exops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        answer
    }

    /// A Password Modify: a replace for the entry it names.
    fn password_modify(&self, msg: &Message) -> Answer {
        let binddn = msg.text("binddn");
        if self.ignored_writer(binddn.as_deref()) {
            return Answer::Continue;
        }
        use base64::Engine;
        let req = match msg.value("value").map(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_slice())
                .map(zeroize::Zeroizing::new)
        }) {
            // No request value: the bound user's own password, generated by the server.
            None => super::ber::PasswdModify::default(),
            Some(Ok(ber)) => match super::ber::parse_passwd_modify(&ber) {
                Ok(r) => r,
                Err(e) => return self.cannot("?", &e.to_string()),
            },
            Some(Err(_)) => return self.cannot("?", "a Password Modify value that is not base64"),
        };
        let dn = match &req.user_identity {
            Some(id) => {
                let id = String::from_utf8_lossy(id).to_string();
                match id.strip_prefix("dn:") {
                    Some(dn) => dn.to_string(),
                    None if id.starts_with("u:") => {
                        tracing::warn!("a Password Modify naming an authzId (u:…), which pwsync cannot map to an entry: not captured");
                        return self.uncarriable(
                            "?",
                            "the account is named by an authzId (u:...); name its entry by DN",
                            None,
                        );
                    }
                    None => id,
                }
            }
            None => binddn.unwrap_or_default(),
        };
        if dn.is_empty() {
            return Answer::Continue;
        }
        let account = match self.account(&dn) {
            Ok(a) => a,
            Err(answer) => return answer,
        };
        let Some(new) = req.new else {
            if let Account::Named { user, .. } = &account {
                return self.uncarriable(
                    user,
                    "the server would generate the new password, which pwsync never sees; choose one (ldappasswd -s or -S)",
                    Some("generated_not_synchronised"),
                );
            }
            return Answer::Continue;
        };
        let Account::Named { dn, user } = account else {
            return Answer::Continue;
        };
        // A Password Modify's new value is a password, whatever it looks like (`{SSHA}x` is
        // hashed by slapd like any other), so it is carried as it is, with the old password the
        // person typed, when they typed one.
        let ops = vec![PendingOp {
            op: Op::Replace,
            values: vec![Secret::new(new.to_vec())],
            previous: req
                .old
                .filter(|o| !o.is_empty())
                .map(|o| Secret::new(o.to_vec())),
        }];
        self.capture_ops(msg, dn, user, ops)
    }

    fn on_modify(&self, msg: &Message) -> Answer {
        let mods = match msg.password_mods() {
            Ok(m) => m,
            Err(e) => return self.cannot("?", &e.to_string()),
        };
        if mods.is_empty() {
            return Answer::Continue;
        }
        // The MODIFY slapd makes for a Password Modify is that operation's own.
        if let Some(id) = msg.op_id() {
            let own = self
                .exops
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id)
                .is_some();
            if own {
                return Answer::Continue;
            }
        }
        if self.ignored_writer(msg.text("binddn").as_deref()) {
            return Answer::Continue;
        }
        let dn = msg.text("dn").unwrap_or_default();
        let account = match self.account(&dn) {
            Ok(a) => a,
            Err(answer) => return answer,
        };
        self.capture(msg, account, modification::effect(&mods))
    }

    fn on_result(&self, msg: &Message) {
        let Some(id) = msg.op_id() else { return };
        let code: u32 = msg
            .text("code")
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(OTHER);
        let Ok(all) = self.store.all() else { return };
        let young = now_ms().saturating_sub(self.cfg.settle_secs * 1000);
        // The newest pending change of that operation (connection ids start again with slapd,
        // so an older one of the same id is another slapd's: it is settled instead).
        let Some((key, p)) = all
            .into_iter()
            .rev()
            .find(|(_, p)| (p.connid, p.msgid) == id && !p.confirmed && p.at_ms >= young)
        else {
            return;
        };
        failpoint("at-result");
        if code != 0 {
            match self.store.remove_unconfirmed(key) {
                Ok(true) => {
                    self.count("refused_by_slapd");
                    tracing::info!(
                        user = p.user,
                        code,
                        "slapd refused the change: discarded, not forwarded"
                    );
                }
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "removing a refused change"),
            }
            return;
        }
        match self.store.confirm(key) {
            Ok(true) => self.forward_confirmed(),
            // Decided meanwhile (settled against the directory).
            Ok(false) => {}
            Err(e) => {
                tracing::error!(error = %e, "recording a confirmed change (it is settled against the directory later)")
            }
        }
    }

    /// Hands every confirmed change to the agent, oldest first, each one's operations in order
    /// from the first the agent does not have; removes a change once the agent has them all.
    /// Stops at the first the agent cannot take now, so no change is ever handed over before
    /// an older confirmed one: the order of capture is the order the agent stamps.
    fn forward_confirmed(&self) {
        let _one = self.forwarding.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(all) = self.store.all() else { return };
        for (key, p) in all {
            if p.confirmed && !self.forward_one(key, p) {
                return;
            }
        }
    }

    /// [`Capture::forward_confirmed`] of one change (read from the store under the
    /// `forwarding` lock); whether the agent has all of it now.
    fn forward_one(&self, key: u64, mut p: Pending) -> bool {
        let mut all_taken = true;
        while p.forwarded < p.ops.len() {
            let op = &p.ops[p.forwarded];
            // slapd has applied it: the policy was checked before, and cannot refuse it now.
            let req = Request::Submit {
                user: p.user.clone(),
                op: op.op,
                values: op.values.clone(),
                attributes: pwsync_agent_api::committed_attributes(),
                previous: op.previous.clone(),
            };
            match pwsync_agent_api::blocking::request(
                &self.agent_socket,
                &req,
                Duration::from_secs(30),
            ) {
                Ok(Response::Accepted { seq, durable }) => {
                    self.count("forwarded");
                    tracing::info!(user = p.user, op = %op.op, seq, durable, "forwarded to the agent");
                    // A login with this password later is no news: no backfill for it.
                    if let (Op::Replace | Op::Add, Some(v)) = (op.op, op.values.first()) {
                        if let Err(e) = self.gate.record(&p.user, v.expose(), false, now_ms()) {
                            tracing::error!(error = %e, "recording what was forwarded");
                        }
                    }
                }
                // Refused for what it is (or a request the agent cannot take at all): sending
                // it again will not help, and waiting would hold every later change.
                Ok(Response::Ignored { reason })
                | Ok(Response::Rejected { reason })
                | Ok(Response::Error { message: reason }) => {
                    all_taken = false;
                    self.count("not_synchronised");
                    self.mark_unsynchronised(&p.user);
                    tracing::error!(user = p.user, op = %op.op, reason, "the agent did not take a change slapd applied: NOT synchronised");
                }
                Ok(other) => {
                    tracing::warn!(user = p.user, answer = ?other, "the agent could not take the change now: kept, tried again");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(user = p.user, error = %e, "the agent is unreachable: the change is kept and tried again");
                    return false;
                }
            }
            p.forwarded += 1;
            if p.forwarded < p.ops.len() {
                if let Err(e) = self.store.update(key, &p) {
                    tracing::error!(error = %e, "recording a forwarded step");
                }
            }
        }
        if all_taken {
            self.seen().unsynchronised.remove(&p.user);
        }
        if let Err(e) = self.store.remove(key) {
            tracing::error!(error = %e, "removing a forwarded change");
        }
        self.count("delivered");
        true
    }

    /// Forwards confirmed changes the agent could not take before, and settles pending ones
    /// whose result never came (see the module [`super`]).
    pub fn settle(&self) {
        if self.cfg.backfill {
            self.check_quiet_binds();
        }
        self.forward_confirmed();
        let Ok(all) = self.store.all() else { return };
        let now = now_ms();
        let oldest = all.iter().map(|(_, p)| now.saturating_sub(p.at_ms)).max();
        self.seen().waiting = (all.len(), oldest.unwrap_or(0));
        metrics::gauge!("pwsync_ldapsock_pending").set(all.len() as f64);
        metrics::gauge!("pwsync_ldapsock_pending_oldest_age_seconds")
            .set(oldest.unwrap_or(0) as f64 / 1000.0);
        let settle_ms = self.cfg.settle_secs * 1000;
        let old = now.saturating_sub(settle_ms);
        let mut confirmed_any = false;
        self.doubted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| all.iter().any(|(key, _)| key == k));
        for (key, p) in all {
            if p.confirmed || p.at_ms >= old {
                continue;
            }
            match self.applied_in_directory(&p) {
                Some(true) => {
                    self.count("settled_applied");
                    tracing::info!(
                        user = p.user,
                        "no result came; the directory shows the change applied: forwarded"
                    );
                    confirmed_any |= self.store.confirm(key).unwrap_or(false);
                }
                // Not applied *yet* is not the same as never: slapd may still be working on
                // it. Discarded only when the directory says so twice, `settle_secs` apart.
                Some(false) => {
                    let mut doubted = self.doubted.lock().unwrap_or_else(|p| p.into_inner());
                    let first = *doubted.entry(key).or_insert(now);
                    if now.saturating_sub(first) < settle_ms {
                        continue;
                    }
                    doubted.remove(&key);
                    drop(doubted);
                    if !self.store.remove_unconfirmed(key).unwrap_or(false) {
                        continue;
                    }
                    self.count("settled_discarded");
                    if p.ops.iter().all(|o| o.values.is_empty()) {
                        self.count("settled_unknown");
                        tracing::error!(
                            user = p.user,
                            "no result came for a change that deletes every password, and the directory cannot show whether it was applied: discarded; check the account and set its password again"
                        );
                    }
                    tracing::info!(
                        user = p.user,
                        "no result came; the directory shows the change not applied: discarded"
                    );
                }
                None => {}
            }
        }
        if confirmed_any {
            self.forward_confirmed();
        }
    }

    /// Whether the directory holds the pending change: a bind as the entry with a value it
    /// adds (succeeds: applied), else with a value it deletes (fails: applied). `None` when
    /// the directory cannot tell now. A change that deletes every value leaves nothing to bind
    /// with: it is discarded unconfirmed, counted as `settled_unknown`, and logged.
    fn applied_in_directory(&self, p: &Pending) -> Option<bool> {
        let added = p
            .ops
            .iter()
            .filter(|o| matches!(o.op, Op::Replace | Op::Add))
            .find_map(|o| o.values.first());
        if let Some(v) = added {
            return self.directory.binds_as(&p.dn, v.expose());
        }
        let deleted = p
            .ops
            .iter()
            .filter(|o| o.op == Op::Delete)
            .find_map(|o| o.values.first());
        if let Some(v) = deleted {
            return self
                .directory
                .binds_as(&p.dn, v.expose())
                .map(|binds| !binds);
        }
        // Nothing to bind with: the directory cannot tell (see `settle`).
        Some(false)
    }
}
