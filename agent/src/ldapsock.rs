//! Capture on OpenLDAP, through slapd's sock overlay, in two phases.
//!
//! `pwsync-agent ldap-sock` serves slapd-sock(5)'s protocol on a Unix socket of its own
//! (`[ldap_sock] socket`). slapd, with `overlay sock`, `sockops modify extended`,
//! `sockresps result` and `extensions binddn connid`, connects once per message: before it
//! applies an operation it sends the request and waits for `CONTINUE` (go on) or a `RESULT` (the
//! operation ends with it); after an operation it sends its `RESULT`. Configured after (above)
//! ppolicy, the overlay sees the password as the client sent it, before ppolicy hashes it.
//!
//! What is captured:
//! - a MODIFY of `userPassword`: replace and add (the new value), delete (the value deleted);
//!   a delete of the old value with an add of the new one is the person's own change (a replace
//!   with the previous password). A value the client sent hashed (`{SSHA}…`) cannot be
//!   synchronised: it is logged as such (the account, never the value) and not forwarded;
//! - the Password Modify extended operation (RFC 3062): the `newPasswd` for `userIdentity`, or
//!   for the bound DN when there is none, whoever asks (the user, or an administrator, whose
//!   reset ppolicy's quality module would not see). A password the server generates (no
//!   `newPasswd`) is never sent to the overlay: logged, not forwarded. The MODIFY slapd makes
//!   for the operation (same connection and message id, already hashed) is its own, not a
//!   second change.
//!
//! Two phases, and what they guarantee:
//! - **Pending before slapd goes on.** A captured change is committed to `STATE_DIR/
//!   ldap-pending.redb` (mode 0600, fsynced) before the answer is `CONTINUE`. In `strict` mode
//!   (the default) the agent must also say it can take a change for that user now; when either
//!   fails the answer is a RESULT `unavailable (52)` and slapd refuses the change: nothing
//!   changes anywhere. In `lenient` mode slapd goes on, and the log says whether the change was
//!   kept (it is forwarded when the agent is back) or lost (the pending store failed).
//! - **Confirmed by the result.** slapd's RESULT for the operation (matched by connection and
//!   message id) forwards the pending change when its code is 0, and discards it otherwise (a
//!   ppolicy refusal, a wrong old password): a change slapd refused is never forwarded.
//! - **Settled, never guessed.** A pending change with no result after `settle_secs` (slapd or
//!   this process killed in between, or a refusal slapd does not report to overlays, as a wrong
//!   old password in a Password Modify) is checked against the directory: a simple bind as the
//!   entry with the captured password. It succeeds: the change was applied, and is forwarded;
//!   `invalidCredentials`: it was not, and is discarded; anything else: checked again later.
//!   Nothing pending is forwarded unconfirmed, and nothing committed is lost.
//! - **Backfill** (`backfill = true`, off by default; slapd needs `sockops bind` too): a simple
//!   bind that succeeded hands its password to the agent as a backfill. slapd shows overlays
//!   only a *failed* bind's result; a later message on the same connection bound as that DN
//!   proves success, and a bind with neither within 2 s (a client that binds and leaves) is
//!   checked with a bind of this process's own (recognised when the overlay shows it, and not
//!   tracked again)
//!   ([`pwsync_proto::change::BACKFILL_ATTRIBUTE`]), unless it is the password last forwarded
//!   for that user (a keyed fingerprint, HMAC-SHA256 under a key kept in the store, never the
//!   password) or a backfill went for them within `backfill_interval_secs`. A failed bind sends
//!   nothing. Consumers apply a backfill only where pwsync never wrote for the user and never
//!   after a real change of theirs, so a login with an old password cannot undo a change.
//! - **No echo.** Changes made by `ignore_bind_dns` (the directory target's own bind DN) are not
//!   captured: pwsync's own writes do not come back to it.
//!
//! What happened is counted ([`COUNTED`]: captured, forwarded, refused by slapd, settled either
//! way, hashed or generated values that cannot be synchronised, refusals, backfills) in
//! `STATE_DIR/ldap-sock-status.json`, written every second, and, with `metrics_listen`, on
//! `/metrics` as `pwsync_ldapsock_events_total{event=…}` beside the pending changes' number and
//! oldest age; `/healthz` fails while a change has waited longer than [`STUCK_AFTER_SECS`] (the
//! agent or the directory unreachable).
//!
//! The DN's user name ([`UserNaming`]) is the value of its first RDN (`uid=alice,ou=people,…` →
//! `alice`), or, with `user_dn_template = "uid={user},ou=people,dc=example,dc=org"`, the value
//! where `{user}` stands in a DN of exactly that form, or, with `user_dn_pattern`, the group
//! `user` of a regular expression matching the whole DN; a DN the mapping does not fit is not
//! captured (and logged). Only DNs under `sync_base` (when set) are captured.

use crate::api::{Request, Response};
use crate::config::{LdapSockConfig, SockMode};
use base64::Engine;
use pwsync_proto::{Op, Secret};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

/// The Password Modify extended operation (RFC 3062).
pub const PASSWD_MODIFY_OID: &str = "1.3.6.1.4.1.4203.1.11.1";
/// Largest message read from slapd.
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// For the tests of what a kill in the middle leaves: `PWSYNC_LDAPSOCK_FAILPOINT` set to
/// `exit-after-pending` ends the process (as a SIGKILL would: nothing runs after) once a captured
/// change is committed pending and before slapd is answered; `pause-after-pending` waits 5 s
/// there; `exit-at-result` ends it when slapd's result for a pending change arrives.
fn failpoint(at: &str) {
    static SET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let set = SET.get_or_init(|| std::env::var("PWSYNC_LDAPSOCK_FAILPOINT").ok());
    match set.as_deref() {
        Some(s) if s == format!("exit-{at}") => {
            // SAFETY: _exit ends the process at once; nothing is left half-written that a
            // SIGKILL would not also leave.
            unsafe { libc::_exit(137) }
        }
        Some(s) if s == format!("pause-{at}") => std::thread::sleep(Duration::from_secs(5)),
        _ => {}
    }
}

/// LDAP result code `unavailable`.
const UNAVAILABLE: u32 = 52;
/// LDAP result code constraintViolation (19): the password policy refuses the value.
const CONSTRAINT_VIOLATION: u32 = 19;
/// LDAP result code `other`.
const OTHER: u32 = 80;

const PENDING: TableDefinition<u64, &[u8]> = TableDefinition::new("pending");
/// Binds waiting for their result (backfill), and Password Modify operations waiting for
/// their own MODIFY: at most this many of each at once.
const MAX_BINDS_IN_FLIGHT: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SockError {
    #[error("slapd's message: {0}")]
    Message(String),
    #[error("{0}")]
    Config(String),
    #[error("the pending store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("the socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One value of a message's LDIF, decoded (base64 for `::`); wiped when dropped.
type Value = Zeroizing<Vec<u8>>;

/// One message from slapd: its kind (`MODIFY`, `EXTENDED`, `RESULT`, …) and its lines in order.
pub struct Message {
    pub kind: String,
    lines: Vec<(String, Value)>,
}

impl Message {
    /// Parses one message (ended by an empty line; folded lines joined; `::` values decoded).
    pub fn parse(input: &[u8]) -> Result<Message, SockError> {
        let bad = |m: &str| SockError::Message(m.into());
        let text = input
            .strip_suffix(b"\n\n")
            .ok_or_else(|| bad("not ended by an empty line"))?;
        let mut raw: Vec<Zeroizing<Vec<u8>>> = vec![];
        for line in text.split(|b| *b == b'\n') {
            match (line.first(), raw.last_mut()) {
                (Some(b' '), Some(last)) => last.extend_from_slice(&line[1..]),
                _ => raw.push(Zeroizing::new(line.to_vec())),
            }
        }
        let mut it = raw.into_iter();
        let kind = it
            .next()
            .and_then(|k| String::from_utf8(k.to_vec()).ok())
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase()))
            .ok_or_else(|| bad("no request kind on the first line"))?;
        let mut lines = vec![];
        for line in it {
            if line.as_slice() == b"-" {
                lines.push(("-".into(), Zeroizing::new(vec![])));
                continue;
            }
            let colon = line
                .iter()
                .position(|b| *b == b':')
                .ok_or_else(|| bad("a line without a colon"))?;
            let key = String::from_utf8(line[..colon].to_vec())
                .map_err(|_| bad("a key that is not UTF-8"))?
                .to_ascii_lowercase();
            let rest = &line[colon + 1..];
            let value = if let Some(b64) = rest.strip_prefix(b":") {
                let b64 = b64.strip_prefix(b" ").unwrap_or(b64);
                Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| bad("a base64 value that does not decode"))?,
                )
            } else {
                Zeroizing::new(rest.strip_prefix(b" ").unwrap_or(rest).to_vec())
            };
            lines.push((key, value));
        }
        Ok(Message { kind, lines })
    }

    /// The first value of `key`, as text.
    pub fn text(&self, key: &str) -> Option<String> {
        self.lines
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| String::from_utf8(v.to_vec()).ok())
    }

    /// The connection and message id that tie a request to its result.
    fn op_id(&self) -> Option<(u64, u64)> {
        Some((
            self.text("connid")?.trim().parse().ok()?,
            self.text("msgid")?.trim().parse().ok()?,
        ))
    }

    /// A MODIFY's modifications of `userPassword`: (`add`/`delete`/`replace`, values).
    fn password_mods(&self) -> Vec<(String, Vec<Value>)> {
        let mut out: Vec<(String, Vec<Value>)> = vec![];
        let mut current: Option<(String, String, Vec<Value>)> = None;
        for (k, v) in &self.lines {
            match k.as_str() {
                "add" | "delete" | "replace" => {
                    let attr = String::from_utf8_lossy(v).to_ascii_lowercase();
                    current = Some((k.clone(), attr, vec![]));
                }
                "-" => {
                    if let Some((op, attr, values)) = current.take() {
                        if attr == "userpassword" {
                            out.push((op, values));
                        }
                    }
                }
                _ => {
                    if let Some((_, attr, values)) = current.as_mut() {
                        if *k == *attr {
                            values.push(v.clone());
                        }
                    }
                }
            }
        }
        out
    }
}

/// The fields of a Password Modify request (RFC 3062): `userIdentity`, `oldPasswd`, `newPasswd`.
#[derive(Default)]
pub struct PasswdModify {
    pub user_identity: Option<Value>,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// Parses the BER of a Password Modify request: a SEQUENCE of optional `[0]`, `[1]`, `[2]`
/// OCTET STRINGs.
pub fn parse_passwd_modify(ber: &[u8]) -> Result<PasswdModify, SockError> {
    let bad = |m: &str| SockError::Message(format!("Password Modify request: {m}"));
    let (tag, body, rest) = ber_element(ber).ok_or_else(|| bad("not BER"))?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(bad("not one SEQUENCE"));
    }
    let mut out = PasswdModify::default();
    let mut inner = body;
    while !inner.is_empty() {
        let (tag, value, rest) =
            ber_element(inner).ok_or_else(|| bad("a field that is not BER"))?;
        let v = Some(Zeroizing::new(value.to_vec()));
        match tag {
            0x80 => out.user_identity = v,
            0x81 => out.old = v,
            0x82 => out.new = v,
            _ => return Err(bad("an unknown field")),
        }
        inner = rest;
    }
    Ok(out)
}

/// One BER element: (tag, contents, what follows). Definite lengths only, as LDAP requires.
fn ber_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | *x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// How a DN names its user: `[ldap_sock]`'s `user_dn_template` or `user_dn_pattern` (at most
/// one), else the first RDN's value.
pub enum UserNaming {
    FirstRdn,
    Template(String),
    /// Anchored at both ends, case-insensitive; has a group named `user`.
    Pattern(regex::Regex),
}

impl UserNaming {
    /// The mapping `cfg` asks for; an error says what is wrong with it.
    pub fn new(cfg: &LdapSockConfig) -> Result<UserNaming, String> {
        match (&cfg.user_dn_template, &cfg.user_dn_pattern) {
            (Some(_), Some(_)) => {
                Err("[ldap_sock] has both user_dn_template and user_dn_pattern: keep one".into())
            }
            (Some(t), None) if t.matches("{user}").count() != 1 => Err(format!(
                "[ldap_sock] user_dn_template {t:?} must hold {{user}} exactly once"
            )),
            (Some(t), None) => Ok(UserNaming::Template(t.clone())),
            (None, Some(p)) => {
                let re = regex::RegexBuilder::new(&format!("^(?:{p})$"))
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        format!("[ldap_sock] user_dn_pattern is not a regular expression: {e}")
                    })?;
                if !re.capture_names().any(|n| n == Some("user")) {
                    return Err(format!(
                        "[ldap_sock] user_dn_pattern {p:?} has no group (?P<user>...) for the user name"
                    ));
                }
                Ok(UserNaming::Pattern(re))
            }
            (None, None) => Ok(UserNaming::FirstRdn),
        }
    }

    /// The user `dn` names, unescaped; `None` when the mapping does not fit `dn`.
    pub fn user_of(&self, dn: &str) -> Option<String> {
        match self {
            UserNaming::FirstRdn => user_of_dn(dn),
            UserNaming::Template(t) => user_of_dn_by_template(dn, t),
            UserNaming::Pattern(re) => {
                unescape_value(re.captures(dn)?.name("user")?.as_str()).filter(|u| !u.is_empty())
            }
        }
    }
}

/// The user name of `dn`: its first RDN's value, unescaped (RFC 4514).
pub fn user_of_dn(dn: &str) -> Option<String> {
    unescape_value(dn.split_once('=')?.1)
}

/// The user name of `dn` under `template` (`uid={user},ou=people,dc=example,dc=org`): the
/// escaped value where `{user}` stands, unescaped; `None` when `dn` is not of that form (the
/// fixed parts compared as DNs are: case and spaces after commas aside).
pub fn user_of_dn_by_template(dn: &str, template: &str) -> Option<String> {
    let (prefix, suffix) = template.split_once("{user}")?;
    let (lower, prefix, suffix) = (dn.to_ascii_lowercase(), norm_dn(prefix), norm_dn(suffix));
    if !lower.starts_with(&prefix) {
        return None;
    }
    let rest = &dn[prefix.len()..];
    // The value ends at the first comma that is not escaped.
    let mut end = rest.len();
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            ',' if !escaped => {
                end = i;
                break;
            }
            _ => escaped = false,
        }
    }
    let (value, tail) = rest.split_at(end);
    (norm_dn(tail) == suffix).then_some(())?;
    unescape_value(value)
}

/// An RDN value as RFC 4514 escapes it, up to its end (`,` or `+`), unescaped.
fn unescape_value(escaped: &str) -> Option<String> {
    let mut value = vec![];
    let mut chars = escaped.bytes().peekable();
    while let Some(c) = chars.next() {
        match c {
            b'\\' => {
                let a = chars.next()?;
                if a.is_ascii_hexdigit() && chars.peek().is_some_and(|b| b.is_ascii_hexdigit()) {
                    let b = chars.next()?;
                    let hex = [a, b];
                    value.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                } else {
                    value.push(a);
                }
            }
            b',' | b'+' => break,
            c => value.push(c),
        }
    }
    String::from_utf8(value).ok().filter(|v| !v.is_empty())
}

/// A DN for comparing (case and spaces after commas do not matter).
fn norm_dn(dn: &str) -> String {
    dn.split(',')
        .map(|p| p.trim().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

/// A captured change waiting for slapd's result.
#[derive(Serialize, Deserialize)]
struct Pending {
    connid: u64,
    msgid: u64,
    at_ms: u64,
    dn: String,
    user: String,
    op: Op,
    values: Vec<Secret>,
    previous: Option<Secret>,
    /// slapd's result said it was applied; it waits only for the agent.
    confirmed: bool,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The durable store of pending changes.
struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, SockError> {
        let path = dir.join("ldap-pending.redb");
        let err = |message: String| SockError::Store {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        let db = pwsync_runtime::redb_file::open_or_create(&path, None)
            .map_err(|e| err(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| err(e.to_string()))?;
        txn.open_table(PENDING).map_err(|e| err(e.to_string()))?;
        txn.commit().map_err(|e| err(e.to_string()))?;
        Ok(Store { db, path })
    }

    fn err(&self, e: impl std::fmt::Display) -> SockError {
        SockError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Commits `p` (fsynced); returns its key.
    fn add(&self, p: &Pending) -> Result<u64, SockError> {
        let bytes = Zeroizing::new(postcard::to_allocvec(p).map_err(|e| self.err(e))?);
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let key = {
            let mut t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            let key = t
                .last()
                .map_err(|e| self.err(e))?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(1);
            t.insert(key, bytes.as_slice()).map_err(|e| self.err(e))?;
            key
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(key)
    }

    fn all(&self) -> Result<Vec<(u64, Pending)>, SockError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        let mut out = vec![];
        for row in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match postcard::from_bytes::<Pending>(v.value()) {
                Ok(p) => out.push((k.value(), p)),
                Err(e) => {
                    tracing::error!(key = k.value(), error = %e, "a pending change that does not decode: left in the store")
                }
            }
        }
        Ok(out)
    }

    fn get(&self, key: u64) -> Result<Option<Pending>, SockError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        let v = t.get(key).map_err(|e| self.err(e))?;
        Ok(v.and_then(|v| postcard::from_bytes(v.value()).ok()))
    }

    fn put(&self, key: u64, p: &Pending) -> Result<(), SockError> {
        let bytes = Zeroizing::new(postcard::to_allocvec(p).map_err(|e| self.err(e))?);
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(PENDING)
            .map_err(|e| self.err(e))?
            .insert(key, bytes.as_slice())
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    fn remove(&self, key: u64) -> Result<(), SockError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.open_table(PENDING)
            .map_err(|e| self.err(e))?
            .remove(key)
            .map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }
}

/// The capture service: the config, the store, and the agent's socket.
pub struct Capture {
    cfg: LdapSockConfig,
    naming: UserNaming,
    agent_socket: PathBuf,
    store: Store,
    /// Held while a change is handed to the agent and removed, so the result and the settler
    /// never forward one twice.
    forwarding: std::sync::Mutex<()>,
    /// Successful-looking binds waiting for their result, for backfill: (connid, msgid) → when,
    /// the entry, the password.
    binds: std::sync::Mutex<BTreeMap<OpId, KeptBind>>,
    /// Fingerprints of the passwords this process is checking with a bind of its own: that
    /// bind comes back through the overlay and is not tracked again.
    verifying: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    /// What was forwarded from here, for backfill ([`crate::backfill`]).
    gate: crate::backfill::Gate,
    /// Password Modify operations seen lately (→ when), whose own MODIFY follows.
    exops: std::sync::Mutex<BTreeMap<OpId, u64>>,
    /// The pending changes when last settled: how many, and the oldest one's age in ms.
    waiting: std::sync::Mutex<(usize, u64)>,
    /// What happened, by kind ([`COUNTED`]), written to `STATE_DIR/ldap-sock-status.json`.
    counters: std::sync::Mutex<BTreeMap<&'static str, u64>>,
}

/// A pending change older than this (or than 3 × `settle_secs`, when more) makes `/healthz` fail.
pub const STUCK_AFTER_SECS: u64 = 60;

/// The counters of `ldap-sock-status.json`: every one is there, from 0.
pub const COUNTED: [&str; 11] = [
    "captured",
    "forwarded",
    "refused_by_slapd",
    "settled_applied",
    "settled_discarded",
    "hashed_not_synchronised",
    "generated_not_synchronised",
    "refused_strict",
    "not_captured_lenient",
    "backfills",
    "refused_policy",
];

/// A connection id and message id: what ties a request to its result.
type OpId = (u64, u64);
/// A bind kept for backfill: when it came, the entry, the password.
type KeptBind = (u64, String, Value);

/// What to answer slapd.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Continue,
    Refuse(u32, String),
    /// A RESULT message (after an operation): nothing to answer.
    Nothing,
}

impl Answer {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Answer::Continue => b"CONTINUE\n".to_vec(),
            Answer::Refuse(code, info) => {
                format!("RESULT\ncode: {code}\ninfo: {info}\n\n").into_bytes()
            }
            Answer::Nothing => vec![],
        }
    }
}

impl Capture {
    pub fn open(cfg: LdapSockConfig, agent_socket: &Path) -> Result<Capture, SockError> {
        let store = Store::open(&cfg.state_dir)?;
        let gate = crate::backfill::Gate::open(&cfg.state_dir, cfg.backfill_interval_secs * 1000)
            .map_err(|message| SockError::Store {
            path: cfg.state_dir.clone(),
            message,
        })?;
        let naming = UserNaming::new(&cfg).map_err(SockError::Config)?;
        Ok(Capture {
            naming,
            cfg,
            agent_socket: agent_socket.to_path_buf(),
            store,
            forwarding: std::sync::Mutex::new(()),
            binds: std::sync::Mutex::new(BTreeMap::new()),
            verifying: std::sync::Mutex::new(std::collections::HashSet::new()),
            gate,
            exops: std::sync::Mutex::new(BTreeMap::new()),
            waiting: std::sync::Mutex::new((0, 0)),
            counters: std::sync::Mutex::new(COUNTED.iter().map(|c| (*c, 0)).collect()),
        })
    }

    fn count(&self, what: &'static str) {
        metrics::counter!("pwsync_ldapsock_events_total", "event" => what).increment(1);
        *self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(what)
            .or_default() += 1;
    }

    /// Writes the counters to `STATE_DIR/ldap-sock-status.json` (replaced whole).
    fn write_status(&self) {
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let text = format!(
            "{{\"counters\": {{{}}}}}\n",
            counters
                .iter()
                .map(|(k, v)| format!("\"{k}\": {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let path = self.cfg.state_dir.join("ldap-sock-status.json");
        let tmp = self.cfg.state_dir.join("ldap-sock-status.json.tmp");
        if std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            tracing::warn!(path = %path.display(), "writing the status file");
        }
    }

    /// `/healthz`'s one check: no pending change has waited too long.
    fn health(&self) -> Vec<pwsync_runtime::observe::Check> {
        let (pending, oldest_ms) = *self.waiting.lock().unwrap_or_else(|p| p.into_inner());
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

    fn strict(&self) -> bool {
        self.cfg.mode == SockMode::Strict
    }

    /// Refuses when strict, lets slapd go on (and says so) when lenient.
    fn cannot(&self, user: &str, why: &str) -> Answer {
        if self.strict() {
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
            tracing::error!(
                user,
                reason = why,
                "lenient: a password change goes through NOT captured"
            );
            Answer::Continue
        }
    }

    fn in_scope(&self, dn: &str) -> bool {
        match &self.cfg.sync_base {
            Some(base) => {
                let (dn, base) = (norm_dn(dn), norm_dn(base));
                dn.ends_with(&format!(",{base}"))
            }
            None => true,
        }
    }

    fn ignored_writer(&self, binddn: Option<&str>) -> bool {
        binddn.is_some_and(|b| {
            self.cfg
                .ignore_bind_dns
                .iter()
                .any(|i| norm_dn(i) == norm_dn(b))
        })
    }

    /// Handles one message; the answer to write back.
    pub fn handle(&self, msg: &Message) -> Answer {
        if self.cfg.backfill && self.settle_binds(msg) {
            return Answer::Nothing;
        }
        match msg.kind.as_str() {
            "RESULT" => {
                self.on_result(msg);
                Answer::Nothing
            }
            "EXTENDED" if msg.text("oid").as_deref() == Some(PASSWD_MODIFY_OID) => {
                self.on_passwd_modify(msg)
            }
            "MODIFY" => self.on_modify(msg),
            "BIND" => {
                self.on_bind(msg);
                Answer::Continue
            }
            _ => Answer::Continue,
        }
    }

    /// A change was captured: keep it pending, then let slapd go on (or refuse, when strict and
    /// it cannot be kept or forwarded).
    fn capture(
        &self,
        msg: &Message,
        dn: &str,
        op: Op,
        values: Vec<Secret>,
        previous: Option<Secret>,
    ) -> Answer {
        let user = self.naming.user_of(dn);
        let Some(user) = user else {
            tracing::warn!(
                dn,
                "a password change on a DN with no user name: not captured"
            );
            return Answer::Continue;
        };
        let Some((connid, msgid)) = msg.op_id() else {
            return self.cannot(
                &user,
                "slapd sent no connid and msgid (set `extensions binddn connid`)",
            );
        };
        if self.strict() {
            match pwsync_agent_api::blocking::request(
                &self.agent_socket,
                &Request::Probe { user: user.clone() },
                Duration::from_secs(5),
            ) {
                Ok(Response::Ready) => {}
                // Outside the agent's scope: pwsync does not carry this user's changes.
                Ok(Response::Ignored { .. }) => return Answer::Continue,
                Ok(Response::NotReady { reason }) => return self.cannot(&user, &reason),
                Ok(other) => return self.cannot(&user, &format!("the agent answered {other:?}")),
                Err(e) => return self.cannot(&user, &format!("the agent: {e}")),
            }
        }
        // The password policy, before slapd sets anything (an agent that cannot answer is
        // strict's refusal above, or lenient's going on).
        if matches!(op, Op::Replace | Op::Add) {
            for v in &values {
                let req = Request::CheckPassword {
                    user: user.clone(),
                    password: v.clone(),
                };
                if let Ok(Response::Rejected { reason }) = pwsync_agent_api::blocking::request(
                    &self.agent_socket,
                    &req,
                    Duration::from_secs(5),
                ) {
                    self.count("refused_policy");
                    tracing::info!(
                        user,
                        reason,
                        "refused a password change: the password policy"
                    );
                    return Answer::Refuse(
                        CONSTRAINT_VIOLATION,
                        format!("password change rejected: {}", reason.replace('\n', " ")),
                    );
                }
            }
        }
        let p = Pending {
            connid,
            msgid,
            at_ms: now_ms(),
            dn: dn.to_string(),
            user: user.clone(),
            op,
            values,
            previous,
            confirmed: false,
        };
        match self.store.add(&p) {
            Ok(_) => {
                self.count("captured");
                tracing::info!(user, %op, connid, msgid, "captured a password change; pending slapd's result");
                failpoint("after-pending");
                Answer::Continue
            }
            Err(e) => self.cannot(&user, &e.to_string()),
        }
    }

    fn on_passwd_modify(&self, msg: &Message) -> Answer {
        // The MODIFY slapd makes for this operation (same connection and message id, the value
        // hashed) is its own, whatever becomes of it here.
        if let Some(id) = msg.op_id() {
            let mut exops = self.exops.lock().unwrap_or_else(|p| p.into_inner());
            let now = now_ms();
            exops.retain(|_, at| now.saturating_sub(*at) < 60_000);
            if exops.len() < MAX_BINDS_IN_FLIGHT {
                exops.insert(id, now);
            }
        }
        let binddn = msg.text("binddn");
        if self.ignored_writer(binddn.as_deref()) {
            return Answer::Continue;
        }
        let value = msg
            .lines
            .iter()
            .find(|(k, _)| k == "value")
            .map(|(_, v)| v.clone());
        let req = match value.map(|v| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_slice())
                .map(Zeroizing::new)
        }) {
            // No request value: the bound user's own password, generated by the server.
            None => PasswdModify::default(),
            Some(Ok(ber)) => match parse_passwd_modify(&ber) {
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
                        return Answer::Continue;
                    }
                    None => id,
                }
            }
            None => binddn.unwrap_or_default(),
        };
        if dn.is_empty() || !self.in_scope(&dn) {
            return Answer::Continue;
        }
        let Some(new) = req.new else {
            self.count("generated_not_synchronised");
            tracing::warn!(dn, "a Password Modify without a new password (the server generates one, which the overlay never sees): cannot be synchronised");
            return Answer::Continue;
        };
        self.capture(
            msg,
            &dn,
            Op::Replace,
            vec![Secret::new(new.to_vec())],
            req.old.map(|o| Secret::new(o.to_vec())),
        )
    }

    fn on_modify(&self, msg: &Message) -> Answer {
        let mods = msg.password_mods();
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
        if !self.in_scope(&dn) {
            return Answer::Continue;
        }
        if mods.iter().flat_map(|(_, v)| v).any(|v| is_hashed(v)) {
            self.count("hashed_not_synchronised");
            tracing::warn!(
                dn,
                "userPassword sent already hashed: cannot be synchronised (not forwarded)"
            );
            return Answer::Continue;
        }
        let secrets = |vs: &[Value]| {
            vs.iter()
                .map(|v| Secret::new(v.to_vec()))
                .collect::<Vec<_>>()
        };
        let (op, values, previous) = match mods.as_slice() {
            [(op, v)] if op == "replace" && v.is_empty() => (Op::Delete, vec![], None),
            [(op, v)] if op == "replace" => (Op::Replace, secrets(v), None),
            [(op, v)] if op == "add" => (Op::Add, secrets(v), None),
            [(op, v)] if op == "delete" => (Op::Delete, secrets(v), None),
            // The person's own change: the old value deleted, the new one added.
            [(d, old), (a, new)] if d == "delete" && a == "add" && old.len() == 1 => {
                (Op::Replace, secrets(new), secrets(old).pop())
            }
            _ => {
                let last = mods.last().map(|(_, v)| secrets(v)).unwrap_or_default();
                (Op::Replace, last, None)
            }
        };
        self.capture(msg, &dn, op, values, previous)
    }

    /// A simple bind, kept until its result says whether the password was right (backfill).
    fn on_bind(&self, msg: &Message) {
        if !self.cfg.backfill || msg.text("method").as_deref().map(str::trim) != Some("128") {
            return;
        }
        let (Some(id), Some(dn)) = (msg.op_id(), msg.text("dn")) else {
            return;
        };
        let Some(cred) = msg
            .lines
            .iter()
            .find(|(k, _)| k == "cred")
            .map(|(_, v)| v.clone())
        else {
            return;
        };
        if cred.is_empty() || !self.in_scope(&dn) || self.ignored_writer(Some(&dn)) {
            return;
        }
        // Nothing to send (the password pwsync forwarded last, or a backfill went lately), or
        // this process's own check of a bind: not tracked.
        let Some((_, fp)) = self.wants_backfill(&dn, &cred) else {
            return;
        };
        if self
            .verifying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&fp)
        {
            return;
        }
        let mut binds = self.binds.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        binds.retain(|_, (at, _, _)| now.saturating_sub(*at) < 60_000);
        if binds.len() < MAX_BINDS_IN_FLIGHT {
            binds.insert(id, (now, dn, cred));
        }
    }

    /// What a message tells of the binds kept here. slapd does not show overlays the result of
    /// a *successful* bind (the frontend sends it after the overlays are done), only a failed
    /// one; but every later message on that connection names its bound DN (`binddn`), so a
    /// later message bound as the DN proves the bind, and a failed result of the bind itself
    /// ends it. `true` when the message was a bind's result.
    fn settle_binds(&self, msg: &Message) -> bool {
        let Some((connid, msgid)) = msg.op_id() else {
            return false;
        };
        let mut binds = self.binds.lock().unwrap_or_else(|p| p.into_inner());
        if msg.kind == "RESULT" && binds.contains_key(&(connid, msgid)) {
            let code = msg.text("code").and_then(|c| c.trim().parse::<u32>().ok());
            if code != Some(0) {
                binds.remove(&(connid, msgid));
                return true;
            }
        }
        let Some(bound) = msg.text("binddn").filter(|b| !b.is_empty()) else {
            return false;
        };
        let proven: Vec<(u64, u64)> = binds
            .iter()
            .filter(|((c, m), (_, dn, _))| {
                *c == connid && *m < msgid && norm_dn(dn) == norm_dn(&bound)
            })
            .map(|(k, _)| *k)
            .collect();
        let proven: Vec<_> = proven
            .into_iter()
            .filter_map(|k| binds.remove(&k))
            .collect();
        drop(binds);
        for (_, dn, cred) in proven {
            self.backfill(&dn, &cred);
        }
        false
    }

    /// The user `dn` names and the fingerprint of `cred`, when a backfill of it is due: it is
    /// not the password last forwarded for that user, and no backfill went for them within
    /// the interval.
    fn wants_backfill(&self, dn: &str, cred: &[u8]) -> Option<(String, [u8; 32])> {
        let user = self.naming.user_of(dn)?;
        let fp = self.gate.fingerprint(&user, cred);
        match self.gate.refuses(&user, cred, now_ms()) {
            None => Some((user, fp)),
            Some(why) => {
                tracing::debug!(user, why, "no backfill");
                None
            }
        }
    }

    /// Sends `cred`, proven at a bind as `dn`, as a backfill, when one is due.
    fn backfill(&self, dn: &str, cred: &[u8]) {
        let Some((user, _)) = self.wants_backfill(dn, cred) else {
            return;
        };
        let req = Request::backfill(&user, Secret::new(cred.to_vec()));
        match pwsync_agent_api::blocking::request(&self.agent_socket, &req, Duration::from_secs(10))
        {
            Ok(Response::Accepted { seq, .. }) => {
                self.count("backfills");
                tracing::info!(user, seq, "backfill: a password seen at a successful bind, sent to fill targets that have none");
                if let Err(e) = self.gate.record(&user, cred, true, now_ms()) {
                    tracing::error!(error = %e, "recording a backfill");
                }
            }
            Ok(other) => tracing::info!(user, answer = ?other, "backfill not taken"),
            Err(e) => {
                tracing::warn!(user, error = %e, "backfill not sent: the agent is unreachable")
            }
        }
    }

    /// Binds neither proven nor failed within 2 s (a client that binds and leaves): checked
    /// with a bind of this process's own (which the overlay shows again, and is not tracked).
    fn check_quiet_binds(&self) {
        let now = now_ms();
        let quiet: Vec<(u64, String, Value)> = {
            let mut binds = self.binds.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = binds
                .iter()
                .filter(|(_, (at, _, _))| now.saturating_sub(*at) >= 2_000)
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| binds.remove(&k)).collect()
        };
        for (_, dn, cred) in quiet {
            let Some((_, fp)) = self.wants_backfill(&dn, &cred) else {
                continue;
            };
            self.verifying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fp);
            let Ok(pw) = std::str::from_utf8(&cred) else {
                continue;
            };
            let ok = self.binds_as(&dn, pw) == Some(true);
            self.verifying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fp);
            if ok {
                self.backfill(&dn, &cred);
            }
        }
    }

    fn on_result(&self, msg: &Message) {
        let Some(id) = msg.op_id() else { return };
        let code: u32 = msg
            .text("code")
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(OTHER);
        let Ok(all) = self.store.all() else { return };
        let young = now_ms().saturating_sub(self.cfg.settle_secs * 1000);
        // The newest pending change of that operation (connection ids start again with slapd).
        let Some((key, mut p)) = all
            .into_iter()
            .rev()
            .find(|(_, p)| (p.connid, p.msgid) == id && !p.confirmed && p.at_ms >= young)
        else {
            return;
        };
        failpoint("at-result");
        if code != 0 {
            self.count("refused_by_slapd");
            tracing::info!(
                user = p.user,
                code,
                "slapd refused the change: discarded, not forwarded"
            );
            if let Err(e) = self.store.remove(key) {
                tracing::error!(error = %e, "removing a refused change");
            }
            return;
        }
        p.confirmed = true;
        if let Err(e) = self.store.put(key, &p) {
            tracing::error!(error = %e, "recording a confirmed change (it is settled against the directory later)");
        }
        self.forward(key, &p);
    }

    /// Hands a confirmed change to the agent; removes it once the agent has it durable (or has
    /// refused it by rule). Kept for a later try otherwise.
    fn forward(&self, key: u64, p: &Pending) {
        let _one = self.forwarding.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(self.store.get(key), Ok(Some(_))) {
            return;
        }
        // slapd has applied it: the policy was checked before, and cannot refuse it now.
        let req = Request::Submit {
            user: p.user.clone(),
            op: p.op,
            values: p.values.clone(),
            attributes: pwsync_agent_api::committed_attributes(),
            previous: p.previous.clone(),
        };
        let done = match pwsync_agent_api::blocking::request(
            &self.agent_socket,
            &req,
            Duration::from_secs(30),
        ) {
            Ok(Response::Accepted { seq, durable }) => {
                self.count("forwarded");
                tracing::info!(user = p.user, op = %p.op, seq, durable, "forwarded to the agent");
                // A login with this password later is no news: no backfill for it.
                if let (Op::Replace | Op::Add, Some(v)) = (p.op, p.values.first()) {
                    if let Err(e) = self.gate.record(&p.user, v.expose(), false, now_ms()) {
                        tracing::error!(error = %e, "recording what was forwarded");
                    }
                }
                true
            }
            Ok(Response::Ignored { reason }) | Ok(Response::Rejected { reason }) => {
                tracing::warn!(user = p.user, op = %p.op, reason, "the agent did not take the change");
                true
            }
            Ok(other) => {
                tracing::warn!(user = p.user, answer = ?other, "the agent could not take the change now: kept, tried again");
                false
            }
            Err(e) => {
                tracing::warn!(user = p.user, error = %e, "the agent is unreachable: the change is kept and tried again");
                false
            }
        };
        if done {
            if let Err(e) = self.store.remove(key) {
                tracing::error!(error = %e, "removing a forwarded change");
            }
        }
    }

    /// Forwards confirmed changes the agent could not take before, and settles pending ones
    /// whose result never came (see the module's doc).
    pub fn settle(&self) {
        if self.cfg.backfill {
            self.check_quiet_binds();
        }
        let Ok(all) = self.store.all() else { return };
        let now = now_ms();
        let oldest = all.iter().map(|(_, p)| now.saturating_sub(p.at_ms)).max();
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = (all.len(), oldest.unwrap_or(0));
        metrics::gauge!("pwsync_ldapsock_pending").set(all.len() as f64);
        metrics::gauge!("pwsync_ldapsock_pending_oldest_age_seconds")
            .set(oldest.unwrap_or(0) as f64 / 1000.0);
        let old = now.saturating_sub(self.cfg.settle_secs * 1000);
        for (key, mut p) in all {
            if p.confirmed {
                self.forward(key, &p);
                continue;
            }
            if p.at_ms >= old {
                continue;
            }
            match self.applied_in_directory(&p) {
                Some(true) => {
                    self.count("settled_applied");
                    tracing::info!(
                        user = p.user,
                        "no result came; the directory shows the change applied: forwarded"
                    );
                    p.confirmed = true;
                    if self.store.put(key, &p).is_ok() {
                        self.forward(key, &p);
                    }
                }
                Some(false) => {
                    self.count("settled_discarded");
                    tracing::info!(
                        user = p.user,
                        "no result came; the directory shows the change not applied: discarded"
                    );
                    if let Err(e) = self.store.remove(key) {
                        tracing::error!(error = %e, "removing a settled change");
                    }
                }
                None => {}
            }
        }
    }

    /// Whether the directory holds the pending change: a bind as the entry with the new
    /// password. `None` when the directory cannot tell now.
    fn applied_in_directory(&self, p: &Pending) -> Option<bool> {
        let pw = match (p.op, p.values.first()) {
            (Op::Replace | Op::Add, Some(v)) => v,
            // A delete leaves nothing to bind with: without slapd's result it is discarded.
            _ => return Some(false),
        };
        let Ok(pw) = std::str::from_utf8(pw.expose()) else {
            return Some(false);
        };
        self.binds_as(&p.dn, pw)
    }

    /// Whether the directory takes `password` for `dn` (a simple bind); `None` when it cannot
    /// tell now.
    fn binds_as(&self, dn: &str, password: &str) -> Option<bool> {
        let mut conn = ldap3::LdapConn::with_settings(
            ldap3::LdapConnSettings::new().set_conn_timeout(Duration::from_secs(10)),
            &self.cfg.url,
        )
        .ok()?;
        let answer = match conn.simple_bind(dn, password) {
            Ok(r) if r.rc == 0 => Some(true),
            Ok(r) if r.rc == 49 => Some(false),
            _ => None,
        };
        let _ = conn.unbind();
        answer
    }
}

/// A value written as `{SCHEME}…`: a hash, not a password.
fn is_hashed(v: &[u8]) -> bool {
    v.first() == Some(&b'{') && v.iter().position(|b| *b == b'}').is_some_and(|i| i > 1)
}

/// Reads one message from slapd (bounded in size and time).
fn read_message(stream: &mut UnixStream) -> Result<Zeroizing<Vec<u8>>, SockError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(1024));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    while !buf.ends_with(b"\n\n") {
        let n = stream
            .read(&mut chunk[..])
            .map_err(|e| SockError::Message(format!("reading: {e}")))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(SockError::Message("larger than 1 MiB".into()));
        }
    }
    Ok(buf)
}

fn serve_one(capture: &Capture, mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let raw = match read_message(&mut stream) {
        Ok(raw) => raw,
        Err(e) => {
            tracing::error!(error = %e, "a message from slapd that cannot be read");
            let _ = stream.write_all(&capture.cannot("?", &e.to_string()).bytes());
            return;
        }
    };
    let answer = match Message::parse(&raw) {
        Ok(msg) => capture.handle(&msg),
        // Only a change can be refused for being unreadable: a bind (whose password slapd
        // writes raw, so a line break in it breaks the message) or a result never blocks.
        Err(e) if !(raw.starts_with(b"MODIFY\n") || raw.starts_with(b"EXTENDED\n")) => {
            tracing::warn!(error = %e, "a message from slapd that cannot be read: let through");
            if raw.starts_with(b"RESULT\n") {
                Answer::Nothing
            } else {
                Answer::Continue
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "a change from slapd that cannot be read");
            capture.cannot("?", &e.to_string())
        }
    };
    let _ = stream.write_all(&answer.bytes());
}

/// Serves slapd's sock overlay on `[ldap_sock] socket` until the process is stopped, settling
/// pending changes every second.
pub fn serve(cfg: LdapSockConfig, agent_socket: &Path) -> Result<(), SockError> {
    let path = cfg.socket.clone();
    let socket_mode = cfg.socket_mode;
    // The stores first: the socket appears only once slapd can be served (its existence is what
    // a supervisor or a test waits for).
    let capture = Arc::new(Capture::open(cfg, agent_socket)?);
    if let Some(listen) = capture.cfg.metrics_listen {
        let c = capture.clone();
        pwsync_runtime::observe::serve(listen, Arc::new(move || c.health()));
        for what in COUNTED {
            metrics::counter!("pwsync_ldapsock_events_total", "event" => what).increment(0);
        }
    }
    let sock_err = |source| SockError::Socket {
        path: path.clone(),
        source,
    };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        std::fs::remove_file(&path).map_err(sock_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(sock_err)?;
    std::fs::set_permissions(
        &path,
        std::os::unix::fs::PermissionsExt::from_mode(socket_mode),
    )
    .map_err(sock_err)?;
    let settler = capture.clone();
    std::thread::spawn(move || loop {
        settler.settle();
        settler.write_status();
        std::thread::sleep(Duration::from_secs(1));
    });
    tracing::info!(socket = %path.display(), "serving slapd's sock overlay");
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let c = capture.clone();
                std::thread::spawn(move || serve_one(&c, s));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection from slapd");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modify_message_yields_its_password_mods() {
        let m = Message::parse(
            b"MODIFY\nmsgid: 2\nconnid: 1004\nsuffix: dc=example,dc=org\ndn: uid=alice,ou=people,dc=example,dc=org\nreplace: userPassword\nuserPassword:: TW9kaWZ5LVJlcC00NA==\n-\nreplace: description\ndescription: x\n-\n\n",
        )
        .unwrap();
        assert_eq!(m.kind, "MODIFY");
        assert_eq!(m.op_id(), Some((1004, 2)));
        let mods = m.password_mods();
        assert_eq!(mods.len(), 1);
        assert_eq!(mods[0].0, "replace");
        assert_eq!(mods[0].1[0].as_slice(), b"Modify-Rep-44");
        assert!(Message::parse(b"MODIFY\nmsgid: 2\n").is_err());
        assert!(Message::parse(b"MODIFY\nno colon\n\n").is_err());
    }

    #[test]
    fn a_dn_names_its_user_by_rdn_template_or_pattern() {
        let cfg = |template: Option<&str>, pattern: Option<&str>| LdapSockConfig {
            socket: "s".into(),
            socket_mode: 0o660,
            state_dir: "d".into(),
            mode: SockMode::Strict,
            url: "ldap://127.0.0.1".into(),
            user_dn_template: template.map(Into::into),
            user_dn_pattern: pattern.map(Into::into),
            sync_base: None,
            ignore_bind_dns: vec![],
            backfill: false,
            backfill_interval_secs: 1,
            settle_secs: 1,
            metrics_listen: None,
        };
        let rdn = UserNaming::new(&cfg(None, None)).unwrap();
        assert_eq!(rdn.user_of(r"uid=al\2Cice,ou=x").as_deref(), Some("al,ice"));
        let t = UserNaming::new(&cfg(Some("uid={user},ou=people,dc=ex"), None)).unwrap();
        assert_eq!(
            t.user_of("UID=bob, ou=People,dc=ex").as_deref(),
            Some("bob")
        );
        assert_eq!(t.user_of("uid=bob,ou=staff,dc=ex"), None);
        let p = UserNaming::new(&cfg(
            None,
            Some("(uid|cn)=(?P<user>[^,]+),ou=(staff|contractors),dc=ex"),
        ))
        .unwrap();
        assert_eq!(
            p.user_of(r"cn=Carol\2B,OU=Staff,dc=ex").as_deref(),
            Some("Carol+")
        );
        assert_eq!(
            p.user_of("uid=dan,ou=contractors,dc=ex").as_deref(),
            Some("dan")
        );
        // Anchored: a longer DN, or one in another branch, names nobody.
        assert_eq!(p.user_of("uid=dan,ou=contractors,dc=ex,dc=org"), None);
        assert_eq!(p.user_of("uid=dan,ou=admins,dc=ex"), None);
        let e = |t, p| UserNaming::new(&cfg(t, p)).err().unwrap();
        assert!(e(Some("uid={user}"), Some("x")).contains("keep one"));
        assert!(e(Some("uid=x,dc=ex"), None).contains("exactly once"));
        assert!(e(None, Some("uid=([^,]+)")).contains("(?P<user>"));
        assert!(e(None, Some("uid=(?P<user>")).contains("not a regular expression"));
    }

    #[test]
    fn a_password_modify_request_is_read() {
        // ldappasswd -a Alice-Old-1 -s Alice-New-22, by the user (no userIdentity).
        let ber = base64::engine::general_purpose::STANDARD
            .decode("MBuBC0FsaWNlLU9sZC0xggxBbGljZS1OZXctMjI=")
            .unwrap();
        let r = parse_passwd_modify(&ber).unwrap();
        assert!(r.user_identity.is_none());
        assert_eq!(r.old.unwrap().as_slice(), b"Alice-Old-1");
        assert_eq!(r.new.unwrap().as_slice(), b"Alice-New-22");
        // By an administrator, for a DN.
        let ber = base64::engine::general_purpose::STANDARD
            .decode("MDWAJXVpZD1hbGljZSxvdT1wZW9wbGUsZGM9ZXhhbXBsZSxkYz1vcmeCDEFkbWluLVNldC0zMw==")
            .unwrap();
        let r = parse_passwd_modify(&ber).unwrap();
        assert_eq!(
            r.user_identity.unwrap().as_slice(),
            b"uid=alice,ou=people,dc=example,dc=org"
        );
        assert!(parse_passwd_modify(&ber[..ber.len() - 1]).is_err());
        assert!(parse_passwd_modify(b"\x04\x00").is_err());
    }

    #[test]
    fn a_bind_whose_password_breaks_the_message_does_not_parse_and_is_let_through() {
        // slapd writes a bind's password raw: one with a line break is no LDIF.
        assert!(
            Message::parse(b"BIND\nmsgid: 1\ndn: uid=a,dc=x\nmethod: 128\ncred: a\nb\n\n").is_err()
        );
    }

    #[test]
    fn dn_user_names_and_scope() {
        assert_eq!(
            user_of_dn("uid=alice,ou=people,dc=x").as_deref(),
            Some("alice")
        );
        assert_eq!(
            user_of_dn("cn=O\\2cBrien\\+x,dc=x").as_deref(),
            Some("O,Brien+x")
        );
        assert_eq!(user_of_dn("uid=,dc=x"), None);
        assert!(is_hashed(b"{SSHA}abc") && !is_hashed(b"{}x") && !is_hashed(b"plain"));
        assert_eq!(norm_dn("ou=People, DC=x"), "ou=people,dc=x");
        let t = "uid={user},ou=people,dc=x";
        assert_eq!(
            user_of_dn_by_template("UID=a\\,b,ou=People, dc=x", t).as_deref(),
            Some("a,b")
        );
        assert_eq!(user_of_dn_by_template("uid=a,ou=admins,dc=x", t), None);
        assert_eq!(user_of_dn_by_template("cn=a,ou=people,dc=x", t), None);
        assert_eq!(user_of_dn_by_template("uid=a,sub,ou=people,dc=x", t), None);
    }
}
