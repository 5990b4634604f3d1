//! `ldap`: an LDAP directory (OpenLDAP, 389-DS, Active Directory's LDAP), through ldap3.
//!
//! The entry is found by a DN template (`uid={user},ou=people,dc=example,dc=org`, the account
//! DN-escaped) or by a search (`search_base`, `search_filter` with `{user}` filter-escaped).
//!
//! | op | `password_mode = "exop"` (default) | `"ssha"` or `"crypt"` |
//! |---|---|---|
//! | replace | Password Modify extended operation (RFC 3062): the server hashes by its own policy | `userPassword` replaced by one value hashed here: `{SSHA}`, or `{CRYPT}` SHA-512 crypt (`$6$`) |
//! | add | as replace (the operation has no "add") | a hashed value added |
//! | delete | the stored values that verify against the given password (`{SSHA}`, `{SHA}`, `{CRYPT}$6$`/`$5$`, cleartext) are removed | same |
//! | revoke, resume | the configured modifications (default: OpenLDAP ppolicy `pwdAccountLockedTime`) | same |
//! | remove | the entry is deleted if `delete_entry`, else as revoke | same |
//!
//! Result codes are classified: busy, unavailable, unwilling, server down and connection
//! failures are retried; no such object waits for the account (the no-such-user window);
//! constraint violations, insufficient rights and the like are dead letters, with the server's
//! diagnostic message. The connection, its TLS and bind, and finding exactly the account's entry
//! are [`super::directory`]'s, shared with the `ad` target.

use super::directory::{self, classify, conn_error, rc, Connection, Locate, Session};
use super::observed::{Observed, Seen, Verifier};
use super::{Folding, Limits, Outcome, Target, Unusable};
use base64::Engine;
use ldap3::{dn_escape, LdapConn, Mod, Scope, SearchEntry};
use pwsync_proto::{Change, Op, Secret};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PasswordMode {
    #[default]
    Exop,
    /// `{SSHA}`: salted SHA-1, what `slappasswd` writes by default.
    Ssha,
    /// `{CRYPT}` with SHA-512 crypt (`$6$rounds=5000$…`), readable by crypt(3) everywhere.
    Crypt,
}

impl PasswordMode {
    /// The `userPassword` value for `password` (the exop mode has none: the server hashes).
    fn hash(self, password: &[u8]) -> Result<String, Outcome> {
        match self {
            PasswordMode::Exop => Err(Outcome::Failed("exop mode hashes on the server".into())),
            PasswordMode::Ssha => Ok(ssha(password)),
            PasswordMode::Crypt => {
                crypt_sha512(password).map_err(|e| Outcome::Failed(format!("SHA-512 crypt: {e}")))
            }
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS. Default false.
    #[serde(default)]
    pub starttls: bool,
    /// The CA (PEM) that signed the server's certificate, for `ldaps://` or StartTLS. Without it
    /// the system's roots are trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    pub bind_dn: String,
    /// A file holding the bind password (mode 0600).
    pub bind_password_file: PathBuf,
    /// The entry of a user: a DN with `{user}`, or leave out and use the search keys.
    #[serde(default)]
    pub dn_template: Option<String>,
    #[serde(default)]
    pub search_base: Option<String>,
    /// Filter with `{user}`; default `(uid={user})`.
    #[serde(default = "default_filter")]
    pub search_filter: String,
    #[serde(default)]
    pub password_mode: PasswordMode,
    /// Modifications for revoke: [op, attribute, value...], op one of add, replace, delete.
    #[serde(default = "default_revoke")]
    pub revoke: Vec<Vec<String>>,
    #[serde(default = "default_resume")]
    pub resume: Vec<Vec<String>>,
    /// remove deletes the entry (true) or revokes it (false, the default).
    #[serde(default)]
    pub delete_entry: bool,
    /// Seconds for connecting and for each operation. Default 10.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// The attribute whose value must be the account, exactly, on the entry found. Default: the
    /// attribute before `={user}` in `dn_template` or `search_filter`.
    #[serde(default)]
    pub name_attribute: Option<String>,
}

/// The attribute written as `ATTR={user}` in a DN template or filter.
fn naming_attribute(template: &str) -> Option<String> {
    let at = template.find("={user}")?;
    let attr: String = template[..at]
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == ';')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    (!attr.is_empty()).then_some(attr)
}

fn default_filter() -> String {
    "(uid={user})".into()
}
fn default_revoke() -> Vec<Vec<String>> {
    // OpenLDAP ppolicy: this value locks the account until an administrator unlocks it.
    vec![vec![
        "replace".into(),
        "pwdAccountLockedTime".into(),
        "000001010000Z".into(),
    ]]
}
fn default_resume() -> Vec<Vec<String>> {
    vec![vec!["delete".into(), "pwdAccountLockedTime".into()]]
}
fn default_timeout() -> u64 {
    10
}

pub struct Ldap {
    cfg: LdapConfig,
    /// The attribute that holds an entry's account name (`uid` of `uid={user},…`).
    name_attribute: String,
    session: Session,
}

/// `{SSHA}` of `password` with a random 8-byte salt.
pub fn ssha(password: &[u8]) -> String {
    let mut salt = [0u8; 8];
    let _ = aws_lc_rs::rand::fill(&mut salt);
    ssha_with_salt(password, &salt)
}

fn ssha_with_salt(password: &[u8], salt: &[u8]) -> String {
    let mut input = Zeroizing::new(password.to_vec());
    input.extend_from_slice(salt);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    let mut out = digest.as_ref().to_vec();
    out.extend_from_slice(salt);
    format!(
        "{{SSHA}}{}",
        base64::engine::general_purpose::STANDARD.encode(out)
    )
}

/// `{CRYPT}` SHA-512 crypt of `password` with a random 16-character salt and 5,000 rounds.
pub fn crypt_sha512(password: &[u8]) -> Result<String, sha_crypt::password_hash::Error> {
    use sha_crypt::PasswordHasher;
    // 12 random bytes are 16 salt characters, the most SHA-crypt uses.
    let mut salt = [0u8; 12];
    let _ = aws_lc_rs::rand::fill(&mut salt);
    let h = sha_crypt::ShaCrypt::SHA512.hash_password_with_salt(password, &salt)?;
    Ok(format!("{{CRYPT}}{h}"))
}

/// Whether a stored `userPassword` value is the given password (`{SSHA}`, `{SHA}`,
/// `{CRYPT}$6$`/`$5$` or cleartext; schemes this consumer cannot check never match).
pub fn stored_matches(stored: &str, password: &[u8]) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    if let Some(rest) = stored.strip_prefix("{CRYPT}") {
        use sha_crypt::PasswordVerifier;
        return match sha_crypt::PasswordHashRef::new(rest) {
            Ok(h) => sha_crypt::ShaCrypt::default()
                .verify_password(password, h)
                .is_ok(),
            Err(_) => false,
        };
    }
    if let Some(rest) = stored.strip_prefix("{SSHA}") {
        return match b64.decode(rest) {
            Ok(raw) if raw.len() > 20 => ssha_with_salt(password, &raw[20..]) == stored,
            _ => false,
        };
    }
    if let Some(rest) = stored.strip_prefix("{SHA}") {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, password);
        return b64.encode(d.as_ref()) == rest;
    }
    !stored.starts_with('{') && stored.as_bytes() == password
}

impl Ldap {
    pub fn new(cfg: LdapConfig, base: &Path) -> Result<Ldap, String> {
        if cfg.dn_template.is_none() && cfg.search_base.is_none() {
            return Err("give dn_template, or search_base (and search_filter)".into());
        }
        for m in cfg.revoke.iter().chain(&cfg.resume) {
            if m.len() < 2 || !["add", "replace", "delete"].contains(&m[0].as_str()) {
                return Err(format!("revoke/resume modification {m:?} must be [add|replace|delete, attribute, values...]"));
            }
        }
        let template = cfg.dn_template.as_deref().unwrap_or(&cfg.search_filter);
        let name_attribute = match &cfg.name_attribute {
            Some(a) => a.clone(),
            None => naming_attribute(template).ok_or_else(|| {
                format!("cannot tell which attribute holds the account name in {template:?} (expected ATTR={{user}}); set name_attribute")
            })?,
        };
        let session = Session::new(
            Connection {
                url: &cfg.url,
                starttls: cfg.starttls,
                ca_file: cfg.ca_file.as_ref(),
                bind_dn: &cfg.bind_dn,
                bind_password_file: &cfg.bind_password_file,
                timeout_secs: cfg.timeout_secs,
            },
            base,
        )?;
        Ok(Ldap {
            name_attribute,
            session,
            cfg,
        })
    }

    /// Where `account`'s entry is: its DN from the template, or the configured search.
    fn locate(&self, account: &str) -> Locate {
        match &self.cfg.dn_template {
            Some(t) => Locate::Dn(t.replace("{user}", &dn_escape(account))),
            None => Locate::Search {
                base: self.cfg.search_base.clone().unwrap_or_default(),
                filter: self.cfg.search_filter.clone(),
            },
        }
    }

    fn mods(spec: &[Vec<String>]) -> Vec<Mod<String>> {
        spec.iter()
            .map(|m| {
                let values: HashSet<String> = m[2..].iter().cloned().collect();
                match m[0].as_str() {
                    "add" => Mod::Add(m[1].clone(), values),
                    "replace" => Mod::Replace(m[1].clone(), values),
                    _ => Mod::Delete(m[1].clone(), values),
                }
            })
            .collect()
    }

    fn modify(conn: &mut LdapConn, dn: &str, mods: Vec<Mod<String>>, tolerate: &[u32]) -> Outcome {
        match conn.modify(dn, mods) {
            Ok(r) if r.rc == 0 || tolerate.contains(&r.rc) => Outcome::Applied,
            Ok(r) => classify("modify", r.rc, &r.text),
            Err(e) => conn_error("modify", &e),
        }
    }

    fn utf8(v: &Secret) -> Result<&str, Outcome> {
        std::str::from_utf8(v.expose()).map_err(|_| Outcome::Failed("the password is not UTF-8, which the Password Modify operation needs; use password_mode = \"ssha\" or \"crypt\"".into()))
    }

    fn apply_on(&self, conn: &mut LdapConn, change: &Change, account: &str) -> Outcome {
        let found = self.session.find(
            conn,
            &self.locate(account),
            &self.name_attribute,
            account,
            &[],
        );
        let dn = match found {
            Ok(entry) => entry.dn,
            // Deleting an entry that is gone already is done (a redelivery after a crash).
            Err(Outcome::NoSuchUser(_)) if change.op == Op::Remove && self.cfg.delete_entry => {
                return Outcome::Applied
            }
            Err(o) => return o,
        };
        let first = change.values.first();
        match (change.op, self.cfg.password_mode) {
            (Op::Replace | Op::Add, PasswordMode::Exop) => {
                let Some(v) = first else {
                    return Outcome::Failed("no value".into());
                };
                let new_pass = match Self::utf8(v) {
                    Ok(p) => p,
                    Err(o) => return o,
                };
                let exop = ldap3::exop::PasswordModify {
                    user_id: Some(&dn),
                    old_pass: None,
                    new_pass: Some(new_pass),
                };
                match conn.extended(exop) {
                    Ok(r) => classify("password modify", r.1.rc, &r.1.text),
                    Err(e) => conn_error("password modify", &e),
                }
            }
            (op @ (Op::Replace | Op::Add), mode) => {
                let hashes: HashSet<String> = match change
                    .values
                    .iter()
                    .map(|v| mode.hash(v.expose()))
                    .collect()
                {
                    Ok(h) => h,
                    Err(o) => return o,
                };
                if op == Op::Replace {
                    Self::modify(
                        conn,
                        &dn,
                        vec![Mod::Replace("userPassword".into(), hashes)],
                        &[],
                    )
                } else {
                    Self::modify(
                        conn,
                        &dn,
                        vec![Mod::Add("userPassword".into(), hashes)],
                        &[rc::ATTRIBUTE_OR_VALUE_EXISTS],
                    )
                }
            }
            // No value: every password goes (deleting an absent attribute is done already).
            (Op::Delete, _) if change.values.is_empty() => Self::modify(
                conn,
                &dn,
                vec![Mod::Delete("userPassword".into(), HashSet::new())],
                &[rc::NO_SUCH_ATTRIBUTE],
            ),
            (Op::Delete, _) => {
                let entry =
                    match conn.search(&dn, Scope::Base, "(objectClass=*)", vec!["userPassword"]) {
                        Ok(r) if r.1.rc == 0 => r.0.into_iter().next().map(SearchEntry::construct),
                        Ok(r) => return classify("read userPassword", r.1.rc, &r.1.text),
                        Err(e) => return conn_error("read userPassword", &e),
                    };
                let stored: Vec<String> = entry
                    .map(|e| directory::values(&e, "userPassword"))
                    .unwrap_or_default();
                let doomed: HashSet<String> = stored
                    .into_iter()
                    .filter(|s| change.values.iter().any(|v| stored_matches(s, v.expose())))
                    .collect();
                if doomed.is_empty() {
                    return Outcome::Applied; // not a stored value: nothing to delete
                }
                Self::modify(
                    conn,
                    &dn,
                    vec![Mod::Delete("userPassword".into(), doomed)],
                    &[rc::NO_SUCH_ATTRIBUTE],
                )
            }
            (Op::Revoke, _) => Self::modify(
                conn,
                &dn,
                Self::mods(&self.cfg.revoke),
                &[rc::ATTRIBUTE_OR_VALUE_EXISTS],
            ),
            (Op::Resume, _) => Self::modify(
                conn,
                &dn,
                Self::mods(&self.cfg.resume),
                &[rc::NO_SUCH_ATTRIBUTE],
            ),
            (Op::Remove, _) if self.cfg.delete_entry => match conn.delete(&dn) {
                Ok(r) if r.rc == 0 || r.rc == rc::NO_SUCH_OBJECT => Outcome::Applied,
                Ok(r) => classify("delete", r.rc, &r.text),
                Err(e) => conn_error("delete", &e),
            },
            (Op::Remove, _) => Self::modify(
                conn,
                &dn,
                Self::mods(&self.cfg.revoke),
                &[rc::ATTRIBUTE_OR_VALUE_EXISTS],
            ),
            (Op::Lost, _) => Outcome::Applied,
        }
    }
}

impl Target for Ldap {
    /// `pwdChangedTime` (kept by the ppolicy overlay), who made the entry's last change when
    /// that was the password's (`modifiersName`), and the stored `userPassword` values where
    /// the bind identity may read them.
    fn observe(&self, account: &str) -> Observed {
        let attrs = [
            "pwdChangedTime",
            "modifiersName",
            "modifyTimestamp",
            "userPassword",
        ];
        let entry = match directory::observe_entry(
            &self.session,
            &self.locate(account),
            &self.name_attribute,
            account,
            &attrs,
        ) {
            Ok(Some(e)) => e,
            Ok(None) => return Observed::Missing,
            Err(e) => return Observed::Unreadable(e),
        };
        let first = |attr: &str| directory::values(&entry, attr).into_iter().next();
        let changed = first("pwdChangedTime");
        let by = first("modifiersName")
            .filter(|_| changed.is_some() && first("modifyTimestamp") == changed);
        let mut stored = directory::values(&entry, "userPassword");
        stored.sort();
        Observed::Present(Seen {
            changed_at_ms: changed.as_deref().and_then(directory::generalized_time_ms),
            changed_by: by,
            verifier: (!stored.is_empty())
                .then(|| Verifier::Stored(Zeroizing::new(stored.join("\n").into_bytes()))),
        })
    }

    fn apply(&self, change: &Change, account: &str) -> Outcome {
        self.session
            .with_conn(|conn| self.apply_on(conn, change, account))
    }

    fn check(&self) -> Result<(), Unusable> {
        self.session.check()
    }

    fn limits(&self) -> Limits {
        let names = Limits {
            max_account_bytes: pwsync_proto::limits::MAX_USER_BYTES,
            account_edge_spaces: false,
            folding: Folding::CaseAndSpace,
            ..Limits::text("")
        };
        match self.cfg.password_mode {
            PasswordMode::Exop => Limits {
                scheme: "the server's own hash (Password Modify)",
                ..names
            },
            PasswordMode::Ssha => Limits {
                scheme: "{SSHA}",
                password_utf8: false,
                multi_valued: true,
                ..names
            },
            PasswordMode::Crypt => Limits {
                scheme: "{CRYPT} SHA-512 crypt",
                max_password_bytes: 511,
                longer_passwords:
                    "crypt(3) refuses 512 bytes or more; use password_mode = \"ssha\" or \"exop\"",
                password_utf8: false,
                multi_valued: true,
                ..names
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypt_sha512_matches_glibc_and_verifies() {
        let h = crypt_sha512(b"secret").unwrap();
        assert!(h.starts_with("{CRYPT}$6$rounds=5000$"), "{h}");
        assert!(stored_matches(&h, b"secret"));
        assert!(!stored_matches(&h, b"secreT"));
        // glibc: crypt("Hello world!", "$6$saltstring") (the SHA-crypt specification's vector)
        assert!(stored_matches(
            "{CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1",
            b"Hello world!"
        ));
        // Two hashes of one password differ (random salt).
        assert_ne!(crypt_sha512(b"secret").unwrap(), h);
    }

    #[test]
    fn ssha_verifies_and_other_schemes_do_not_match() {
        let h = ssha(b"secret");
        assert!(h.starts_with("{SSHA}"));
        assert!(stored_matches(&h, b"secret"));
        assert!(!stored_matches(&h, b"Secret"));
        assert!(stored_matches("plain", b"plain"));
        assert!(!stored_matches("{CRYPT}$6$x$y", b"x"));
        assert!(!stored_matches("{CRYPT}garbage", b"x"));
        // slappasswd -s secret -h {SHA}
        assert!(stored_matches(
            "{SHA}5en6G6MezRroT3XKqkdPOmY/BfQ=",
            b"secret"
        ));
    }
}
