//! Capture on a Samba AD domain controller, through `samba-tool user syncpasswords`.
//!
//! `pwsync-agent samba-sync` (the supervisor, [`supervise`]) runs samba-tool in its sync loop.
//! samba-tool follows password and account changes through DirSync and calls its `--script`
//! once per changed object, with no arguments and the object's *current state* as LDIF on stdin;
//! it goes on only when the script answers a line beginning `DONE-EXIT: `, else it stops and
//! resumes from its cache at its next start. The script is this same program: run with no
//! arguments and `PWSYNC_SAMBA_HOOK` naming the agent config, it is the hook ([`hook`]).
//!
//! What the hook guarantees:
//! - **Nothing lost.** `DONE-EXIT` is printed only after every change the object yields is
//!   durable in the agent's spool (the agent answered, after its fsync), and after the hook's
//!   own record of the object is committed. When the agent is down the hook fails, samba-tool
//!   stops, and the supervisor starts it again until the agent answers.
//! - **One submit per real change.** The object's state is compared with what the hook
//!   forwarded last for that object (`objectGUID`), kept in `STATE_DIR/samba-hook.redb`: a keyed
//!   fingerprint (HMAC-SHA256 under a key of its own, never the password) of the last password,
//!   the ACCOUNTDISABLE bit, `pwdLastSet`, whether it was deleted. A changed password is a
//!   replace; the bit set or cleared is a revoke or a resume; a deleted object (a tombstone,
//!   `isDeleted: TRUE`) is a remove of the name it had. A call that changes neither (another
//!   attribute, a repeated call after a crash) submits nothing.
//! - **First sight is not a change.** The first time the hook sees an object (the first pass
//!   after `--cache-ldb-initialize` delivers every account), it records the state and
//!   forwards only what is news: a password set after the hook's state was created
//!   (`pwdLastSet` against the state's creation time: a new account's first password). An
//!   account disabled before pwsync watched is recorded as disabled, not revoked elsewhere; a
//!   tombstone never seen alive is recorded, not removed (its name may be a live account's).
//! - **No cleartext, no change.** Where Samba keeps only hashes (`password hash userPassword
//!   schemes` without a GPG key or plaintext storage) the LDIF has no `virtualClearTextUTF8`: a
//!   new `pwdLastSet` is then logged as a password that cannot be synchronised, never forwarded.
//!
//! The password travels from stdin to the agent's socket in zeroizing buffers only. The hook
//! logs nothing itself (samba-tool reads its stdout and stderr as the answer, which must begin
//! with `DONE-EXIT: `): what it did goes in that one line, which samba-tool logs, and which names
//! the account and the ops, never a value.

use crate::api::{Request, Response};
use pwsync_proto::{Op, Secret, Untrusted};
use pwsync_runtime::fingerprint::FingerprintKey;
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeroize::Zeroizing;

/// `[samba]`: how `pwsync-agent samba-sync` runs `samba-tool user syncpasswords`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SambaConfig {
    /// The DC's smb.conf (samba-tool's `-s`).
    #[serde(default = "default_smb_conf")]
    pub smb_conf: PathBuf,
    /// Where the hook keeps its record of each account (`samba-hook.redb`) and samba-tool its
    /// sync cache (`syncpasswords-cache.ldb`).
    pub state_dir: PathBuf,
    /// The GNUPGHOME holding the private key of smb.conf's `password hash gpg key ids`: the sync
    /// then decrypts each password (`--decrypt-samba-gpg`). Leave out when the DC stores
    /// plaintext instead.
    #[serde(default)]
    pub gnupg_home: Option<PathBuf>,
    /// The samba-tool program.
    #[serde(default = "default_samba_tool")]
    pub samba_tool: PathBuf,
}

fn default_smb_conf() -> PathBuf {
    "/etc/samba/smb.conf".into()
}
fn default_samba_tool() -> PathBuf {
    "samba-tool".into()
}

/// The environment variable that makes `pwsync-agent` (run without arguments) the hook; its
/// value is the agent config.
pub const HOOK_ENV: &str = "PWSYNC_SAMBA_HOOK";

/// What samba-tool is asked to hand the hook for each object (objectGUID, isDeleted and
/// isRecycled always come).
pub const ATTRIBUTES: &str = "sAMAccountName,virtualClearTextUTF8,userAccountControl,pwdLastSet";

/// The ACCOUNTDISABLE bit of `userAccountControl`.
const ACCOUNTDISABLE: u32 = 0x2;

const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
pub enum SambaError {
    #[error("the object's LDIF: {0}")]
    Ldif(String),
    /// This object cannot be carried whole (undecodable, a value or name the agent would
    /// refuse): answered `DONE-EXIT` with the reason and counted, so it never holds the sync.
    #[error("{0}")]
    Uncarriable(String),
    #[error("the hook's state in {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error(
        "the agent did not take {op} for {}: {}",
        Untrusted(user),
        Untrusted(reason)
    )]
    NotTaken {
        op: Op,
        user: String,
        reason: String,
    },
}

/// One object as samba-tool hands it: attribute names (lower-cased) and their values.
#[derive(Default)]
pub struct Object {
    attrs: BTreeMap<String, Vec<Zeroizing<Vec<u8>>>>,
}

impl Object {
    /// Parses one object's LDIF (RFC 2849: `attr: value`, `attr:: base64`, folded lines begin
    /// with one space, `#` comments).
    pub fn parse(ldif: &[u8]) -> Result<Object, SambaError> {
        use base64::Engine;
        // samba-tool ends every object with an empty line. Input cut short (samba-tool killed
        // while writing it) could end inside a value, and a cut password is another password.
        if !ldif.ends_with(b"\n\n") {
            return Err(SambaError::Ldif(
                "the object is incomplete (no empty line at its end): not taken".into(),
            ));
        }
        let mut lines: Vec<Zeroizing<Vec<u8>>> = vec![];
        for raw in ldif.split(|b| *b == b'\n') {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            match (raw.first(), lines.last_mut()) {
                (Some(b' '), Some(last)) => last.extend_from_slice(&raw[1..]),
                (Some(b'#'), _) | (None, _) => {}
                _ => lines.push(Zeroizing::new(raw.to_vec())),
            }
        }
        let mut obj = Object::default();
        for line in lines {
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                return Err(SambaError::Uncarriable(format!(
                    "a line without ':' ({} bytes)",
                    line.len()
                )));
            };
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            let rest = &line[colon + 1..];
            let value = if let Some(b64) = rest.strip_prefix(b":") {
                let b64 = b64.trim_ascii();
                let mut out = Zeroizing::new(vec![0u8; b64.len()]);
                let n = base64::engine::general_purpose::STANDARD
                    .decode_slice(b64, &mut out[..])
                    .map_err(|e| {
                        SambaError::Uncarriable(format!("{}: bad base64 ({e})", Untrusted(&name)))
                    })?;
                out.truncate(n);
                out
            } else if rest.starts_with(b"<") {
                return Err(SambaError::Ldif(format!(
                    "{name}: URL values are not taken"
                )));
            } else {
                Zeroizing::new(rest.strip_prefix(b" ").unwrap_or(rest).to_vec())
            };
            obj.attrs.entry(name).or_default().push(value);
        }
        Ok(obj)
    }

    fn text(&self, attr: &str) -> Option<String> {
        self.attrs
            .get(attr)
            .and_then(|v| v.first())
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
    }

    fn number(&self, attr: &str) -> Result<Option<u64>, SambaError> {
        self.text(attr)
            .map(|t| {
                t.parse::<i64>().map(|n| n.max(0) as u64).map_err(|_| {
                    SambaError::Uncarriable(format!("{attr} is not a number: {}", Untrusted(&t)))
                })
            })
            .transpose()
    }
}

/// What the hook remembers of one object (by objectGUID).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// The keyed fingerprint of the last password forwarded (or recorded at first sight).
    pub fingerprint: Option<[u8; 32]>,
    pub disabled: bool,
    pub deleted: bool,
    pub pwd_last_set: u64,
}

const RECORD_VERSION: u8 = 1;

fn encode(r: &Record) -> Vec<u8> {
    let mut out = vec![RECORD_VERSION];
    out.extend(postcard::to_allocvec(r).unwrap_or_default());
    out
}

fn decode(bytes: &[u8]) -> Option<Record> {
    match bytes.split_first() {
        Some((&RECORD_VERSION, rest)) => postcard::from_bytes(rest).ok(),
        _ => None,
    }
}

/// One change to submit.
pub struct Planned {
    pub user: String,
    pub op: Op,
    pub values: Vec<Secret>,
}

/// Why an object yields no change, besides having none (logged).
#[derive(Debug, PartialEq, Eq)]
pub enum Note {
    /// The password changed but Samba handed no cleartext.
    NoCleartext,
    /// A tombstone of an object never seen alive.
    UnknownTombstone,
}

/// The decision for one object: the changes to submit and the record to keep. Pure: `fingerprint`
/// is the keyed fingerprint of the cleartext, if any; `baseline` is the state's creation time
/// in `pwdLastSet` units (100 ns since 1601).
pub fn plan(
    obj: &Object,
    fingerprint: Option<[u8; 32]>,
    prev: Option<&Record>,
    baseline: u64,
) -> Result<(Vec<Planned>, Record, Option<Note>), SambaError> {
    let deleted = obj
        .text("isdeleted")
        .is_some_and(|v| v.eq_ignore_ascii_case("TRUE"));
    let name = obj.text("samaccountname").unwrap_or_default();
    let pwd_last_set = obj.number("pwdlastset")?.unwrap_or(0);
    let mut planned = vec![];
    if deleted {
        let record = Record {
            deleted: true,
            ..prev.cloned().unwrap_or(Record {
                name: name.clone(),
                ..Record::default()
            })
        };
        return Ok(match prev {
            Some(p) if !p.deleted => {
                planned.push(Planned {
                    user: p.name.clone(),
                    op: Op::Remove,
                    values: vec![],
                });
                (planned, record, None)
            }
            Some(_) => (planned, record, None),
            None => (planned, record, Some(Note::UnknownTombstone)),
        });
    }
    if name.is_empty() {
        return Err(SambaError::Ldif(
            "no sAMAccountName (add it to --attributes of --cache-ldb-initialize)".into(),
        ));
    }
    let control = obj
        .number("useraccountcontrol")?
        .map(|v| v as u32)
        .ok_or_else(|| {
            SambaError::Ldif(
                "no userAccountControl (add it to --attributes of --cache-ldb-initialize)".into(),
            )
        })?;
    let disabled = control & ACCOUNTDISABLE != 0;
    let mut note = None;
    let mut record = Record {
        name: name.clone(),
        fingerprint: prev.and_then(|p| p.fingerprint),
        disabled,
        deleted: false,
        pwd_last_set,
    };
    match (fingerprint, obj.attrs.get("virtualcleartextutf8")) {
        (Some(fp), Some(values)) if prev.and_then(|p| p.fingerprint) != Some(fp) => {
            record.fingerprint = Some(fp);
            if prev.is_some() || pwd_last_set > baseline {
                planned.push(Planned {
                    user: name.clone(),
                    op: Op::Replace,
                    values: values
                        .iter()
                        .take(1)
                        .map(|v| Secret::new(v.to_vec()))
                        .collect(),
                });
            }
        }
        (None, _) if prev.is_some_and(|p| p.pwd_last_set != pwd_last_set) => {
            note = Some(Note::NoCleartext)
        }
        _ => {}
    }
    let was_disabled = prev.map(|p| p.disabled);
    match (was_disabled, disabled) {
        (Some(false), true) => planned.push(Planned {
            user: name.clone(),
            op: Op::Revoke,
            values: vec![],
        }),
        (Some(true), false) => planned.push(Planned {
            user: name,
            op: Op::Resume,
            values: vec![],
        }),
        _ => {}
    }
    Ok((planned, record, note))
}

/// The hook's durable state: `STATE_DIR/samba-hook.redb` (mode 0600).
pub struct HookState {
    db: Database,
    path: PathBuf,
    key: FingerprintKey,
    /// When the state was created, in `pwdLastSet` units.
    pub baseline: u64,
}

/// Now in `pwdLastSet` units: 100 ns since 1601-01-01.
pub fn filetime_now() -> u64 {
    const UNIX_EPOCH_IN_FILETIME: u64 = 116_444_736_000_000_000;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UNIX_EPOCH_IN_FILETIME + (since.as_nanos() / 100) as u64
}

impl HookState {
    pub fn open(dir: &Path) -> Result<HookState, SambaError> {
        let path = dir.join("samba-hook.redb");
        let err = |message: String| SambaError::State {
            path: path.clone(),
            message,
        };
        pwsync_runtime::private_dir(dir).map_err(|e| err(format!("creating the folder: {e}")))?;
        let db = pwsync_runtime::redb_file::open_or_create(&path, None)
            .map_err(|e| err(e.to_string()))?;
        let txn = db.begin_write().map_err(|e| err(e.to_string()))?;
        let (key, baseline) = {
            txn.open_table(ACCOUNTS).map_err(|e| err(e.to_string()))?;
            let mut meta = txn.open_table(META).map_err(|e| err(e.to_string()))?;
            let key = FingerprintKey::load_or_create(&mut meta).map_err(|e| err(e.to_string()))?;
            let baseline = meta
                .get("created")
                .map_err(|e| err(e.to_string()))?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_le_bytes);
            let baseline = match baseline {
                Some(b) => b,
                None => {
                    let now = filetime_now();
                    meta.insert("created", &now.to_le_bytes()[..])
                        .map_err(|e| err(e.to_string()))?;
                    now
                }
            };
            (key, baseline)
        };
        txn.commit().map_err(|e| err(e.to_string()))?;
        Ok(HookState {
            key,
            db,
            path,
            baseline,
        })
    }

    /// Counts one object that could not be carried; the count so far.
    pub fn count_refusal(&self) -> Result<u64, SambaError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let n = {
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            let n = meta
                .get("refused")
                .map_err(|e| self.err(e))?
                .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0)
                + 1;
            meta.insert("refused", &n.to_le_bytes()[..])
                .map_err(|e| self.err(e))?;
            n
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(n)
    }

    /// The keyed fingerprint of an object's password.
    pub fn fingerprint(&self, guid: &str, password: &[u8]) -> [u8; 32] {
        self.key.of_password(guid, password)
    }

    fn err(&self, e: impl std::fmt::Display) -> SambaError {
        SambaError::State {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    pub fn get(&self, guid: &str) -> Result<Option<Record>, SambaError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(ACCOUNTS).map_err(|e| self.err(e))?;
        let value = table.get(guid).map_err(|e| self.err(e))?;
        // A record this version cannot read is treated as first sight (nothing is forwarded
        // that is not news), and overwritten.
        Ok(value.and_then(|v| decode(v.value())))
    }

    /// Records `r` for `guid`, durably.
    pub fn put(&self, guid: &str, r: &Record) -> Result<(), SambaError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(ACCOUNTS).map_err(|e| self.err(e))?;
            table
                .insert(guid, encode(r).as_slice())
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }
}

/// Hands `p` to the agent; `Ok` (with what to say of it) once it is durable, or once the agent
/// said it never will take it; `Err` when it cannot take it now.
fn submit(socket: &Path, p: Planned) -> Result<String, SambaError> {
    let (user, op) = (p.user.clone(), p.op);
    let shown = Untrusted(&user).to_string();
    let not_taken = |reason: String| SambaError::NotTaken {
        op,
        user: user.clone(),
        reason,
    };
    // Set in the directory already: forwarded as it is, never refused by the policy (a
    // consumer's dead letter names the rule a target cannot meet).
    let req = Request::Submit {
        user: p.user,
        op: p.op,
        values: p.values,
        attributes: pwsync_agent_api::committed_attributes(),
        // DirSync hands over the current state only: Samba's capture never knows the password
        // that was replaced.
        previous: None,
    };
    match pwsync_agent_api::blocking::request(socket, &req, Duration::from_secs(30)) {
        Ok(Response::Accepted { seq, durable: true }) => Ok(format!("{op} {shown} (seq {seq})")),
        Ok(Response::Accepted { durable: false, .. }) => Ok(format!(
            "{op} {shown} NOT KEPT (the agent is in lenient mode and could not spool it)"
        )),
        // Outside the agent's scope, or refused by rule: sending it again will not help, and
        // holding the sync here would stop every later change.
        Ok(Response::Ignored { reason }) => {
            Ok(format!("{op} {shown} ignored: {}", Untrusted(&reason)))
        }
        Ok(Response::Rejected { reason }) => Err(SambaError::Uncarriable(format!(
            "{op} {shown} REJECTED by the agent: {}",
            Untrusted(&reason)
        ))),
        Ok(Response::Unavailable { reason }) | Ok(Response::Error { message: reason }) => {
            Err(not_taken(reason))
        }
        Ok(other) => Err(not_taken(format!("unexpected answer {other:?}"))),
        Err(e) => Err(not_taken(e.to_string())),
    }
}

/// Whether the agent would take `p` as a valid change (the same rule it applies: a user name
/// of 1 to 256 bytes without control characters, 1 to 8 values of 1 to 1024 bytes each).
fn carriable(p: &Planned) -> Result<(), SambaError> {
    let change = pwsync_proto::Change {
        user: p.user.clone(),
        origin: "samba".into(),
        op: p.op,
        values: p.values.clone(),
        attributes: Default::default(),
        previous: None,
    };
    change.validate().map_err(|e| {
        SambaError::Uncarriable(format!(
            "{} {} cannot be synchronised: {e}",
            p.op,
            Untrusted(&p.user)
        ))
    })
}

/// The hook: reads one object from stdin, submits what it yields, records it, and returns the
/// `DONE-EXIT` line (one line: every name in it escaped). An error means samba-tool must stop
/// and try this object again later: only for what a later try can change (the agent
/// unreachable, the hook's state unwritable, samba-tool's configuration). An object pwsync
/// cannot carry whole is answered `DONE-EXIT` with the reason, counted in the hook's state and
/// `STATE_DIR/samba-hook-status.json`, and never holds the sync.
pub fn hook(socket: &Path, state_dir: &Path, input: &[u8]) -> Result<String, SambaError> {
    let state = HookState::open(state_dir)?;
    refuse_uncarriable(&state, state_dir, hook_object(socket, &state, input))
}

/// The answer for an object larger than the hook reads: not synchronised, counted.
pub fn oversize(state_dir: &Path) -> Result<String, SambaError> {
    let state = HookState::open(state_dir)?;
    refuse_uncarriable(
        &state,
        state_dir,
        Err(SambaError::Uncarriable(
            "an object larger than 1 MiB".into(),
        )),
    )
}

fn refuse_uncarriable(
    state: &HookState,
    state_dir: &Path,
    outcome: Result<String, SambaError>,
) -> Result<String, SambaError> {
    match outcome {
        Err(SambaError::Uncarriable(reason)) => {
            let refused = state.count_refusal()?;
            let status = serde_json::json!({ "refused_objects": refused });
            let path = state_dir.join("samba-hook-status.json");
            if let Err(e) = pwsync_runtime::replace_private(&path, format!("{status}\n").as_bytes())
            {
                return Err(state.err(format!("writing {}: {e}", path.display())));
            }
            Ok(format!(
                "DONE-EXIT: NOT synchronised ({refused} objects so far): {reason}"
            ))
        }
        other => other,
    }
}

fn hook_object(socket: &Path, state: &HookState, input: &[u8]) -> Result<String, SambaError> {
    let obj = Object::parse(input)?;
    let guid = obj
        .text("objectguid")
        .filter(|g| !g.is_empty())
        .ok_or_else(|| SambaError::Uncarriable("an object without objectGUID".into()))?;
    let prev = state.get(&guid)?;
    let fingerprint = obj
        .attrs
        .get("virtualcleartextutf8")
        .and_then(|v| v.first())
        .map(|pw| state.fingerprint(&guid, pw));
    let (planned, record, note) = plan(&obj, fingerprint, prev.as_ref(), state.baseline)?;
    let name = Untrusted(&record.name).to_string();
    let mut done = match note {
        Some(Note::NoCleartext) => vec![format!(
            "{name}: the password changed but the DC keeps no cleartext of it, so it cannot be synchronised (set `password hash gpg key ids` in smb.conf and gnupg_home in [samba], or store plaintext)"
        )],
        Some(Note::UnknownTombstone) => vec![format!(
            "{name}: deleted before pwsync saw it alive; recorded, not removed"
        )],
        None => vec![],
    };
    // What can never be carried is refused and counted; the object's other changes (a revoke
    // beside a refused password) are still sent, and the state is recorded as seen, so the same
    // state is refused once, not at every call. What the agent may take later stops the call.
    let mut refused = vec![];
    for p in planned {
        if let Err(SambaError::Uncarriable(why)) = carriable(&p) {
            refused.push(why);
            continue;
        }
        match submit(socket, p) {
            Ok(line) => done.push(line),
            Err(SambaError::Uncarriable(why)) => refused.push(why),
            Err(e) => return Err(e),
        }
    }
    state.put(&guid, &record)?;
    if !refused.is_empty() {
        done.extend(refused);
        return Err(SambaError::Uncarriable(done.join("; ")));
    }
    Ok(if done.is_empty() {
        format!("DONE-EXIT: {name}: no change to forward")
    } else {
        format!("DONE-EXIT: {}", done.join("; "))
    })
}

/// The command line samba-tool is started with, given the config and the cache's path.
fn samba_tool_args(cfg: &SambaConfig, initialize: bool, exe: &Path) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["user".into(), "syncpasswords".into()];
    let mut cache = std::ffi::OsString::from("--cache-ldb=");
    cache.push(cfg.state_dir.join("syncpasswords-cache.ldb"));
    args.push(cache);
    if initialize {
        args.push("--cache-ldb-initialize".into());
        args.push(format!("--attributes={ATTRIBUTES}").into());
        let mut script = std::ffi::OsString::from("--script=");
        script.push(exe);
        args.push(script);
        if cfg.gnupg_home.is_some() {
            args.push("--decrypt-samba-gpg".into());
        }
    }
    args.push("-s".into());
    args.push(cfg.smb_conf.clone().into());
    args
}

/// Runs samba-tool's sync loop until asked to stop: initialises its cache the first time
/// (pointing its `--script` at this program), then starts `samba-tool user syncpasswords` and
/// starts it again, after a pause that grows to a minute, whenever it stops (the hook failed
/// because the agent was down, or samba itself restarted).
pub async fn supervise(config_path: &Path, cfg: &SambaConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("finding this program's path for --script")?;
    pwsync_runtime::private_dir(&cfg.state_dir)
        .with_context(|| format!("creating {}", cfg.state_dir.display()))?;
    let config_path = std::fs::canonicalize(config_path)
        .with_context(|| format!("finding {}", config_path.display()))?;
    let command = |initialize: bool| {
        let mut c = tokio::process::Command::new(&cfg.samba_tool);
        c.args(samba_tool_args(cfg, initialize, &exe))
            .env(HOOK_ENV, &config_path)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe. samba-tool is stopped with its supervisor, even
        // one killed without a chance to clean up.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        if let Some(g) = &cfg.gnupg_home {
            c.env("GNUPGHOME", g);
        }
        c
    };
    if !cfg.state_dir.join("syncpasswords-cache.ldb").exists() {
        let out = command(true)
            .output()
            .await
            .with_context(|| format!("running {}", cfg.samba_tool.display()))?;
        if !out.status.success() {
            anyhow::bail!(
                "samba-tool user syncpasswords --cache-ldb-initialize failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        tracing::info!(cache = %cfg.state_dir.display(), "initialised samba-tool's sync cache");
    }
    let mut backoff = pwsync_runtime::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let stop = pwsync_runtime::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let started = std::time::Instant::now();
        let mut child = command(false)
            .spawn()
            .with_context(|| format!("starting {}", cfg.samba_tool.display()))?;
        tracing::info!(
            pid = child.id().unwrap_or(0),
            "samba-tool user syncpasswords started"
        );
        let status = tokio::select! {
            s = child.wait() => s?,
            _ = &mut stop => {
                let _ = child.kill().await;
                tracing::info!("stopped");
                return Ok(());
            }
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let pause = backoff.next_delay();
        tracing::warn!(%status, pause_ms = pause.as_millis() as u64, "samba-tool stopped (the hook could not hand a change to the agent, or samba went away); starting it again, it resumes from its cache");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = &mut stop => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(ldif: &str) -> Object {
        Object::parse(ldif.as_bytes()).unwrap()
    }

    const ALICE: &str = "dn: CN=alice,CN=Users,DC=samdom,DC=test\nobjectGUID: e528\nsAMAccountName: alice\nuserAccountControl: 512\npwdLastSet: 200\nvirtualClearTextUTF8:: TjN3LVNlY3JldCEx\n\n";

    #[test]
    fn ldif_values_plain_base64_and_folded() {
        let o = obj("# comment\ndn: CN=x\nsAMAccountName: al\n ice\nvirtualClearTextUTF8:: TjN3LVNl\n Y3JldCEx\n\n");
        assert_eq!(o.text("samaccountname").unwrap(), "alice");
        assert_eq!(&o.attrs["virtualcleartextutf8"][0][..], b"N3w-Secret!1");
        assert!(Object::parse(b"no colon here\n\n").is_err());
        assert!(Object::parse(b"a:: !!!\n\n").is_err());
        // Cut short: refused, even where what is there would decode.
        assert!(Object::parse(b"dn: x\nvirtualClearTextUTF8:: TjN3\n").is_err());
    }

    #[test]
    fn first_sight_records_old_passwords_and_forwards_new_ones() {
        let o = obj(ALICE);
        // Set before the state was created: recorded, not forwarded.
        let (p, r, _) = plan(&o, Some([1; 32]), None, 1_000).unwrap();
        assert!(p.is_empty());
        assert_eq!(r.fingerprint, Some([1; 32]));
        // Set after: forwarded.
        let (p, _, _) = plan(&o, Some([1; 32]), None, 100).unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].op, Op::Replace);
        assert_eq!(p[0].values[0].expose(), b"N3w-Secret!1");
        // Disabled before pwsync watched: recorded, not revoked.
        let off = obj(&ALICE.replace("512", "514"));
        let (p, r, _) = plan(&off, Some([1; 32]), None, 1_000).unwrap();
        assert!(p.is_empty() && r.disabled);
    }

    #[test]
    fn only_real_changes_are_forwarded() {
        let o = obj(ALICE);
        let (_, seen, _) = plan(&o, Some([1; 32]), None, 1_000).unwrap();
        // The same state again (a repeated call): nothing.
        let (p, _, _) = plan(&o, Some([1; 32]), Some(&seen), 1_000).unwrap();
        assert!(p.is_empty());
        // A new password: one replace.
        let (p, next, _) = plan(&o, Some([2; 32]), Some(&seen), 1_000).unwrap();
        assert_eq!(p.iter().map(|p| p.op).collect::<Vec<_>>(), [Op::Replace]);
        // Disabled, then enabled: revoke, then resume; the password is not sent again.
        let off = obj(&ALICE.replace("512", "514"));
        let (p, disabled, _) = plan(&off, Some([2; 32]), Some(&next), 1_000).unwrap();
        assert_eq!(p.iter().map(|p| p.op).collect::<Vec<_>>(), [Op::Revoke]);
        let (p, _, _) = plan(&o, Some([2; 32]), Some(&disabled), 1_000).unwrap();
        assert_eq!(p.iter().map(|p| p.op).collect::<Vec<_>>(), [Op::Resume]);
        // Deleted: a remove of the name it had, once.
        let gone = obj("dn: CN=alice\\0ADEL:e528,CN=Deleted Objects\nobjectGUID: e528\nsAMAccountName: alice\nisDeleted: TRUE\n\n");
        let (p, dead, _) = plan(&gone, None, Some(&next), 1_000).unwrap();
        assert_eq!(
            p.iter()
                .map(|p| (p.op, p.user.as_str()))
                .collect::<Vec<_>>(),
            [(Op::Remove, "alice")]
        );
        let (p, _, _) = plan(&gone, None, Some(&dead), 1_000).unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn tombstones_never_seen_alive_and_hashes_only_forward_nothing() {
        let gone = obj("dn: x\nobjectGUID: 9\nsAMAccountName: bob\nisDeleted: TRUE\n\n");
        let (p, _, note) = plan(&gone, None, None, 0).unwrap();
        assert!(p.is_empty());
        assert_eq!(note, Some(Note::UnknownTombstone));
        let hashed = obj("dn: x\nobjectGUID: 9\nsAMAccountName: bob\nuserAccountControl: 512\npwdLastSet: 300\nvirtualCryptSHA512: {CRYPT}$6$x\n\n");
        let prev = Record {
            name: "bob".into(),
            pwd_last_set: 200,
            ..Record::default()
        };
        let (p, _, note) = plan(&hashed, None, Some(&prev), 0).unwrap();
        assert!(p.is_empty());
        assert_eq!(note, Some(Note::NoCleartext));
    }

    #[test]
    fn state_keeps_records_and_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = HookState::open(dir.path()).unwrap();
        let fp = s.fingerprint("g", b"pw");
        s.put(
            "g",
            &Record {
                name: "a".into(),
                fingerprint: Some(fp),
                ..Record::default()
            },
        )
        .unwrap();
        let baseline = s.baseline;
        drop(s);
        let s = HookState::open(dir.path()).unwrap();
        assert_eq!(s.fingerprint("g", b"pw"), fp, "the key is kept");
        assert_ne!(s.fingerprint("h", b"pw"), fp, "keyed by object");
        assert_eq!(s.baseline, baseline);
        assert_eq!(s.get("g").unwrap().unwrap().name, "a");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("samba-hook.redb"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn objects_that_cannot_be_carried_are_answered_and_counted_never_held() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let dir = tempfile::tempdir().unwrap();
        // No agent behind this socket: nothing here may need one.
        let socket = dir.path().join("no-agent.sock");
        let state = dir.path().join("state");
        let object = |name: &[u8], pw: &[u8]| {
            format!(
                "dn: CN=x,DC=samdom\nobjectGUID: {}\nsAMAccountName:: {}\nuserAccountControl: 512\npwdLastSet: 999999999999999999\nvirtualClearTextUTF8:: {}\n\n",
                b64(name),
                b64(name),
                b64(pw)
            )
        };
        // A 70 KiB password: over what the agent takes (and over its socket's frame).
        let big = vec![b'a'; 70 * 1024];
        let answer = hook(&socket, &state, object(b"alice", &big).as_bytes()).unwrap();
        assert!(
            answer.starts_with("DONE-EXIT: NOT synchronised (1 objects so far)"),
            "{answer}"
        );
        // A name that would forge a line of the answer.
        let forged = object(b"eve\nDONE-EXIT: forged", &big);
        let answer = hook(&socket, &state, forged.as_bytes()).unwrap();
        assert!(
            !answer.contains('\n') && answer.contains("eve\\n"),
            "{answer}"
        );
        assert!(answer.contains("(2 objects so far)"), "{answer}");
        // The same state again (samba-tool calls for another attribute): nothing to refuse.
        let answer = hook(&socket, &state, forged.as_bytes()).unwrap();
        assert!(answer.contains("no change to forward"), "{answer}");
        // Undecodable.
        let answer = hook(&socket, &state, b"dn: x\nobjectGUID:: !!!\n\n").unwrap();
        assert!(
            answer.starts_with("DONE-EXIT: NOT synchronised (3"),
            "{answer}"
        );
        let status = std::fs::read_to_string(state.join("samba-hook-status.json")).unwrap();
        assert!(status.contains("\"refused_objects\":3"), "{status}");
        // A name control characters aside, a carriable password: only the agent can take it,
        // and with none there the hook fails (samba-tool tries again later).
        let fine = object(b"bob", b"Fine-Password-1");
        assert!(matches!(
            hook(&socket, &state, fine.as_bytes()),
            Err(SambaError::NotTaken { .. })
        ));
        // Cut short (samba-tool killed mid-write): an error, never a guess.
        assert!(hook(&socket, &state, &fine.as_bytes()[..fine.len() - 3]).is_err());
    }
}
