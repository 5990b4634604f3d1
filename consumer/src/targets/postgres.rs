//! `postgres`: PostgreSQL, in one of two modes.
//!
//! - `role`: the account is a database role. replace and add run `ALTER ROLE … PASSWORD` with a
//!   SCRAM-SHA-256 verifier computed here, so the cleartext never reaches the server or its
//!   logs; delete clears the password if the given value is the current one (checked against
//!   the stored verifier); revoke and remove set `NOLOGIN`, resume `LOGIN`.
//! - `table`: an application's own users table. replace and add run the configured
//!   `update_sql` with `$1` = a hash computed here (`bcrypt` or `argon2id`) and `$2` = the
//!   account; revoke, resume and remove run their configured statements with `$1` = the
//!   account. No row updated means no such user (yet).
//!
//! The connection's own password is read from a file (mode 0600). In role mode the roles the
//! connection acts as (`session_user`, `current_user`, as the server names them at each
//! connection, whatever the connect string said) are never changed. Connection failures and
//! transient server states (connection exceptions, shutdown, resource shortage, serialization
//! failures) are retried; an unknown role waits for the no-such-user window; anything else is a
//! dead letter with the server's message.

use super::observed::{Observed, Seen, Verifier};
use super::{Limits, Outcome, Target, Unusable};
use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine;
use postgres::error::SqlState;
use pwsync_proto::{Change, Op};
use serde::Deserialize;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use zeroize::Zeroizing;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Role,
    Table,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Hash {
    #[default]
    Bcrypt,
    Argon2id,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style connection string without the password, e.g.
    /// `host=db.example.org port=5432 user=pwsync dbname=app sslmode=require`.
    pub connect: String,
    /// A file holding the connection's password (mode 0600).
    pub password_file: PathBuf,
    pub mode: Mode,
    /// table mode: `UPDATE … SET hash_column = $1 WHERE login_column = $2`.
    #[serde(default)]
    pub update_sql: Option<String>,
    /// table mode: the hash written by `update_sql`. Default bcrypt.
    #[serde(default)]
    pub hash: Hash,
    /// table mode: statements for the account operations, `$1` = the account.
    #[serde(default)]
    pub revoke_sql: Option<String>,
    #[serde(default)]
    pub resume_sql: Option<String>,
    #[serde(default)]
    pub remove_sql: Option<String>,
    /// table mode, for the account audit: `SELECT hash_column[, changed_at_column] FROM … WHERE
    /// login_column = $1` (the stored hash as text; a `timestamptz` of the last change where the
    /// table keeps one). Without it the audit has nothing to compare here.
    #[serde(default)]
    pub audit_sql: Option<String>,
    /// bcrypt cost in table mode. Default 10.
    #[serde(default = "default_cost")]
    pub bcrypt_cost: u32,
    /// Seconds for connecting. Default 10.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_cost() -> u32 {
    10
}
fn default_timeout() -> u64 {
    10
}

pub struct Postgres {
    cfg: PostgresConfig,
    /// The role this target logs in as (`user=` of the connect string).
    login: Option<String>,
    password: Zeroizing<String>,
    /// The connection, with the roles it acts as (`session_user`, `current_user`), as the
    /// server named them when it was made.
    client: Mutex<Option<(postgres::Client, Vec<String>)>>,
}

/// Double-quotes an identifier for SQL.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether `password` matches a stored `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` verifier.
pub fn scram_matches(verifier: &str, password: &[u8]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let parse = || -> Option<bool> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored_key, _) = keys.split_once(':')?;
        let iter = NonZeroU32::new(iter.parse().ok()?)?;
        let salt = b64.decode(salt).ok()?;
        let stored_key = b64.decode(stored_key).ok()?;
        let prepared = saslprep(password);
        let mut salted = Zeroizing::new([0u8; 32]);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iter,
            &salt,
            &prepared,
            &mut salted[..],
        );
        let client_key = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &salted[..]),
            b"Client Key",
        );
        Some(digest::digest(&digest::SHA256, client_key.as_ref()).as_ref() == stored_key.as_slice())
    };
    parse().unwrap_or(false)
}

/// The bytes PostgreSQL (and `postgres_protocol`) derive a SCRAM verifier from: the SASLprep
/// form of a UTF-8 password (NFKC, non-ASCII spaces to spaces, ...), else the bytes as they are.
fn saslprep(password: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        std::str::from_utf8(password)
            .ok()
            .and_then(|s| stringprep::saslprep(s).ok())
            .map(|s| s.into_owned().into_bytes())
            .unwrap_or_else(|| password.to_vec()),
    )
}

/// The longest identifier PostgreSQL keeps (NAMEDATALEN - 1); longer ones are cut to this with
/// only a NOTICE, which would name another role.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

fn classify(what: &str, e: &postgres::Error) -> Outcome {
    let msg = format!(
        "{what}: {}",
        e.as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())
    );
    match e.code() {
        None => Outcome::RetryLater(msg),
        Some(c) if *c == SqlState::UNDEFINED_OBJECT => Outcome::NoSuchUser(msg),
        Some(c)
            if c.code().starts_with("08")
                || c.code().starts_with("53")
                || c.code().starts_with("57") =>
        {
            Outcome::RetryLater(msg)
        }
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            Outcome::RetryLater(msg)
        }
        Some(_) => Outcome::Failed(msg),
    }
}

impl Postgres {
    pub fn new(cfg: PostgresConfig, base: &Path) -> Result<Postgres, String> {
        let file = pwsync_runtime::resolve(base, &cfg.password_file);
        pwsync_proto::keys::check_private_mode(&file).map_err(|e| e.to_string())?;
        let text = Zeroizing::new(
            std::fs::read_to_string(&file)
                .map_err(|e| format!("reading password_file {}: {e}", file.display()))?,
        );
        if cfg.mode == Mode::Table && cfg.update_sql.is_none() {
            return Err(
                "mode = \"table\" needs update_sql (with $1 = the hash, $2 = the account)".into(),
            );
        }
        let parsed = cfg
            .connect
            .parse::<postgres::Config>()
            .map_err(|e| format!("connect string: {e}"))?;
        Ok(Postgres {
            login: parsed.get_user().map(str::to_string),
            password: Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string()),
            cfg,
            client: Mutex::new(None),
        })
    }

    fn connect(&self) -> Result<postgres::Client, Outcome> {
        let mut config: postgres::Config = self
            .cfg
            .connect
            .parse()
            .map_err(|e| Outcome::Failed(format!("connect string: {e}")))?;
        config
            .password(self.password.as_bytes())
            .connect_timeout(Duration::from_secs(self.cfg.timeout_secs));
        // Whatever stops this target's own connection (the server down, its login refused) is
        // not the change's fault: retried, loudly, never a dead letter.
        config.connect(postgres::NoTls).map_err(|e| match classify("connecting", &e) {
            Outcome::Failed(m) | Outcome::RetryLater(m) | Outcome::NoSuchUser(m) => {
                Outcome::Unavailable(format!(
                    "this target's own connection as {} failed: {m}; check connect and password_file",
                    self.login.as_deref().unwrap_or("(default user)")
                ))
            }
            other => other,
        })
    }

    /// The roles a connection acts as, as the server names them (whatever the connect string
    /// said, or left to the default user).
    fn own_roles(client: &mut postgres::Client) -> Result<Vec<String>, Outcome> {
        let row = client
            .query_one("SELECT session_user::text, current_user::text", &[])
            .map_err(|e| classify("asking the server which role this target is", &e))?;
        Ok(vec![row.get(0), row.get(1)])
    }

    fn exec(
        client: &mut postgres::Client,
        what: &str,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64, Outcome> {
        client.execute(sql, params).map_err(|e| classify(what, &e))
    }

    fn role(&self, client: &mut postgres::Client, change: &Change, account: &str) -> Outcome {
        let role = ident(account);
        let sql = match change.op {
            Op::Replace | Op::Add => {
                let Some(v) = change.values.first() else {
                    return Outcome::Failed("no value".into());
                };
                // The verifier is not secret and holds no quote; ALTER ROLE takes no parameters.
                format!(
                    "ALTER ROLE {role} PASSWORD '{}'",
                    postgres_protocol::password::scram_sha_256(v.expose())
                )
            }
            Op::Delete => {
                let stored: Option<String> = match client.query_opt(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                    &[&account],
                ) {
                    Ok(Some(row)) => row.get(0),
                    Ok(None) => return Outcome::NoSuchUser(format!("no role {account}")),
                    Err(e) => return classify("reading the role's verifier", &e),
                };
                // No value: every password goes.
                let current = stored.is_some_and(|s| {
                    change.values.is_empty()
                        || change.values.iter().any(|v| scram_matches(&s, v.expose()))
                });
                if !current {
                    return Outcome::Applied;
                }
                format!("ALTER ROLE {role} PASSWORD NULL")
            }
            Op::Revoke | Op::Remove => format!("ALTER ROLE {role} NOLOGIN"),
            Op::Resume => format!("ALTER ROLE {role} LOGIN"),
            Op::Lost => return Outcome::Applied,
        };
        match Self::exec(client, "ALTER ROLE", &sql, &[]) {
            Ok(_) => Outcome::Applied,
            Err(o) => o,
        }
    }

    fn hash(&self, password: &[u8]) -> Result<String, Outcome> {
        match self.cfg.hash {
            Hash::Bcrypt => bcrypt::non_truncating_hash_with_result(password, self.cfg.bcrypt_cost)
                .map(|h| h.format_for_version(bcrypt::Version::TwoY))
                .map_err(|e| Outcome::Failed(format!("bcrypt: {e}"))),
            Hash::Argon2id => {
                use argon2::password_hash::{PasswordHasher, SaltString};
                let mut raw = [0u8; 16];
                aws_lc_rs::rand::fill(&mut raw).map_err(|e| Outcome::RetryLater(e.to_string()))?;
                let salt =
                    SaltString::encode_b64(&raw).map_err(|e| Outcome::Failed(e.to_string()))?;
                argon2::Argon2::default()
                    .hash_password(password, &salt)
                    .map(|h| h.to_string())
                    .map_err(|e| Outcome::Failed(format!("argon2: {e}")))
            }
        }
    }

    fn table(&self, client: &mut postgres::Client, change: &Change, account: &str) -> Outcome {
        let (what, sql) = match change.op {
            Op::Replace | Op::Add => {
                let Some(v) = change.values.first() else {
                    return Outcome::Failed("no value".into());
                };
                let hash = match self.hash(v.expose()) {
                    Ok(h) => h,
                    Err(o) => return o,
                };
                let sql = self.cfg.update_sql.as_deref().unwrap_or_default();
                return match Self::exec(client, "update_sql", sql, &[&hash, &account]) {
                    Ok(0) => {
                        Outcome::NoSuchUser(format!("update_sql changed no row for {account}"))
                    }
                    Ok(_) => Outcome::Applied,
                    Err(o) => o,
                };
            }
            Op::Revoke => ("revoke_sql", &self.cfg.revoke_sql),
            Op::Resume => ("resume_sql", &self.cfg.resume_sql),
            Op::Remove => ("remove_sql", &self.cfg.remove_sql),
            Op::Delete => {
                return Outcome::Failed(
                    "delete of a value is not supported in table mode (one hash per account)"
                        .into(),
                )
            }
            Op::Lost => return Outcome::Applied,
        };
        let Some(sql) = sql else {
            return Outcome::Failed(format!(
                "{} arrived, but this target has no {what}",
                change.op
            ));
        };
        match Self::exec(client, what, sql, &[&account]) {
            Ok(0) => Outcome::NoSuchUser(format!("{what} changed no row for {account}")),
            Ok(_) => Outcome::Applied,
            Err(o) => o,
        }
    }
}

impl Postgres {
    /// Runs `f` on the kept connection (opened first if needed, with the roles it acts as); a
    /// connection whose operation was retried or found the server unavailable is dropped.
    fn with_client(&self, f: impl FnOnce(&mut postgres::Client, &[String]) -> Outcome) -> Outcome {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_mut().is_none_or(|(c, _)| c.is_closed()) {
            match self.connect().and_then(|mut c| {
                let own = Self::own_roles(&mut c)?;
                Ok((c, own))
            }) {
                Ok(c) => *slot = Some(c),
                Err(o) => return o,
            }
        }
        let Some((client, own)) = slot.as_mut() else {
            return Outcome::RetryLater("no connection".into());
        };
        let outcome = f(client, own);
        if matches!(outcome, Outcome::RetryLater(_) | Outcome::Unavailable(_)) {
            *slot = None;
        }
        outcome
    }
}

impl Target for Postgres {
    fn apply(&self, change: &Change, account: &str) -> Outcome {
        self.with_client(|client, own| match self.cfg.mode {
            // The roles this connection acts as are roles this mode changes: never those.
            Mode::Role if own.iter().any(|r| r == account) => super::own_login(&format!(
                "role {account:?} is the one this target connects as (session_user or current_user)"
            )),
            Mode::Role => self.role(client, change, account),
            Mode::Table => self.table(client, change, account),
        })
    }

    /// Role mode: the role's stored verifier (`pg_authid.rolpassword`, readable by a superuser
    /// only); PostgreSQL keeps no time of a password change. Table mode: what `audit_sql` reads
    /// (the hash, and a change time where the table keeps one); nothing without it.
    fn observe(&self, account: &str) -> Observed {
        let (what, sql) = match (self.cfg.mode, &self.cfg.audit_sql) {
            (Mode::Role, _) => (
                "reading the role's verifier (pg_authid: a superuser's)",
                "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            ),
            (Mode::Table, Some(sql)) => ("audit_sql", sql.as_str()),
            (Mode::Table, None) => return Observed::Unsupported,
        };
        let mut seen = None;
        let outcome = self.with_client(|client, _| match client.query_opt(sql, &[&account]) {
            Ok(row) => {
                seen = Some(row.map(|r| {
                    let stored = r.try_get::<_, Option<String>>(0).ok().flatten();
                    let at = (r.len() > 1)
                        .then(|| {
                            r.try_get::<_, Option<std::time::SystemTime>>(1)
                                .ok()
                                .flatten()
                        })
                        .flatten()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_millis() as u64);
                    (stored.unwrap_or_default(), at)
                }));
                Outcome::Applied
            }
            Err(e) => classify(what, &e),
        });
        match (outcome, seen) {
            (Outcome::Applied, Some(None)) => Observed::Missing,
            (Outcome::Applied, Some(Some((stored, at)))) => Observed::Present(Seen {
                changed_at_ms: at,
                changed_by: None,
                verifier: Some(Verifier::Stored(Zeroizing::new(stored.into_bytes()))),
            }),
            (other, _) => Observed::Unreadable(other.reason().to_string()),
        }
    }

    fn check(&self) -> Result<(), Unusable> {
        self.connect()
            .map(|_| ())
            .map_err(|o| Unusable::NotNow(o.reason().to_string()))
    }

    fn limits(&self) -> Limits {
        let names = Limits {
            max_account_bytes: MAX_IDENTIFIER_BYTES,
            password_utf8: false,
            ..Limits::text("")
        };
        match (self.cfg.mode, self.cfg.hash) {
            (Mode::Role, _) => Limits {
                scheme: "SCRAM-SHA-256",
                // ALTER ROLE … PASSWORD leaves NOLOGIN as it was.
                new_password_unlocks: false,
                ..names
            },
            (Mode::Table, Hash::Bcrypt) => Limits {
                scheme: "bcrypt",
                max_password_bytes: 71,
                longer_passwords: "set hash = \"argon2id\" for this target",
                // An application's own table: names are what its column holds.
                max_account_bytes: pwsync_proto::limits::MAX_USER_BYTES,
                ..names
            },
            (Mode::Table, Hash::Argon2id) => Limits {
                scheme: "argon2id",
                max_account_bytes: pwsync_proto::limits::MAX_USER_BYTES,
                ..names
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scram_verifiers_made_by_postgres_protocol_verify() {
        let v = postgres_protocol::password::scram_sha_256(b"secret");
        assert!(scram_matches(&v, b"secret"));
        assert!(!scram_matches(&v, b"Secret"));
        assert!(!scram_matches("md5abc", b"secret"));
    }

    #[test]
    fn verifiers_of_passwords_saslprep_changes_still_match() {
        // NFD and a no-break space: the verifier is made from the SASLprep form (as the server
        // does at login), so the comparison must be too.
        for pw in ["Zoe\u{308}-nfd", "no\u{a0}break", "plain"] {
            let v = postgres_protocol::password::scram_sha_256(pw.as_bytes());
            assert!(scram_matches(&v, pw.as_bytes()), "{pw:?}");
        }
        let v = postgres_protocol::password::scram_sha_256(b"\xff not utf-8");
        assert!(scram_matches(&v, b"\xff not utf-8"));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(ident("alice"), "\"alice\"");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }
}
