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
//! diagnostic message. The bind password is read from a file (mode 0600), never from the config.
//! `ldaps://` and StartTLS verify the server against `ca_file` (or the system's roots); a
//! `ca_file` on a plain connection is a config error rather than a silent downgrade.
//! One connection is kept and re-opened (and re-bound) after any failure.

use super::{Folding, Limits, Outcome, Target, Unusable};
use base64::Engine;
use ldap3::{
    dn_escape, ldap_escape, LdapConn, LdapConnSettings, LdapError, Mod, Scope, SearchEntry,
};
use pwsync_proto::{Change, Op, Secret};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
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

/// A DN in a form two spellings of one DN share (case, spaces around `,` and `=`).
fn normal_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
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
    tls: Option<std::sync::Arc<pwsync_runtime::tls::ClientConfig>>,
    bind_password: Zeroizing<String>,
    conn: Mutex<Option<LdapConn>>,
}

/// LDAP result codes (RFC 4511) that matter here.
mod rc {
    pub const NO_SUCH_ATTRIBUTE: u32 = 16;
    pub const ATTRIBUTE_OR_VALUE_EXISTS: u32 = 20;
    pub const NO_SUCH_OBJECT: u32 = 32;
    pub const BUSY: u32 = 51;
    pub const UNAVAILABLE: u32 = 52;
    pub const OTHER: u32 = 80;
}

/// The name RFC 4511 gives a result code.
pub fn result_name(rc: u32) -> &'static str {
    match rc {
        0 => "success",
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        11 => "adminLimitExceeded",
        12 => "unavailableCriticalExtension",
        13 => "confidentialityRequired",
        16 => "noSuchAttribute",
        17 => "undefinedAttributeType",
        18 => "inappropriateMatching",
        19 => "constraintViolation",
        20 => "attributeOrValueExists",
        21 => "invalidAttributeSyntax",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        54 => "loopDetect",
        64 => "namingViolation",
        65 => "objectClassViolation",
        66 => "notAllowedOnNonLeaf",
        67 => "notAllowedOnRDN",
        68 => "entryAlreadyExists",
        80 => "other",
        _ => "unknown result code",
    }
}

fn classify(what: &str, rc: u32, text: &str) -> Outcome {
    let msg = format!(
        "{what}: LDAP result {rc} {}{}",
        result_name(rc),
        if text.is_empty() {
            String::new()
        } else {
            format!(" ({text})")
        }
    );
    match rc {
        0 => Outcome::Applied,
        rc::NO_SUCH_OBJECT => Outcome::NoSuchUser(msg),
        rc::BUSY | rc::UNAVAILABLE | rc::OTHER => Outcome::RetryLater(msg),
        _ => Outcome::Failed(msg),
    }
}

fn conn_error(what: &str, e: &LdapError) -> Outcome {
    match e {
        LdapError::LdapResult { result } => classify(what, result.rc, &result.text),
        other => Outcome::RetryLater(format!("{what}: {other}")),
    }
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
        let file = pwsync_runtime::resolve(base, &cfg.bind_password_file);
        pwsync_proto::keys::check_private_mode(&file).map_err(|e| e.to_string())?;
        let text = Zeroizing::new(
            std::fs::read_to_string(&file)
                .map_err(|e| format!("reading bind_password_file {}: {e}", file.display()))?,
        );
        if cfg.dn_template.is_none() && cfg.search_base.is_none() {
            return Err("give dn_template, or search_base (and search_filter)".into());
        }
        for m in cfg.revoke.iter().chain(&cfg.resume) {
            if m.len() < 2 || !["add", "replace", "delete"].contains(&m[0].as_str()) {
                return Err(format!("revoke/resume modification {m:?} must be [add|replace|delete, attribute, values...]"));
            }
        }
        let uses_tls = cfg.starttls || cfg.url.starts_with("ldaps://");
        let tls = match &cfg.ca_file {
            Some(_) if !uses_tls => {
                return Err(format!(
                    "ca_file is set but {} is neither ldaps:// nor starttls = true: the password would travel in clear",
                    cfg.url
                ))
            }
            Some(ca) => {
                let ca = pwsync_runtime::resolve(base, ca);
                Some(pwsync_runtime::tls::client_config(Some(&ca), None).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let template = cfg.dn_template.as_deref().unwrap_or(&cfg.search_filter);
        let name_attribute = match &cfg.name_attribute {
            Some(a) => a.clone(),
            None => naming_attribute(template).ok_or_else(|| {
                format!("cannot tell which attribute holds the account name in {template:?} (expected ATTR={{user}}); set name_attribute")
            })?,
        };
        Ok(Ldap {
            name_attribute,
            tls,
            bind_password: Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string()),
            cfg,
            conn: Mutex::new(None),
        })
    }

    fn connect(&self) -> Result<LdapConn, Outcome> {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(Duration::from_secs(self.cfg.timeout_secs))
            .set_starttls(self.cfg.starttls);
        let settings = match &self.tls {
            Some(config) => settings.set_config(config.clone()),
            None => settings,
        };
        let mut conn = LdapConn::with_settings(settings, &self.cfg.url)
            .map_err(|e| Outcome::Unavailable(format!("connecting to {}: {e}", self.cfg.url)))?;
        conn.with_timeout(Duration::from_secs(self.cfg.timeout_secs));
        match conn.simple_bind(&self.cfg.bind_dn, &self.bind_password) {
            Ok(r) if r.rc == 0 => Ok(conn),
            // A bind refused for credentials will not get better by itself, but an operator can
            // fix it without losing the change: keep retrying.
            Ok(r) => Err(Outcome::Unavailable(format!(
                "this target's own bind as {} is refused: LDAP result {} {} ({}); fix bind_dn or bind_password_file",
                self.cfg.bind_dn,
                r.rc,
                result_name(r.rc),
                r.text
            ))),
            Err(e) => Err(Outcome::Unavailable(format!(
                "bind as {}: {e}",
                self.cfg.bind_dn
            ))),
        }
    }

    /// The DN of `account`'s entry, after checking that the entry found is that account's: its
    /// naming attribute holds the account byte for byte (the directory compares names
    /// case-insensitively and ignores spaces, so a search for `Alice` finds `alice`), and it is
    /// not the entry this target binds as.
    fn find(&self, conn: &mut LdapConn, account: &str) -> Result<String, Outcome> {
        conn.with_timeout(Duration::from_secs(self.cfg.timeout_secs));
        let attr = self.name_attribute.as_str();
        let (base, scope, filter) = match &self.cfg.dn_template {
            Some(t) => (
                t.replace("{user}", &dn_escape(account)),
                Scope::Base,
                "(objectClass=*)".to_string(),
            ),
            None => (
                self.cfg.search_base.clone().unwrap_or_default(),
                Scope::Subtree,
                self.cfg
                    .search_filter
                    .replace("{user}", &ldap_escape(account)),
            ),
        };
        let (entries, res) = match conn.search(&base, scope, &filter, vec![attr]) {
            Ok(r) => (r.0, r.1),
            Err(e) => return Err(conn_error("search", &e)),
        };
        if res.rc != 0 {
            return Err(classify("search", res.rc, &res.text));
        }
        let mut entries = entries.into_iter().map(SearchEntry::construct);
        let entry = match (entries.next(), entries.next()) {
            (None, _) => {
                return Err(Outcome::NoSuchUser(format!(
                    "no entry for {account} under {base} with {filter}"
                )))
            }
            (Some(e), None) => e,
            (Some(_), Some(_)) => {
                return Err(Outcome::Failed(format!(
                    "{} entries match {filter} under {base}; expected one",
                    2 + entries.count()
                )))
            }
        };
        let names: Vec<&String> = entry
            .attrs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
            .flat_map(|(_, v)| v)
            .collect();
        if !names.iter().any(|n| n.as_str() == account) {
            return Err(Outcome::Failed(format!(
                "the entry found for account {account:?} is {}, whose {attr} is {names:?}: the directory matches names ignoring case and spaces, so it may be another person's; if it is the same person, map the user to that exact name (map = {{ {account:?} = \"NAME\" }})",
                entry.dn
            )));
        }
        if normal_dn(&entry.dn) == normal_dn(&self.cfg.bind_dn) {
            return Err(Outcome::Failed(format!(
                "refused: {} is the entry this target binds as; pwsync never changes its own login",
                entry.dn
            )));
        }
        Ok(entry.dn)
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
        let dn = match self.find(conn, account) {
            Ok(dn) => dn,
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
            (Op::Delete, _) => {
                let entry =
                    match conn.search(&dn, Scope::Base, "(objectClass=*)", vec!["userPassword"]) {
                        Ok(r) if r.1.rc == 0 => r.0.into_iter().next().map(SearchEntry::construct),
                        Ok(r) => return classify("read userPassword", r.1.rc, &r.1.text),
                        Err(e) => return conn_error("read userPassword", &e),
                    };
                let stored: Vec<String> = entry
                    .map(|e| {
                        let mut v = e.attrs.get("userPassword").cloned().unwrap_or_default();
                        for b in e.bin_attrs.get("userPassword").into_iter().flatten() {
                            v.push(String::from_utf8_lossy(b).into_owned());
                        }
                        v
                    })
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
    fn apply(&self, change: &Change, account: &str) -> Outcome {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match self.connect() {
                Ok(c) => *slot = Some(c),
                Err(o) => return o,
            }
        }
        let Some(conn) = slot.as_mut() else {
            return Outcome::RetryLater("no connection".into());
        };
        let outcome = self.apply_on(conn, change, account);
        if let Outcome::RetryLater(_) | Outcome::Unavailable(_) = outcome {
            // The connection may be what failed: open a fresh one next time.
            *slot = None;
        }
        outcome
    }

    fn check(&self) -> Result<(), Unusable> {
        self.connect()
            .map(|_| ())
            .map_err(|o| Unusable::NotNow(o.reason().to_string()))
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
