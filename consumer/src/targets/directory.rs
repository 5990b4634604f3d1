//! What the directory targets (`ldap`, `ad`) share: one LDAP connection, kept, re-opened and
//! re-bound after any failure; result codes classified into [`Outcome`]s with their RFC 4511
//! names; and [`Session::find`], which finds exactly one account's entry.
//!
//! Guarantees: the bind password is read from a file of mode 0600 and kept in zeroizing
//! memory; `ldaps://` and StartTLS verify the server against `ca_file` (or the system's roots),
//! and a `ca_file` on a plain connection is a configuration error rather than a silent
//! downgrade; the entry `find` returns holds the account byte for byte in its naming attribute
//! (directories match names ignoring case and spaces, so a search for `Alice` finds `alice`) and
//! is never the entry the target binds as.

use super::{Outcome, Unusable};
use ldap3::{ldap_escape, LdapConn, LdapConnSettings, LdapError, Scope, SearchEntry};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use zeroize::Zeroizing;

/// LDAP result codes (RFC 4511) that matter here.
pub mod rc {
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

/// `what: LDAP result RC NAME (server's text)`.
pub fn describe(what: &str, rc: u32, text: &str) -> String {
    format!(
        "{what}: LDAP result {rc} {}{}",
        result_name(rc),
        if text.is_empty() {
            String::new()
        } else {
            format!(" ({text})")
        }
    )
}

/// A result code as an outcome: busy, unavailable and other are retried; no such object waits
/// for the account; everything else is a dead letter with the server's words.
pub fn classify(what: &str, rc: u32, text: &str) -> Outcome {
    let msg = describe(what, rc, text);
    match rc {
        0 => Outcome::Applied,
        rc::NO_SUCH_OBJECT => Outcome::NoSuchUser(msg),
        rc::BUSY | rc::UNAVAILABLE | rc::OTHER => Outcome::RetryLater(msg),
        _ => Outcome::Failed(msg),
    }
}

/// An ldap3 error as an outcome: a result is classified, anything else (the connection) retried.
pub fn conn_error(what: &str, e: &LdapError) -> Outcome {
    match e {
        LdapError::LdapResult { result } => classify(what, result.rc, &result.text),
        other => Outcome::RetryLater(format!("{what}: {other}")),
    }
}

/// A DN in a form two spellings of one DN share (case, spaces around `,` and `=`).
pub fn normal_dn(dn: &str) -> String {
    dn.split(',')
        .map(|rdn| rdn.split('=').map(str::trim).collect::<Vec<_>>().join("="))
        .collect::<Vec<_>>()
        .join(",")
        .to_lowercase()
}

/// How to reach and log in to a directory (the keys every directory target has).
pub struct Connection<'a> {
    pub url: &'a str,
    pub starttls: bool,
    pub ca_file: Option<&'a PathBuf>,
    pub bind_dn: &'a str,
    pub bind_password_file: &'a Path,
    pub timeout_secs: u64,
}

/// Where an account's entry is: a DN template (`{user}` DN-escaped by the caller) or a search.
pub enum Locate {
    /// The entry's DN itself.
    Dn(String),
    /// A subtree search under a base, with a filter whose `{user}` is filter-escaped here.
    Search { base: String, filter: String },
}

/// One directory connection, kept between changes.
pub struct Session {
    url: String,
    starttls: bool,
    bind_dn: String,
    timeout: Duration,
    tls: Option<std::sync::Arc<pwsync_runtime::tls::ClientConfig>>,
    bind_password: Zeroizing<String>,
    conn: Mutex<Option<LdapConn>>,
    /// The entry this target binds as (in [`normal_dn`] form), as the server said at the last
    /// bind.
    own_dn: Mutex<Option<String>>,
}

impl Session {
    /// Checks the keys and reads the bind password; connects only when first used.
    pub fn new(c: Connection<'_>, base: &Path) -> Result<Session, String> {
        let file = pwsync_runtime::resolve(base, c.bind_password_file);
        pwsync_proto::keys::check_private_mode(&file).map_err(|e| e.to_string())?;
        let text = Zeroizing::new(
            std::fs::read_to_string(&file)
                .map_err(|e| format!("reading bind_password_file {}: {e}", file.display()))?,
        );
        let uses_tls = c.starttls || c.url.starts_with("ldaps://");
        let tls = match c.ca_file {
            Some(_) if !uses_tls => {
                return Err(format!(
                    "ca_file is set but {} is neither ldaps:// nor starttls = true: the password would travel in clear",
                    c.url
                ))
            }
            Some(ca) => {
                let ca = pwsync_runtime::resolve(base, ca);
                Some(pwsync_runtime::tls::client_config(Some(&ca), None).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        Ok(Session {
            url: c.url.to_string(),
            starttls: c.starttls,
            bind_dn: c.bind_dn.to_string(),
            timeout: Duration::from_secs(c.timeout_secs),
            tls,
            bind_password: Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string()),
            conn: Mutex::new(None),
            own_dn: Mutex::new(None),
        })
    }

    /// Whether the connection is encrypted (`ldaps://` or StartTLS).
    pub fn encrypted(&self) -> bool {
        self.starttls || self.url.starts_with("ldaps://")
    }

    pub fn bind_dn(&self) -> &str {
        &self.bind_dn
    }

    /// Opens a connection and binds.
    fn settings(&self) -> LdapConnSettings {
        let settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout)
            .set_starttls(self.starttls);
        match &self.tls {
            Some(config) => settings.set_config(config.clone()),
            None => settings,
        }
    }

    pub fn connect(&self) -> Result<LdapConn, Outcome> {
        let mut conn = LdapConn::with_settings(self.settings(), &self.url)
            .map_err(|e| Outcome::Unavailable(format!("connecting to {}: {e}", self.url)))?;
        conn.with_timeout(self.timeout);
        match conn.simple_bind(&self.bind_dn, &self.bind_password) {
            Ok(r) if r.rc == 0 => {
                let own = self.who_am_i(&mut conn)?;
                *self.own_dn.lock().unwrap_or_else(|p| p.into_inner()) = Some(normal_dn(&own));
                Ok(conn)
            }
            // A bind refused for credentials will not get better by itself, but an operator can
            // fix it without losing the change: keep retrying.
            Ok(r) => Err(Outcome::Unavailable(format!(
                "this target's own bind as {} is refused: LDAP result {} {} ({}); fix bind_dn or bind_password_file",
                self.bind_dn,
                r.rc,
                result_name(r.rc),
                r.text
            ))),
            Err(e) => Err(Outcome::Unavailable(format!(
                "bind as {}: {e}",
                self.bind_dn
            ))),
        }
    }

    /// The DN of the entry this connection is bound as, as the server tells it.
    fn who_am_i(&self, conn: &mut LdapConn) -> Result<String, Outcome> {
        let answer = match conn.extended(ldap3::exop::WhoAmI) {
            Ok(r) if r.1.rc == 0 => r.0.val.map(|v| String::from_utf8_lossy(&v).into_owned()),
            _ => None,
        };
        let unknown = |why: String| {
            Outcome::Unavailable(format!(
                "cannot tell which entry this target logs in as ({why}), so it cannot keep from changing its own login; give bind_dn as the entry's DN"
            ))
        };
        let after = |prefix: &str| {
            let a = answer.as_deref()?;
            let head = a.get(..prefix.len())?;
            let rest = &a[prefix.len()..];
            (head.eq_ignore_ascii_case(prefix) && !rest.is_empty()).then_some(rest)
        };
        if let Some(dn) = after("dn:") {
            // The entry's stored spelling, which `find` compares with (a rootdn that is no
            // entry is its own answer: nothing can find it).
            return Ok(self.stored_dn(conn, dn).unwrap_or_else(|_| dn.to_string()));
        }
        if let Some(user) = after("u:") {
            let name = user.rsplit('\\').next().unwrap_or_default();
            return self
                .account_dn(conn, &format!("(sAMAccountName={})", ldap_escape(name)))
                .map_err(unknown);
        }
        // No answer (Samba before 4.19 has no "Who am I?"): the server says which entry the
        // configured spelling names.
        let bind = self.bind_dn.as_str();
        let found = if bind.contains('=') {
            // An entry the login may not read is known by the DN as written (as before this
            // check existed): it binds, so it is that entry in some spelling.
            Ok(self
                .stored_dn(conn, bind)
                .unwrap_or_else(|_| bind.to_string()))
        } else if let Some((_, name)) = bind.split_once('\\') {
            self.account_dn(conn, &format!("(sAMAccountName={})", ldap_escape(name)))
        } else if let Some((name, _)) = bind.split_once('@') {
            // A UPN: the one stored, or the implicit NAME@DNS-DOMAIN of sAMAccountName NAME.
            self.account_dn(conn, &format!("(userPrincipalName={})", ldap_escape(bind)))
                .or_else(|_| {
                    self.account_dn(conn, &format!("(sAMAccountName={})", ldap_escape(name)))
                })
        } else {
            Err(format!(
                "bind_dn {bind:?} is neither a DN, DOMAIN\\name nor a UPN"
            ))
        };
        found.map_err(|e| {
            unknown(format!(
                "the server answers no \"Who am I?\"{}, and {e}",
                answer
                    .as_deref()
                    .map(|a| format!(" that names an entry (it answered {a:?})"))
                    .unwrap_or_default()
            ))
        })
    }

    /// The DN of entry `dn` as the server stores it.
    fn stored_dn(&self, conn: &mut LdapConn, dn: &str) -> Result<String, String> {
        match conn.search(dn, Scope::Base, "(objectClass=*)", vec!["1.1"]) {
            Ok(r) if r.1.rc == 0 => {
                r.0.into_iter()
                    .find(|e| !e.is_ref())
                    .map(|e| SearchEntry::construct(e).dn)
                    .ok_or_else(|| format!("no entry {dn}"))
            }
            Ok(r) => Err(describe("reading the bind entry", r.1.rc, &r.1.text)),
            Err(e) => Err(format!("reading the bind entry: {e}")),
        }
    }

    /// The DN of the one entry `filter` finds under the server's default naming context.
    fn account_dn(&self, conn: &mut LdapConn, filter: &str) -> Result<String, String> {
        let base = Self::default_naming_context(conn)?;
        let found = conn
            .search(&base, Scope::Subtree, filter, vec!["1.1"])
            .map_err(|e| format!("looking up {filter}: {e}"))?;
        let mut dns = found
            .0
            .into_iter()
            .filter(|e| !e.is_ref())
            .map(|e| SearchEntry::construct(e).dn);
        match (dns.next(), dns.next()) {
            (Some(dn), None) => Ok(dn),
            _ => Err(format!("no single entry {filter} under {base}")),
        }
    }

    /// Whether the directory answers and takes this target's bind (for `check` and start-up).
    pub fn check(&self) -> Result<(), Unusable> {
        self.connect()
            .map(|_| ())
            .map_err(|o| Unusable::NotNow(o.reason().to_string()))
    }

    /// Whether `dn` binds with `password` on a connection of its own (the directory's own
    /// login check). A refusal counts against the account's lockout policy like any failed
    /// login, so it is asked only where the answer decides an outcome.
    pub fn binds_as(&self, dn: &str, password: &str) -> bool {
        let Ok(mut conn) = LdapConn::with_settings(self.settings(), &self.url) else {
            return false;
        };
        conn.with_timeout(self.timeout);
        let ok = matches!(conn.simple_bind(dn, password), Ok(r) if r.rc == 0);
        let _ = conn.unbind();
        ok
    }

    /// Runs a read `f` on the kept connection (opened first if needed); a connection whose read
    /// failed is dropped, so the next use opens a fresh one.
    pub fn read<T>(&self, f: impl FnOnce(&mut LdapConn) -> Result<T, String>) -> Result<T, String> {
        let mut out = None;
        let outcome = self.with_conn(|conn| {
            let r = f(conn);
            let o = match &r {
                Ok(_) => Outcome::Applied,
                Err(e) => Outcome::RetryLater(e.clone()),
            };
            out = Some(r);
            o
        });
        out.unwrap_or_else(|| Err(outcome.reason().to_string()))
    }

    /// The server's default naming context (the domain's DN in Active Directory).
    pub fn default_naming_context(conn: &mut LdapConn) -> Result<String, String> {
        let root = conn
            .search(
                "",
                Scope::Base,
                "(objectClass=*)",
                vec!["defaultNamingContext"],
            )
            .map_err(|e| format!("reading the root DSE: {e}"))?;
        root.0
            .into_iter()
            .filter(|e| !e.is_ref())
            .map(SearchEntry::construct)
            .flat_map(|e| values(&e, "defaultNamingContext"))
            .next()
            .ok_or_else(|| "the root DSE names no defaultNamingContext".to_string())
    }

    /// Runs `f` on the kept connection (opened first if needed); a connection whose operation
    /// was retried or found the target unavailable is dropped, so the next change opens a
    /// fresh one.
    pub fn with_conn(&self, f: impl FnOnce(&mut LdapConn) -> Outcome) -> Outcome {
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
        conn.with_timeout(self.timeout);
        let outcome = f(conn);
        if let Outcome::RetryLater(_) | Outcome::Unavailable(_) = outcome {
            *slot = None;
        }
        outcome
    }

    /// The entry of `account`, with `attrs` read, after checking that it is that account's: its
    /// `name_attribute` holds the account byte for byte, and it is not the entry this target
    /// binds as.
    pub fn find(
        &self,
        conn: &mut LdapConn,
        locate: &Locate,
        name_attribute: &str,
        account: &str,
        attrs: &[&str],
    ) -> Result<SearchEntry, Outcome> {
        conn.with_timeout(self.timeout);
        let (base, scope, filter) = match locate {
            Locate::Dn(dn) => (dn.clone(), Scope::Base, "(objectClass=*)".to_string()),
            Locate::Search { base, filter } => (
                base.clone(),
                Scope::Subtree,
                filter.replace("{user}", &ldap_escape(account)),
            ),
        };
        let mut wanted = vec![name_attribute];
        wanted.extend_from_slice(attrs);
        let (entries, res) = match conn.search(&base, scope, &filter, wanted) {
            Ok(r) => (r.0, r.1),
            Err(e) => return Err(conn_error("search", &e)),
        };
        if res.rc != 0 {
            return Err(classify("search", res.rc, &res.text));
        }
        // Continuation references (AD's to its DNS and configuration partitions) are not entries.
        let mut entries = entries
            .into_iter()
            .filter(|e| !e.is_ref())
            .map(SearchEntry::construct);
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
            .filter(|(k, _)| k.eq_ignore_ascii_case(name_attribute))
            .flat_map(|(_, v)| v)
            .collect();
        if !names.iter().any(|n| n.as_str() == account) {
            return Err(Outcome::Failed(format!(
                "the entry found for account {account:?} is {}, whose {name_attribute} is {names:?}: the directory matches names ignoring case and spaces, so it may be another person's; if it is the same person, map the user to that exact name (map = {{ {account:?} = \"NAME\" }})",
                entry.dn
            )));
        }
        let own = self
            .own_dn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match own {
            Some(own) if own != normal_dn(&entry.dn) => Ok(entry),
            Some(_) => Err(super::own_login(&format!(
                "{} is the entry this target binds as",
                entry.dn
            ))),
            None => Err(Outcome::Unavailable(
                "this target has not learnt which entry it binds as".into(),
            )),
        }
    }
}

/// The account's entry with `attrs` read, for the audit: `Ok(None)` when there is none.
pub fn observe_entry(
    session: &Session,
    locate: &Locate,
    name_attribute: &str,
    account: &str,
    attrs: &[&str],
) -> Result<Option<SearchEntry>, String> {
    let mut found = None;
    let outcome = session.with_conn(|conn| {
        match session.find(conn, locate, name_attribute, account, attrs) {
            Ok(e) => {
                found = Some(e);
                Outcome::Applied
            }
            Err(Outcome::NoSuchUser(_)) => Outcome::Applied,
            Err(o) => o,
        }
    });
    match outcome {
        Outcome::Applied => Ok(found),
        other => Err(other.reason().to_string()),
    }
}

/// An LDAP GeneralizedTime (`YYYYmmddHHMMSSZ`, with an optional fraction) in ms since the epoch.
pub fn generalized_time_ms(v: &str) -> Option<u64> {
    let digits = v.get(..14)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !v.ends_with('Z') {
        return None;
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &digits[..4],
        &digits[4..6],
        &digits[6..8],
        &digits[8..10],
        &digits[10..12],
        &digits[12..14]
    );
    let t = humantime::parse_rfc3339(&rfc3339).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

/// The values of `attr` on `entry`, text and binary alike (attribute names compared without
/// case, as LDAP does).
pub fn values(entry: &SearchEntry, attr: &str) -> Vec<String> {
    let text = entry
        .attrs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
        .flat_map(|(_, v)| v.iter().cloned());
    let binary = entry
        .bin_attrs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(attr))
        .flat_map(|(_, v)| v.iter().map(|b| String::from_utf8_lossy(b).into_owned()));
    text.chain(binary).collect()
}
