//! `kerberos`: MIT Kerberos principals, through kadmind's own protocol (kadm5 over RPCSEC_GSS).
//!
//! The target logs in to kadmind as a service principal from a keytab (mode 0600) and calls
//! kadm5 through the `kadmin` crate, which loads MIT's `libkadm5clnt_mit.so.12` at run time. No
//! program is started, so a password is never in any command line (`kadmin -q "cpw -pw …"` would
//! put it in the process list); it travels to kadmind inside the GSS-protected RPC.
//!
//! Why kadm5 rather than the kpasswd set-password protocol (RFC 3244): kpasswd sets passwords
//! only, while revoke, resume and remove need the principal's attributes and its deletion, which
//! only kadm5 offers; and kadm5's errors are typed codes (a policy refusal is told from a server
//! that is down without reading text). The keytab's principal needs `c` (change password), `m`
//! (modify), `i` (inquire), `l` (list, to read which principals a KDC policy binds:
//! [`KdcRules`]) and, for `remove = "delete"`, `d` in kadm5.acl.
//!
//! The principal is `principal_template` with `{user}` replaced by the account (after the
//! target's `map`); `{user}@REALM` by default. Account names that could name another principal
//! (`/` starts an instance, `@` a realm, `\` quotes) are refused by the limits, so `alice/admin`
//! can never be reached through a user called that, and a template with `/` is a configuration
//! error: a service principal (`host/…`, `krbtgt/…`, `kadmin/…`, `K/M`) is never changed. Nor is
//! the principal the target logs in as (in the target's realm when it names none).
//!
//! | op | what is done |
//! |---|---|
//! | replace, add | the password set (`kadm5_chpass_principal`, the realm's policy applies); a redelivered change that the policy refuses as reuse is checked by a login with it, and is applied when that login works |
//! | delete | a random key set (`randkey`): no password logs in any more |
//! | revoke, resume | `DISALLOW_ALL_TIX` set or cleared; every other attribute kept (read, change that bit, write back) |
//! | remove | as revoke (`remove = "disable"`, the default), or the principal deleted (`remove = "delete"`; one that is gone already is done) |
//!
//! The realm's policy refusals (too short, too few character classes, in the history, too soon)
//! are dead letters with the policy's words; a missing principal is "no such user". kadmind
//! unreachable, the keytab refused, or a right missing in kadm5.acl make the target unavailable:
//! changes wait and the connection is made again on the next attempt. Where the KDC is comes
//! from krb5.conf, as for every Kerberos program (`/etc/krb5.conf`, or `KRB5_CONFIG` in the
//! consumer's environment).

use super::observed::{Observed, Seen, Verifier};
use super::{
    Accounts, Folding, Limits, Outcome, PolicyReader, Removal, SystemRule, Target, Unusable,
};
use kadmin::sys::mit_client as k;
use kadmin::{KAdm5Variant, KAdminImpl, Params};
use pwsync_proto::policy::Rule;
use pwsync_proto::{Change, Op};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KerberosConfig {
    /// The realm (`EXAMPLE.ORG`).
    pub realm: String,
    /// kadmind's host, `host` or `host:port`; default: the realm's `admin_server` in krb5.conf.
    #[serde(default)]
    pub admin_server: Option<String>,
    /// The principal pwsync logs in to kadmind as (`pwsync/admin@EXAMPLE.ORG`).
    pub principal: String,
    /// The keytab holding its key (mode 0600).
    pub keytab: PathBuf,
    /// The principal an account is; `{user}` is the account. Default `{user}@REALM`.
    #[serde(default)]
    pub principal_template: Option<String>,
    #[serde(default)]
    pub remove: Removal,
}

pub struct Kerberos {
    cfg: std::sync::Arc<KerberosConfig>,
    keytab: String,
    template: String,
    /// The kadm5 handle, made when first needed and dropped after a failure of the connection,
    /// so the next change connects again.
    handle: Mutex<Option<kadmin::sync::KAdmin>>,
}

/// An error from kadm5, and whether the connection it came over is still good.
struct Failure {
    outcome: Outcome,
    connection_lost: bool,
}

fn code(e: &kadmin::Error) -> Option<i64> {
    match e {
        kadmin::Error::KAdmin { code, .. } => Some(*code),
        _ => None,
    }
}

fn is(e: &kadmin::Error, c: u32) -> bool {
    code(e) == Some(c as i64)
}

/// What a kadm5 error means for the change (`what` is the operation, for the reason).
fn classify(what: &str, principal: &str, e: &kadmin::Error) -> Failure {
    let policy = [
        k::KADM5_PASS_Q_TOOSHORT,
        k::KADM5_PASS_Q_CLASS,
        k::KADM5_PASS_Q_DICT,
        k::KADM5_PASS_Q_GENERIC,
        k::KADM5_PASS_REUSE,
        k::KADM5_PASS_TOOSOON,
    ];
    let rights = [
        k::KADM5_AUTH_GET,
        k::KADM5_AUTH_MODIFY,
        k::KADM5_AUTH_DELETE,
        k::KADM5_AUTH_CHANGEPW,
        k::KADM5_AUTH_INSUFFICIENT,
        k::KADM5_AUTH_SETKEY,
    ];
    let connection = [
        k::KADM5_RPC_ERROR,
        k::KADM5_GSS_ERROR,
        k::KADM5_NO_SRV,
        k::KADM5_CANT_RESOLVE,
        k::KADM5_NOT_INIT,
        k::KADM5_BAD_SERVER_HANDLE,
    ];
    let kept = |outcome| Failure {
        outcome,
        connection_lost: false,
    };
    if is(e, k::KADM5_UNK_PRINC) {
        return kept(Outcome::NoSuchUser(format!(
            "no principal {principal} in the realm to {what}"
        )));
    }
    if policy.iter().any(|c| is(e, *c)) {
        return kept(Outcome::Failed(format!(
            "{what} {principal}: refused by the realm's password policy: {e}"
        )));
    }
    if rights.iter().any(|c| is(e, *c)) {
        return kept(Outcome::Unavailable(format!(
            "{what} {principal}: {e}; give the target's principal the rights \"cmil\" (and \"d\" for remove = \"delete\") in kadm5.acl"
        )));
    }
    match e {
        kadmin::Error::KAdmin { .. } if !connection.iter().any(|c| is(e, *c)) => {
            kept(Outcome::Failed(format!("{what} {principal}: {e}")))
        }
        // The connection, the KDC, the library or its thread: whatever it is, connect again.
        _ => Failure {
            outcome: Outcome::Unavailable(format!("{what} {principal}: {e}")),
            connection_lost: true,
        },
    }
}

/// Loads libkadm5clnt once for the life of the process, so that it is never unloaded.
///
/// The `kadmin` crate opens the library for each connection and closes it when the connection
/// is dropped; when the last one goes, the library is unmapped while libcom_err still lists its
/// error tables, and the next connection walks that list into freed memory (a segfault seen
/// here after kadmind went away and the target connected again). One reference that is never
/// dropped keeps it mapped.
fn keep_library_loaded() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            kadmin::sys::Library::from_variant(KAdm5Variant::MitClient)
                .map(std::mem::forget)
                .map_err(|e| {
                    format!("loading MIT's kadm5 client library (package libkadm5clnt-mit12): {e}")
                })
        })
        .clone()
}

impl Kerberos {
    pub fn new(cfg: KerberosConfig, base: &Path) -> Result<Kerberos, String> {
        keep_library_loaded()?;
        let keytab = pwsync_runtime::resolve(base, &cfg.keytab);
        pwsync_proto::keys::check_private_mode(&keytab).map_err(|e| e.to_string())?;
        let keytab = keytab
            .to_str()
            .ok_or_else(|| format!("keytab path {} is not UTF-8", keytab.display()))?
            .to_string();
        if cfg.realm.is_empty() || cfg.realm.contains(['@', '/', '\\']) {
            return Err(format!("realm {:?} is not a realm name", cfg.realm));
        }
        let template = cfg
            .principal_template
            .clone()
            .unwrap_or_else(|| format!("{{user}}@{}", cfg.realm));
        if template.matches("{user}").count() != 1 {
            return Err(format!(
                "principal_template {template:?} must hold {{user}} once"
            ));
        }
        if !template.ends_with(&format!("@{}", cfg.realm)) {
            return Err(format!(
                "principal_template {template:?} must end with @{} (the realm this target changes)",
                cfg.realm
            ));
        }
        if template.contains('/') {
            return Err(format!(
                "principal_template {template:?} names service principals (a `/` starts an instance: host/…, krbtgt/…, kadmin/…); pwsync changes only people's principals, NAME@{}",
                cfg.realm
            ));
        }
        if let Some(server) = &cfg.admin_server {
            admin_server(server)?;
        }
        Ok(Kerberos {
            cfg: std::sync::Arc::new(cfg),
            keytab,
            template,
            handle: Mutex::new(None),
        })
    }

    /// The principal `account` is.
    pub fn principal(&self, account: &str) -> String {
        self.template.replace("{user}", account)
    }

    /// The principal this target logs in as, as the KDC names it: the configured one, in the
    /// target's realm when it names none (as kadmin reads it).
    pub fn own_principal(&self) -> String {
        if self.cfg.principal.contains('@') {
            self.cfg.principal.clone()
        } else {
            format!("{}@{}", self.cfg.principal, self.cfg.realm)
        }
    }

    fn params(&self) -> Result<Params, String> {
        params(&self.cfg)
    }

    fn connect(&self) -> Result<kadmin::sync::KAdmin, Outcome> {
        connect(&self.cfg, &self.keytab)
    }

    /// Runs `f` with the kadm5 handle (connecting first when there is none); drops the handle
    /// when `f` says the connection failed, so the next call connects again.
    fn with_handle(
        &self,
        f: impl FnOnce(&kadmin::sync::KAdmin) -> Result<Outcome, Failure>,
    ) -> Outcome {
        let mut slot = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            match self.connect() {
                Ok(h) => *slot = Some(h),
                Err(o) => return o,
            }
        }
        let Some(handle) = slot.as_ref() else {
            return Outcome::Unavailable("no kadm5 connection".into());
        };
        match f(handle) {
            Ok(o) => o,
            Err(failure) => {
                if failure.connection_lost {
                    *slot = None;
                }
                failure.outcome
            }
        }
    }

    /// Whether `principal` gets in with `password` (an AS exchange with the KDC, as kinit
    /// does): the proof that a redelivered change is in place already.
    fn logs_in(&self, principal: &str, password: &str) -> bool {
        let Ok(params) = self.params() else {
            return false;
        };
        kadmin::sync::KAdmin::builder(KAdm5Variant::MitClient)
            .params(params)
            .with_password(principal, password)
            .is_ok()
    }

    /// Sets or clears `DISALLOW_ALL_TIX`, keeping every other attribute as it is now.
    fn set_disallowed(
        h: &kadmin::sync::KAdmin,
        principal: &str,
        disallowed: bool,
    ) -> Result<Outcome, Failure> {
        let what = if disallowed { "revoke" } else { "resume" };
        let p = match h.get_principal(principal) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Ok(Outcome::NoSuchUser(format!(
                    "no principal {principal} in the realm to {what}"
                )))
            }
            Err(e) => return Err(classify(what, principal, &e)),
        };
        let bit = k::KRB5_KDB_DISALLOW_ALL_TIX as i32;
        let wanted = if disallowed {
            p.attributes() | bit
        } else {
            p.attributes() & !bit
        };
        if wanted == p.attributes() {
            return Ok(Outcome::Applied);
        }
        p.modifier()
            .attributes(wanted)
            .modify(h)
            .map(|_| Outcome::Applied)
            .map_err(|e| classify(what, principal, &e))
    }

    fn apply_with(
        &self,
        h: &kadmin::sync::KAdmin,
        change: &Change,
        principal: &str,
    ) -> Result<Outcome, Failure> {
        match change.op {
            Op::Replace | Op::Add => {
                let Some(password) = change
                    .values
                    .first()
                    .and_then(|v| std::str::from_utf8(v.expose()).ok())
                else {
                    return Ok(Outcome::Failed("no UTF-8 value".into()));
                };
                match h.principal_change_password(principal, password, None, None) {
                    Ok(()) => Ok(Outcome::Applied),
                    // The same change delivered again (after a consumer crash) is refused as
                    // reuse, or as too soon after the last change: the login tells it is done.
                    Err(e)
                        if (is(&e, k::KADM5_PASS_REUSE) || is(&e, k::KADM5_PASS_TOOSOON))
                            && self.logs_in(principal, password) =>
                    {
                        Ok(Outcome::Applied)
                    }
                    Err(e) => Err(classify("set the password of", principal, &e)),
                }
            }
            Op::Delete => h
                .principal_randkey(principal, None, None)
                .map(|()| Outcome::Applied)
                .map_err(|e| classify("set a random key on", principal, &e)),
            Op::Revoke => Self::set_disallowed(h, principal, true),
            Op::Resume => Self::set_disallowed(h, principal, false),
            Op::Remove => match self.cfg.remove {
                Removal::Disable => Self::set_disallowed(h, principal, true),
                Removal::Delete => match h.delete_principal(principal) {
                    Ok(()) => Ok(Outcome::Applied),
                    // Deleting a principal that is gone already is done (a redelivery).
                    Err(e) if is(&e, k::KADM5_UNK_PRINC) => Ok(Outcome::Applied),
                    Err(e) => Err(classify("delete", principal, &e)),
                },
            },
            Op::Lost => Ok(Outcome::Applied),
        }
    }
}

/// Where kadmind is, for the kadm5 library.
fn params(cfg: &KerberosConfig) -> Result<Params, String> {
    let mut params = Params::new().realm(&cfg.realm);
    if let Some(server) = &cfg.admin_server {
        let (host, port) = admin_server(server)?;
        params = params.admin_server(host);
        if let Some(port) = port {
            params = params.kadmind_port(port.into());
        }
    }
    Ok(params)
}

/// Logs in to kadmind as the target's principal with its keytab.
fn connect(cfg: &KerberosConfig, keytab: &str) -> Result<kadmin::sync::KAdmin, Outcome> {
    let params = params(cfg).map_err(Outcome::Failed)?;
    kadmin::sync::KAdmin::builder(KAdm5Variant::MitClient)
        .params(params)
        .with_keytab(Some(&cfg.principal), Some(keytab))
        .map_err(|e| {
            Outcome::Unavailable(format!(
                "logging in to kadmind as {} with keytab {keytab}: {e}",
                cfg.principal
            ))
        })
}

/// Reads the KDC's password policies of the target's principals: for each policy, the
/// principals (of the template's form, no service principal) that have it, and its minimum
/// length and character classes. A policy every such principal has binds every user; others
/// bind their principals' users only. MIT counts the minimum in bytes and five classes (upper,
/// lower, digits, punctuation, others), published as characters and four classes (lower, upper,
/// digits, others). Stricter in most ways; laxer in two corners, where the KDC's refusal is a
/// dead letter in its words: a policy asking all five classes is published as four, and an
/// accented capital or small letter counts as upper or lower case at agents but as "other" at
/// MIT. History and minimum life stay the KDC's own.
pub struct KdcRules {
    cfg: std::sync::Arc<KerberosConfig>,
    keytab: String,
    template: String,
}

impl PolicyReader for KdcRules {
    fn read(&self) -> Result<Vec<SystemRule>, String> {
        let h = connect(&self.cfg, &self.keytab).map_err(|o| o.reason().to_string())?;
        let (prefix, suffix) = self
            .template
            .split_once("{user}")
            .ok_or("the template has no {user}")?;
        let query = self.template.replace("{user}", "*");
        let names = h
            .list_principals(Some(&query))
            .map_err(|e| format!("listing the principals {query}: {e}"))?;
        let mut by_policy: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let mut people = 0usize;
        for name in names {
            let Some(account) = name
                .strip_prefix(prefix)
                .and_then(|n| n.strip_suffix(suffix))
                .filter(|a| !a.is_empty() && !a.contains('/'))
            else {
                continue;
            };
            people += 1;
            let p = h
                .get_principal(&name)
                .map_err(|e| format!("reading principal {name}: {e}"))?;
            if let Some(policy) = p.as_ref().and_then(|p| p.policy()) {
                by_policy
                    .entry(policy.to_string())
                    .or_default()
                    .push(account.to_string());
            }
        }
        let mut out = vec![];
        for (policy, accounts) in by_policy {
            let Some(p) = h
                .get_policy(&policy)
                .map_err(|e| format!("reading policy {policy}: {e}"))?
            else {
                continue;
            };
            let scope = if accounts.len() == people {
                Accounts::All
            } else {
                Accounts::Only(accounts)
            };
            let source = format!("the KDC policy {policy} of realm {}", self.cfg.realm);
            let min = p.password_min_length().clamp(0, u32::MAX as i64) as u32;
            let classes = p.password_min_classes().clamp(0, 4) as u8;
            let rules = [
                (min > 1).then_some(Rule::MinChars(min)),
                (classes > 1).then_some(Rule::Classes(classes)),
            ];
            for rule in rules.into_iter().flatten() {
                out.push(SystemRule {
                    rule,
                    accounts: scope.clone(),
                    source: source.clone(),
                });
            }
        }
        Ok(out)
    }
}

/// `host` or `host:port`.
fn admin_server(s: &str) -> Result<(&str, Option<u16>), String> {
    match s.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => port
            .parse::<u16>()
            .map(|p| (host, Some(p)))
            .map_err(|_| format!("admin_server {s:?}: the port is not a number")),
        _ if s.is_empty() => Err("admin_server is empty".into()),
        _ => Ok((s, None)),
    }
}

impl Target for Kerberos {
    fn apply(&self, change: &Change, account: &str) -> Outcome {
        let principal = self.principal(account);
        // The account's limits keep `/` out of a name and the template has none, so this is a
        // second lock on the door: a service principal (krbtgt/…, kadmin/…, K/M, host/…) is
        // never changed.
        if principal.contains('/') {
            return super::not_a_person(&format!("{principal} is a service principal"));
        }
        if principal == self.own_principal() {
            return super::own_login(&format!(
                "{principal} is the principal this target logs in to kadmind as"
            ));
        }
        self.with_handle(|h| self.apply_with(h, change, &principal))
    }

    /// The principal's last password change, its key version (raised by every password set),
    /// and who made the last change when that was the password's.
    fn observe(&self, account: &str) -> Observed {
        let principal = self.principal(account);
        let mut found = None;
        let outcome = self.with_handle(|h| {
            h.get_principal(&principal)
                .map(|p| {
                    found = Some(p);
                    Outcome::Applied
                })
                .map_err(|e| classify("inquire", &principal, &e))
        });
        let p = match (outcome, found) {
            (Outcome::Applied, Some(Some(p))) => p,
            (Outcome::Applied, _) => return Observed::Missing,
            (other, _) => return Observed::Unreadable(other.reason().to_string()),
        };
        let changed = p.last_password_change();
        Observed::Present(Seen {
            changed_at_ms: changed.and_then(|t| u64::try_from(t.timestamp_millis()).ok()),
            changed_by: p
                .modified_by()
                .filter(|_| changed.is_some() && p.modified_at() == changed)
                .map(str::to_string),
            verifier: Some(Verifier::Version(u64::from(p.kvno()))),
        })
    }

    fn policy_reader(&self) -> Option<Box<dyn PolicyReader>> {
        Some(Box::new(KdcRules {
            cfg: self.cfg.clone(),
            keytab: self.keytab.clone(),
            template: self.template.clone(),
        }))
    }

    fn check(&self) -> Result<(), Unusable> {
        let outcome = self.with_handle(|h| {
            h.get_principal(&self.cfg.principal)
                .map(|_| Outcome::Applied)
                .map_err(|e| classify("inquire", &self.cfg.principal, &e))
        });
        match outcome {
            Outcome::Applied => Ok(()),
            Outcome::Failed(e) => Err(Unusable::Config(e)),
            other => Err(Unusable::NotNow(other.reason().to_string())),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            // MIT's password prompt (kinit, kpasswd, login through pam_krb5) reads at most
            // 1023 bytes, as one line.
            max_password_bytes: 1023,
            longer_passwords: "Kerberos logins read at most 1023 bytes of a password",
            password_forbidden: (
                &['\n', '\r'],
                "Kerberos logins read the password as one line",
            ),
            // `/` starts an instance, `@` the realm, `\` quotes: such a name is another principal.
            account_forbidden: &['/', '@', '\\'],
            folding: Folding::Exact,
            // Changing the keys leaves the principal's attributes (-allow_tix) as they were.
            new_password_unlocks: false,
            ..Limits::text("MIT Kerberos keys")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(template: Option<&str>) -> Result<Kerberos, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let keytab = dir.path().join("kt");
        std::fs::write(&keytab, b"x").map_err(|e| e.to_string())?;
        std::fs::set_permissions(&keytab, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| e.to_string())?;
        Kerberos::new(
            KerberosConfig {
                realm: "EXAMPLE.ORG".into(),
                admin_server: Some("kdc.example.org:749".into()),
                principal: "pwsync@EXAMPLE.ORG".into(),
                keytab,
                principal_template: template.map(str::to_string),
                remove: Removal::Disable,
            },
            dir.path(),
        )
    }

    #[test]
    fn principals_come_from_the_template_in_the_realm() {
        let t = target(None).unwrap();
        assert_eq!(t.principal("alice"), "alice@EXAMPLE.ORG");
        let t = target(Some("x-{user}@EXAMPLE.ORG")).unwrap();
        assert_eq!(t.principal("bob"), "x-bob@EXAMPLE.ORG");
        // The target's own login is refused whatever account names it.
        let own = target(Some("{user}@EXAMPLE.ORG")).unwrap();
        let change = Change::new("pwsync", "s", Op::Replace, vec![]);
        assert!(own
            .apply(&change, "pwsync")
            .reason()
            .contains("its own login"));
        for bad in [
            "alice@EXAMPLE.ORG",
            "{user}@OTHER.ORG",
            "{user}{user}@EXAMPLE.ORG",
            "{user}/nfs@EXAMPLE.ORG",
            "host/{user}@EXAMPLE.ORG",
        ] {
            assert!(target(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(admin_server("h:749").unwrap(), ("h", Some(749)));
        assert_eq!(admin_server("h").unwrap(), ("h", None));
        assert!(admin_server("h:x").is_err());
    }

    #[test]
    fn names_that_would_be_another_principal_are_refused() {
        let t = target(None).unwrap();
        for bad in ["alice/admin", "alice@OTHER.ORG", "al\\ice", "a\nb"] {
            assert!(super::super::limits::check_account(&t.limits(), bad).is_err());
        }
    }
}
