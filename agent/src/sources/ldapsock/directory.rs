//! The directory as ldap-sock asks it, over its own LDAP connection (`[ldap_sock] url`): the
//! DN an entry is stored under, and whether a password binds as an entry.
//!
//! An entry's stored DN is what names the account: LDAP compares a DN's values by their
//! matching rules (`uid` ignores case and extra spaces), so a client may spell an entry
//! `UID=QUINN, OU=People,…` and still change `uid=quinn`'s password. The stored spelling is read
//! from the directory (a base search for no attributes, anonymous, or by SASL EXTERNAL over
//! `ldapi://`), never taken from the request. Every call is bounded by [`TIMEOUT`].

use ldap3::{LdapConn, LdapConnSettings, Scope, SearchEntry};
use std::time::Duration;

/// How long one connection, bind or search may take.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// LDAP result code noSuchObject.
const NO_SUCH_OBJECT: u32 = 32;
/// LDAP result code invalidCredentials.
const INVALID_CREDENTIALS: u32 = 49;

/// What the directory says of a DN.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// The entry, under its DN as stored.
    Dn(String),
    /// No such entry (or none this process may see).
    NoEntry,
    /// The directory could not be asked now.
    Unreachable(String),
}

pub struct Directory {
    url: String,
}

impl Directory {
    pub fn new(url: &str) -> Directory {
        Directory { url: url.into() }
    }

    fn connect(&self) -> Result<LdapConn, String> {
        LdapConn::with_settings(LdapConnSettings::new().set_conn_timeout(TIMEOUT), &self.url)
            .map_err(|e| format!("connecting to {}: {e}", self.url))
    }

    /// The DN `dn`'s entry is stored under.
    pub fn stored_dn(&self, dn: &str) -> Stored {
        let mut conn = match self.connect() {
            Ok(c) => c,
            Err(e) => return Stored::Unreachable(e),
        };
        let conn = conn.with_timeout(TIMEOUT);
        if self.url.starts_with("ldapi://") {
            if let Err(e) = conn.sasl_external_bind().and_then(|r| r.success()) {
                return Stored::Unreachable(format!("SASL EXTERNAL bind: {e}"));
            }
        }
        let answer = match conn.search(dn, Scope::Base, "(objectClass=*)", vec!["1.1"]) {
            Ok(r) if r.1.rc == 0 => match r.0.into_iter().next() {
                Some(e) => Stored::Dn(SearchEntry::construct(e).dn),
                None => Stored::NoEntry,
            },
            Ok(r) if r.1.rc == NO_SUCH_OBJECT => Stored::NoEntry,
            // A DN the directory cannot parse names no entry.
            Ok(r) if r.1.rc == 34 => Stored::NoEntry,
            Ok(r) => Stored::Unreachable(format!("search: LDAP result {}: {}", r.1.rc, r.1.text)),
            Err(e) => Stored::Unreachable(format!("search: {e}")),
        };
        let _ = conn.unbind();
        answer
    }

    /// Whether the directory takes `password` for `dn` (a simple bind); `None` when it cannot
    /// tell now.
    pub fn binds_as(&self, dn: &str, password: &[u8]) -> Option<bool> {
        let password = std::str::from_utf8(password).ok()?;
        let mut conn = self.connect().ok()?;
        let answer = match conn.with_timeout(TIMEOUT).simple_bind(dn, password) {
            Ok(r) if r.rc == 0 => Some(true),
            Ok(r) if r.rc == INVALID_CREDENTIALS => Some(false),
            _ => None,
        };
        let _ = conn.unbind();
        answer
    }
}
