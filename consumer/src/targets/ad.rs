//! `ad`: Active Directory (Windows or a Samba AD domain controller), over LDAPS or StartTLS.
//!
//! The account is the user object whose `sAMAccountName` is the account byte for byte, found by
//! a subtree search under `search_base` ([`super::directory::Session::find`]: the directory
//! compares names without case, so a search for `Alice` finds `alice`, and that entry is not
//! changed).
//!
//! | op | what is written |
//! |---|---|
//! | replace, add | `unicodePwd` replaced by the quoted password in UTF-16LE: an administrative reset (AD holds one password, so add is a replace); with `password_change = "user"`, the user-change form instead: the previous password's value deleted and the new one added in one modify, so AD applies its history, minimum age and complexity as to the person's own change (a change that carries no previous password is then a dead letter; one AD refuses is checked by a login with the new password, so a change applied already is applied, not a dead letter) |
//! | delete | nothing: a dead letter. AD holds one password and says which only to a login attempt, which would count against the lockout policy; revoke the account instead |
//! | revoke, resume | the ACCOUNTDISABLE bit (0x2) of `userAccountControl` set or cleared: read, change that bit, write back, every other bit as it was |
//! | remove | as revoke (`remove = "disable"`, the default), or the object deleted (`remove = "delete"`) |
//!
//! Only people's accounts are changed: an entry whose `sAMAccountType` is not a normal user's
//! (a computer, a domain controller's own account, a managed service account, a trust), the
//! domain's `krbtgt` (RID 502) and a read-only DC's `krbtgt_N` are refused as dead letters in
//! words ([`not_a_person`]), whatever `protect` and `search_filter` say: their passwords are
//! machines' secrets. The account the target binds as is never changed, known by what the DC
//! resolves `bind_dn` to (a DN, a UPN or `DOMAIN\name`: [`super::directory`]).
//!
//! AD counts a password's length in UTF-16 code units, and so does this target's limit
//! (`max_password_length`, default [`DEFAULT_MAX_PASSWORD_LENGTH`]). The domain's own rules
//! (minimum length, complexity, and fine-grained policies) are read by [`DomainRules`] and
//! published to agents with the group's policy.
//!
//! AD sets `unicodePwd` only over an encrypted connection, so a plain `ldap://` URL without
//! StartTLS is a configuration error. AD's refusals (constraint violation: the domain's password
//! policy; unwilling to perform; access denied) are dead letters whose reason says, in words,
//! what the DC's error code means.

use super::directory::{self, classify, conn_error, rc, Connection, Locate, Session};
use super::observed::{Observed, Seen, Verifier};
use super::{
    Accounts, Folding, Limits, Outcome, PolicyReader, Quality, Removal, SystemRule, Target,
    Unusable,
};
use ldap3::{LdapConn, Mod};
use pwsync_proto::policy::Rule;
use pwsync_proto::{Change, Op};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The ACCOUNTDISABLE bit of `userAccountControl`.
pub const ACCOUNTDISABLE: u32 = 0x2;

/// `sAMAccountType` of a normal user account (SAM_NORMAL_USER_ACCOUNT): the only kind this
/// target changes.
pub const NORMAL_USER_ACCOUNT: u32 = 0x3000_0000;
/// `sAMAccountType` of a computer account (workstations, servers, domain controllers, managed
/// service accounts).
pub const MACHINE_ACCOUNT: u32 = 0x3000_0001;
/// `sAMAccountType` of an interdomain trust account.
pub const TRUST_ACCOUNT: u32 = 0x3000_0002;
/// The relative identifier of the domain's `krbtgt` account.
pub const KRBTGT_RID: u32 = 502;

/// The attributes that tell what kind of account an entry is ([`not_a_person`]).
const KIND_ATTRIBUTES: [&str; 5] = [
    "sAMAccountType",
    "objectClass",
    "objectSid",
    "msDS-SecondaryKrbTgtNumber",
    "msDS-KrbTgtLinkBl",
];

/// What the account `entry` is, when it is not a person's: a computer (a DC's own account
/// among them), a trust, a managed service account, the domain's `krbtgt` or a read-only DC's
/// `krbtgt_N`. Their passwords are machines' secrets; changing one breaks a secure channel, a
/// trust or every Kerberos ticket.
pub fn not_a_person(entry: &ldap3::SearchEntry) -> Option<String> {
    let dn = &entry.dn;
    let kind = directory::values(entry, "sAMAccountType")
        .first()
        .and_then(|v| v.trim().parse::<u32>().ok());
    let classes = directory::values(entry, "objectClass");
    let has_class = |c: &str| classes.iter().any(|v| v.eq_ignore_ascii_case(c));
    if has_class("msDS-ManagedServiceAccount") || has_class("msDS-GroupManagedServiceAccount") {
        return Some(format!("{dn} is a managed service account"));
    }
    match kind {
        Some(NORMAL_USER_ACCOUNT) => {}
        Some(MACHINE_ACCOUNT) => {
            return Some(format!(
                "{dn} is a computer account (sAMAccountType {MACHINE_ACCOUNT})"
            ))
        }
        Some(TRUST_ACCOUNT) => {
            return Some(format!(
                "{dn} is an interdomain trust account (sAMAccountType {TRUST_ACCOUNT})"
            ))
        }
        Some(other) => {
            return Some(format!(
            "{dn} is not a normal user account (sAMAccountType {other}, not {NORMAL_USER_ACCOUNT})"
        ))
        }
        None => return Some(format!("{dn} has no sAMAccountType: not a user account")),
    }
    // ldap3 keeps a value that happens to be UTF-8 as text: look in both.
    let text = entry
        .attrs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("objectSid"))
        .flat_map(|(_, v)| v.iter().map(|s| s.as_bytes().to_vec()));
    let binary = entry
        .bin_attrs
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("objectSid"))
        .flat_map(|(_, v)| v.iter().cloned());
    let rid = text
        .chain(binary)
        .next()
        .and_then(|sid| sid.get(sid.len().checked_sub(4)?..).map(<[u8]>::to_vec))
        .and_then(|tail| <[u8; 4]>::try_from(tail).ok())
        .map(u32::from_le_bytes);
    if rid == Some(KRBTGT_RID) {
        return Some(format!(
            "{dn} is the domain's krbtgt account (the key of every Kerberos ticket)"
        ));
    }
    if !directory::values(entry, "msDS-SecondaryKrbTgtNumber").is_empty()
        || !directory::values(entry, "msDS-KrbTgtLinkBl").is_empty()
    {
        return Some(format!(
            "{dn} is a read-only domain controller's krbtgt account"
        ));
    }
    None
}

/// How a new password is written.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PasswordChange {
    /// An administrative reset: AD's history and minimum age do not apply.
    #[default]
    Reset,
    /// The user-change form (delete the old value, add the new): AD checks the old password
    /// and applies its whole policy. Needs the previous password, which only a person's own
    /// change carries (PAM when they typed their current password, `submit --previous`).
    User,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdConfig {
    /// `ldaps://dc.example.org` (or `ldap://…` with `starttls = true`).
    pub url: String,
    #[serde(default)]
    pub starttls: bool,
    /// The CA (PEM) that signed the DC's certificate; without it the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// An account allowed to reset passwords and write `userAccountControl` on the users.
    pub bind_dn: String,
    /// A file holding the bind password (mode 0600).
    pub bind_password_file: PathBuf,
    /// Where the users are (subtree): the domain (`DC=example,DC=org`) or an OU.
    pub search_base: String,
    /// The filter that finds a user; `{user}` is the account, filter-escaped.
    #[serde(default = "default_filter")]
    pub search_filter: String,
    #[serde(default)]
    pub password_change: PasswordChange,
    #[serde(default)]
    pub remove: Removal,
    /// Seconds for connecting and for each operation. Default 10.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// The longest password, in UTF-16 code units (how AD counts; a character outside the
    /// Basic Multilingual Plane is two). Default [`DEFAULT_MAX_PASSWORD_LENGTH`].
    #[serde(default = "default_max_password_length")]
    pub max_password_length: usize,
}

/// The longest password every Windows DC and logon takes: MS-SAMR's password buffer holds 256
/// UTF-16 code units, and Windows' logon and credential prompts read 256 characters. A Samba
/// DC takes longer ones over LDAP; raise `max_password_length` where no Windows logon needs to
/// type them.
pub const DEFAULT_MAX_PASSWORD_LENGTH: usize = 256;

fn default_max_password_length() -> usize {
    DEFAULT_MAX_PASSWORD_LENGTH
}

fn default_filter() -> String {
    "(&(objectClass=user)(sAMAccountName={user}))".into()
}
fn default_timeout() -> u64 {
    10
}

pub struct Ad {
    cfg: AdConfig,
    session: Session,
    /// A second session for reading the domain's password rules ([`DomainRules`]).
    rules_session: std::sync::Arc<Session>,
}

/// The `unicodePwd` value for `password`: the password in double quotes, as UTF-16LE.
pub fn unicode_pwd(password: &str) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(2 * password.len() + 4));
    for unit in "\""
        .encode_utf16()
        .chain(password.encode_utf16())
        .chain("\"".encode_utf16())
    {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

/// Bytes for an LDAP modification (ldap3 takes one type for the attribute and its values) that
/// are zeroized when ldap3 drops them: the encoded password never outlives the request.
#[derive(PartialEq, Eq)]
struct Wiped(Zeroizing<Vec<u8>>);

impl std::hash::Hash for Wiped {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.as_slice().hash(h)
    }
}

impl AsRef<[u8]> for Wiped {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What an AD (or Samba) error code at the head of a diagnostic means, in words.
pub fn ad_error_words(text: &str) -> Option<&'static str> {
    let code = text.get(..8)?;
    Some(match code.to_ascii_uppercase().as_str() {
        "0000052D" => "the password does not meet the domain's password policy (length, complexity, history or minimum age); the person must choose another, or the policy be changed",
        "00000056" => "the old password given does not match the account's",
        "00000005" => "access denied: the bind account may not do this on this user (delegate it \"Reset password\" and write access to userAccountControl)",
        "0000001F" => "the DC will not perform this (Active Directory sets a password only over an encrypted connection, as a quoted UTF-16LE value)",
        "00000775" => "the account is locked out",
        _ => return None,
    })
}

/// A result code as an outcome, with the DC's error code in words.
fn classify_ad(what: &str, code: u32, text: &str) -> Outcome {
    match (classify(what, code, text), ad_error_words(text)) {
        (Outcome::Failed(m), Some(words)) => Outcome::Failed(format!("{m}: {words}")),
        (o, _) => o,
    }
}

fn modify<S: AsRef<[u8]> + Eq + std::hash::Hash>(
    conn: &mut LdapConn,
    what: &str,
    dn: &str,
    mods: Vec<Mod<S>>,
) -> Outcome {
    match conn.modify(dn, mods) {
        Ok(r) => classify_ad(what, r.rc, &r.text),
        Err(ldap3::LdapError::LdapResult { result }) => classify_ad(what, result.rc, &result.text),
        Err(e) => conn_error(what, &e),
    }
}

impl Ad {
    pub fn new(cfg: AdConfig, base: &Path) -> Result<Ad, String> {
        let connection = || Connection {
            url: &cfg.url,
            starttls: cfg.starttls,
            ca_file: cfg.ca_file.as_ref(),
            bind_dn: &cfg.bind_dn,
            bind_password_file: &cfg.bind_password_file,
            timeout_secs: cfg.timeout_secs,
        };
        let session = Session::new(connection(), base)?;
        let rules_session = std::sync::Arc::new(Session::new(connection(), base)?);
        if !session.encrypted() {
            return Err(format!(
                "{} is plain LDAP: Active Directory sets passwords only over an encrypted connection; use ldaps:// or starttls = true",
                cfg.url
            ));
        }
        if !cfg.search_filter.contains("{user}") {
            return Err(format!(
                "search_filter {:?} has no {{user}}",
                cfg.search_filter
            ));
        }
        Ok(Ad {
            cfg,
            session,
            rules_session,
        })
    }

    /// Sets or clears ACCOUNTDISABLE on `dn`, leaving every other bit of `userAccountControl`
    /// as it is now.
    fn set_disabled(conn: &mut LdapConn, dn: &str, control: &[String], disabled: bool) -> Outcome {
        let current = match control.first().map(|v| v.trim().parse::<u32>()) {
            Some(Ok(v)) => v,
            _ => {
                return Outcome::Failed(format!(
                    "{dn} has no readable userAccountControl ({control:?}); not a user account?"
                ))
            }
        };
        let wanted = if disabled {
            current | ACCOUNTDISABLE
        } else {
            current & !ACCOUNTDISABLE
        };
        if wanted == current {
            return Outcome::Applied;
        }
        modify(
            conn,
            "set userAccountControl",
            dn,
            vec![Mod::Replace(
                "userAccountControl".to_string(),
                HashSet::from([wanted.to_string()]),
            )],
        )
    }

    fn apply_on(&self, conn: &mut LdapConn, change: &Change, account: &str) -> Outcome {
        let locate = Locate::Search {
            base: self.cfg.search_base.clone(),
            filter: self.cfg.search_filter.clone(),
        };
        let mut attrs = vec!["userAccountControl"];
        attrs.extend(KIND_ATTRIBUTES);
        let entry = match self
            .session
            .find(conn, &locate, "sAMAccountName", account, &attrs)
        {
            Ok(e) => e,
            // Deleting an object that is gone already is done (a redelivery after a crash).
            Err(Outcome::NoSuchUser(_))
                if change.op == Op::Remove && self.cfg.remove == Removal::Delete =>
            {
                return Outcome::Applied
            }
            Err(o) => return o,
        };
        if let Some(what) = not_a_person(&entry) {
            return super::not_a_person(&what);
        }
        let dn = entry.dn.as_str();
        let control = directory::values(&entry, "userAccountControl");
        match change.op {
            Op::Replace | Op::Add => {
                let Some(v) = change.values.first() else {
                    return Outcome::Failed("no value".into());
                };
                let Ok(password) = std::str::from_utf8(v.expose()) else {
                    return Outcome::Failed("refused: the password is not UTF-8, which Active Directory's unicodePwd needs".into());
                };
                let attr = || Wiped(Zeroizing::new(b"unicodePwd".to_vec()));
                let new = HashSet::from([Wiped(unicode_pwd(password))]);
                let mods = match (self.cfg.password_change, &change.previous) {
                    (PasswordChange::Reset, _) => vec![Mod::Replace(attr(), new)],
                    (PasswordChange::User, Some(old)) => {
                        let Ok(old) = std::str::from_utf8(old.expose()) else {
                            return Outcome::Failed("refused: the previous password is not UTF-8, which Active Directory's unicodePwd needs".into());
                        };
                        vec![
                            Mod::Delete(attr(), HashSet::from([Wiped(unicode_pwd(old))])),
                            Mod::Add(attr(), new),
                        ]
                    }
                    (PasswordChange::User, None) => return Outcome::Failed(
                        "this target applies a person's own change (password_change = \"user\"), and this change carries no previous password (an administrator's reset, or a source that cannot see the old one, such as Samba's capture); set password_change = \"reset\" to apply such changes as resets".into(),
                    ),
                };
                let user_form = mods.len() == 2;
                match modify(conn, "set unicodePwd", dn, mods) {
                    // The same change delivered again (after a consumer crash) finds the new
                    // password in place and the old one gone, which the user form refuses: the
                    // account's own login with the new password tells that it is done.
                    Outcome::Failed(_) if user_form && self.session.binds_as(dn, password) => {
                        Outcome::Applied
                    }
                    o => o,
                }
            }
            Op::Delete => Outcome::Failed(
                "Active Directory holds one password per account and tells which only to a login attempt (which counts against the lockout policy), so a delete is not applied; revoke the account, or send the new password as a replace".into(),
            ),
            Op::Revoke => Self::set_disabled(conn, dn, &control, true),
            Op::Resume => Self::set_disabled(conn, dn, &control, false),
            Op::Remove => match self.cfg.remove {
                Removal::Disable => Self::set_disabled(conn, dn, &control, true),
                Removal::Delete => match conn.delete(dn) {
                    Ok(r) if r.rc == 0 || r.rc == rc::NO_SUCH_OBJECT => Outcome::Applied,
                    Ok(r) => classify_ad("delete", r.rc, &r.text),
                    Err(e) => conn_error("delete", &e),
                },
            },
            Op::Lost => Outcome::Applied,
        }
    }
}

impl Target for Ad {
    /// `pwdLastSet` and the key version (`msDS-KeyVersionNumber`, raised by every password
    /// set); the directory says not who.
    fn observe(&self, account: &str) -> Observed {
        let locate = Locate::Search {
            base: self.cfg.search_base.clone(),
            filter: self.cfg.search_filter.clone(),
        };
        let attrs = ["pwdLastSet", "msDS-KeyVersionNumber"];
        let entry = match directory::observe_entry(
            &self.session,
            &locate,
            "sAMAccountName",
            account,
            &attrs,
        ) {
            Ok(Some(e)) => e,
            Ok(None) => return Observed::Missing,
            Err(e) => return Observed::Unreadable(e),
        };
        let number = |attr: &str| {
            directory::values(&entry, attr)
                .into_iter()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        };
        Observed::Present(Seen {
            changed_at_ms: number("pwdLastSet").and_then(filetime_ms),
            changed_by: None,
            verifier: number("msDS-KeyVersionNumber").map(Verifier::Version),
        })
    }

    fn apply(&self, change: &Change, account: &str) -> Outcome {
        self.session
            .with_conn(|conn| self.apply_on(conn, change, account))
    }

    fn check(&self) -> Result<(), Unusable> {
        self.session.check()
    }

    fn policy_reader(&self) -> Option<Box<dyn PolicyReader>> {
        Some(Box::new(DomainRules(self.rules_session.clone())))
    }

    fn limits(&self) -> Limits {
        Limits {
            scheme: "Active Directory unicodePwd",
            // AD counts a password in UTF-16 code units, and that is the limit below; in bytes
            // only what every message can carry.
            max_password_bytes: pwsync_proto::limits::MAX_VALUE_BYTES,
            max_password_utf16_units: Some(self.cfg.max_password_length),
            longer_passwords: "",
            password_utf8: true,
            password_forbidden: (&[], ""),
            multi_valued: false,
            // The pre-Windows 2000 logon name: 20 characters, which Windows logons use.
            max_account_bytes: 20,
            account_forbidden: &[
                '"', '/', '\\', '[', ']', ':', ';', '|', '=', ',', '+', '*', '?', '<', '>',
            ],
            account_edge_spaces: false,
            account_forbidden_first: &[],
            folding: Folding::CaseAndSpace,
            // "Passwords must meet complexity requirements", on in a domain's default policy
            // (Windows and Samba): 7 characters, 3 classes, not the account name.
            quality: Quality {
                min_chars: 7,
                classes: 3,
                not_user_name: true,
            },
            // A new unicodePwd leaves userAccountControl (ACCOUNTDISABLE) as it was.
            new_password_unlocks: false,
        }
    }
}

/// Reads the domain's password rules: the domain's own policy (`minPwdLength`, the complexity
/// bit of `pwdProperties`) for every account, and each fine-grained policy (PSO) for the
/// accounts whose resultant policy it is (`msDS-ResultantPSO`: AD's own answer, precedence and
/// group membership included), the domain's then binding every other account. History and
/// minimum age are not published: no agent can check them, so a change they refuse is a dead
/// letter in the DC's words.
pub struct DomainRules(std::sync::Arc<Session>);

impl PolicyReader for DomainRules {
    fn read(&self) -> Result<Vec<SystemRule>, String> {
        self.0.read(read_domain_rules)
    }
}

/// The entries a search finds (no such base: none).
fn entries(
    conn: &mut LdapConn,
    base: &str,
    scope: ldap3::Scope,
    filter: &str,
    attrs: Vec<&str>,
) -> Result<Vec<ldap3::SearchEntry>, String> {
    match conn.search(base, scope, filter, attrs) {
        Ok(r) if r.1.rc == 0 => Ok(r
            .0
            .into_iter()
            .filter(|e| !e.is_ref())
            .map(ldap3::SearchEntry::construct)
            .collect()),
        Ok(r) if r.1.rc == rc::NO_SUCH_OBJECT => Ok(vec![]),
        Ok(r) => Err(directory::describe(
            &format!("searching {base} for {filter}"),
            r.1.rc,
            &r.1.text,
        )),
        Err(e) => Err(format!("searching {base} for {filter}: {e}")),
    }
}

/// What "minimum length N, complexity on or off" asks of a password, as rules: AD's
/// complexity is 3 of the character classes and not the account name.
fn length_and_complexity(min: u32, complex: bool) -> Vec<Rule> {
    let mut out = vec![];
    if min > 0 {
        out.push(Rule::MinChars(min));
    }
    if complex {
        out.extend([Rule::Classes(3), Rule::NotUserName]);
    }
    out
}

fn number(entry: &ldap3::SearchEntry, attr: &str) -> u32 {
    directory::values(entry, attr)
        .first()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .map(|v| v.clamp(0, u32::MAX as i64) as u32)
        .unwrap_or(0)
}

fn read_domain_rules(conn: &mut LdapConn) -> Result<Vec<SystemRule>, String> {
    use ldap3::Scope;
    let base = Session::default_naming_context(conn)?;
    let domain: Vec<String> = base
        .split(',')
        .filter_map(|rdn| rdn.trim().split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("dc"))
        .map(|(_, v)| v.trim().to_lowercase())
        .collect();
    let domain = domain.join(".");
    let own = entries(
        conn,
        &base,
        Scope::Base,
        "(objectClass=*)",
        vec!["minPwdLength", "pwdProperties"],
    )?;
    let own = own
        .first()
        .ok_or_else(|| format!("the domain object {base} cannot be read"))?;
    let domain_rules = length_and_complexity(
        number(own, "minPwdLength"),
        number(own, "pwdProperties") & 1 == 1,
    );
    // The fine-grained policies, and the accounts each is the resultant policy of.
    let container = format!("CN=Password Settings Container,CN=System,{base}");
    let psos = entries(
        conn,
        &container,
        Scope::OneLevel,
        "(objectClass=msDS-PasswordSettings)",
        vec![
            "cn",
            "msDS-MinimumPasswordLength",
            "msDS-PasswordComplexityEnabled",
            "msDS-PSOAppliesTo",
        ],
    )?;
    // In one order whatever the server's, so the same rules make the same policy version.
    let mut psos = psos;
    psos.sort_by_key(|p| directory::normal_dn(&p.dn));
    let mut candidates: BTreeMap<String, String> = BTreeMap::new();
    for pso in &psos {
        for applied in directory::values(pso, "msDS-PSOAppliesTo") {
            let dn = ldap3::ldap_escape(&applied);
            let nested = format!(
                "(&(objectClass=user)(|(distinguishedName={dn})(memberOf:1.2.840.113556.1.4.1941:={dn})))"
            );
            let direct = format!("(&(objectClass=user)(|(distinguishedName={dn})(memberOf={dn})))");
            let found = entries(conn, &base, Scope::Subtree, &nested, vec!["sAMAccountName"])
                .or_else(|_| {
                    entries(conn, &base, Scope::Subtree, &direct, vec!["sAMAccountName"])
                })?;
            for user in found {
                if let Some(name) = directory::values(&user, "sAMAccountName").first() {
                    candidates.insert(user.dn.clone(), name.clone());
                }
            }
        }
    }
    let mut under: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (dn, name) in &candidates {
        let user = entries(
            conn,
            dn,
            Scope::Base,
            "(objectClass=*)",
            vec!["msDS-ResultantPSO"],
        )?;
        if let Some(pso) = user
            .first()
            .and_then(|u| directory::values(u, "msDS-ResultantPSO").first().cloned())
        {
            under
                .entry(directory::normal_dn(&pso))
                .or_default()
                .push(name.clone());
        }
    }
    let excepted: Vec<String> = under.values().flatten().cloned().collect();
    let mut out = vec![];
    let everyone = if excepted.is_empty() {
        Accounts::All
    } else {
        Accounts::AllBut(excepted)
    };
    for rule in domain_rules {
        out.push(SystemRule {
            rule,
            accounts: everyone.clone(),
            source: format!("the password policy of domain {domain}"),
        });
    }
    for pso in &psos {
        let Some(accounts) = under.get(&directory::normal_dn(&pso.dn)) else {
            continue;
        };
        let name = directory::values(pso, "cn")
            .first()
            .cloned()
            .unwrap_or_else(|| pso.dn.clone());
        let complex = directory::values(pso, "msDS-PasswordComplexityEnabled")
            .first()
            .is_some_and(|v| v.eq_ignore_ascii_case("TRUE"));
        for rule in length_and_complexity(number(pso, "msDS-MinimumPasswordLength"), complex) {
            out.push(SystemRule {
                rule,
                accounts: Accounts::Only(accounts.clone()),
                source: format!("fine-grained password policy {name} of domain {domain}"),
            });
        }
    }
    Ok(out)
}

/// A Windows FILETIME (100 ns since 1601) in ms since the Unix epoch; `None` for 0 (Active
/// Directory's "must change at next logon": no time) and times before 1970.
pub fn filetime_ms(filetime: u64) -> Option<u64> {
    const UNIX_EPOCH_IN_FILETIME: u64 = 116_444_736_000_000_000;
    filetime
        .checked_sub(UNIX_EPOCH_IN_FILETIME)
        .filter(|_| filetime != 0)
        .map(|t| t / 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_pwd_is_the_quoted_password_in_utf16le() {
        assert_eq!(&unicode_pwd("ab")[..], b"\"\0a\0b\0\"\0");
        // Outside the BMP: a surrogate pair.
        assert_eq!(
            &unicode_pwd("\u{1F600}")[..],
            &[b'"', 0, 0x3D, 0xD8, 0x00, 0xDE, b'"', 0]
        );
        // The quotes inside are the password's own.
        assert_eq!(&unicode_pwd("\"")[..], b"\"\0\"\0\"\0");
    }

    #[test]
    fn the_dcs_error_codes_are_put_in_words() {
        let text = "0000052D: Constraint violation - check_password_restrictions: the password is too short.";
        let o = classify_ad("set unicodePwd", 19, text);
        assert!(
            matches!(&o, Outcome::Failed(m) if m.contains("password policy") && m.contains("too short")),
            "{o:?}"
        );
        assert!(matches!(
            classify_ad("x", 53, "0000001F: SvcErr: DSID-031A12D2, problem 5003 (WILL_NOT_PERFORM)"),
            Outcome::Failed(m) if m.contains("encrypted connection")
        ));
        assert!(matches!(classify_ad("x", 51, ""), Outcome::RetryLater(_)));
        assert_eq!(ad_error_words("short"), None);
    }
}
