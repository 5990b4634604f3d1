//! What a target can hold, declared as data, and the one check every change passes before any
//! target sees it.
//!
//! Each target returns its [`Limits`] (the password bytes its scheme reads, whether it can hold a
//! NUL or non-UTF-8 bytes, one value or several, the account names it can represent without
//! ambiguity, and how it compares names). [`admit`] checks a change and its account against them
//! and against the protected accounts; a change outside them never reaches the target and
//! becomes a dead letter whose reason names the limit and the way out. The guarantee: pwsync
//! never stores a hash that accepts a password other than the one submitted, and never writes
//! an account name the target would read as another account.
//!
//! The limits are data (serializable), so they can be published to agents and refused where the
//! person types the password.

use glob::{MatchOptions, Pattern};
use pwsync_proto::{Change, Op};
use serde::Serialize;

/// How a target compares account names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Folding {
    /// Byte for byte (htpasswd, PostgreSQL quoted identifiers).
    Exact,
    /// Case-insensitive, and spaces at either end and runs of inner spaces insignificant
    /// (LDAP's caseIgnoreMatch on `uid` and `cn`, AD's `sAMAccountName`).
    CaseAndSpace,
}

impl Folding {
    /// The form two names share exactly when this target takes them for one account.
    pub fn fold(self, name: &str) -> String {
        match self {
            Folding::Exact => name.to_string(),
            Folding::CaseAndSpace => name
                .split(' ')
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase(),
        }
    }

    /// How names are compared, in words for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Folding::Exact => "byte-exact",
            Folding::CaseAndSpace => "case- and space-insensitive",
        }
    }

    /// Whether `a` and `b` name one account here.
    pub fn same(self, a: &str, b: &str) -> bool {
        self.fold(a) == self.fold(b)
    }
}

/// One target's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// What the target stores, as named in refusals ("bcrypt", "SHA-512 crypt", ...).
    pub scheme: &'static str,
    /// The longest password (bytes) the scheme reads whole; a longer one is refused.
    pub max_password_bytes: usize,
    /// The longest password in UTF-16 code units, for a target that counts them (Active
    /// Directory); checked besides `max_password_bytes`.
    pub max_password_utf16_units: Option<usize>,
    /// What to configure instead when a password is too long for `scheme`.
    pub longer_passwords: &'static str,
    /// Whether the password must be UTF-8 (protocols that carry text).
    pub password_utf8: bool,
    /// Characters a password may not contain here (NUL never may), with the reason in words:
    /// Kerberos' prompts read a password as one line, so a line break can never be typed.
    pub password_forbidden: (&'static [char], &'static str),
    /// Whether the target keeps several passwords per account (LDAP `userPassword`).
    pub multi_valued: bool,
    /// The longest account name (bytes) the target keeps apart from others.
    pub max_account_bytes: usize,
    /// Characters an account name may not contain here (control characters never may).
    pub account_forbidden: &'static [char],
    /// Whether an account name may begin or end with a space (a space the target drops).
    pub account_edge_spaces: bool,
    /// Characters an account name may not begin with (`#` starts an htpasswd comment).
    pub account_forbidden_first: &'static [char],
    pub folding: Folding,
    /// What the target's own system refuses as too weak (Active Directory's complexity rule):
    /// not checked here (the system refuses it itself) but published in the group's password
    /// policy so agents refuse it where the person types it (`crate::policy`).
    pub quality: Quality,
    /// Whether setting a new password also lifts a revoke's lock here (LDAP ppolicy's
    /// `pwdAccountLockedTime`, htpasswd's `!` prefix: the new value replaces them), rather
    /// than leaving it (AD's ACCOUNTDISABLE bit, Kerberos' `allow_tix`, PostgreSQL's
    /// `NOLOGIN`). The pipeline puts the lock back after every password change of a revoked
    /// account either way (`decide::relock_after`); this says which systems need it, and the
    /// simulator's target models behave by it.
    pub new_password_unlocks: bool,
}

/// A target system's own quality rule, as it enforces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quality {
    pub min_chars: u32,
    /// Of four classes: lower case, upper case, digits, others.
    pub classes: u8,
    /// The password may not contain the account name.
    pub not_user_name: bool,
}

impl Quality {
    pub const NONE: Quality = Quality {
        min_chars: 0,
        classes: 0,
        not_user_name: false,
    };
}

impl Limits {
    /// The limits of a target that takes any UTF-8 text, one value, names byte-exact.
    pub const fn text(scheme: &'static str) -> Limits {
        Limits {
            scheme,
            max_password_bytes: pwsync_proto::limits::MAX_VALUE_BYTES,
            max_password_utf16_units: None,
            longer_passwords: "",
            password_utf8: true,
            password_forbidden: (&[], ""),
            multi_valued: false,
            max_account_bytes: pwsync_proto::limits::MAX_USER_BYTES,
            account_forbidden: &[],
            account_edge_spaces: true,
            account_forbidden_first: &[],
            folding: Folding::Exact,
            quality: Quality::NONE,
            new_password_unlocks: true,
        }
    }
}

/// Accounts no target changes unless its `protect` list says otherwise: the super-users of the
/// systems pwsync writes to. The target's own login is always protected besides.
pub const DEFAULT_PROTECT: [&str; 4] = ["root", "postgres", "Administrator", "krbtgt"];

/// Checks `change`, to be applied to `account`, against `limits` and the `protect` patterns.
/// `Err` is the dead letter's reason: it names the limit and the way out, and never a
/// password. (The target's own login is the target's to refuse: only its server knows which
/// account that is, see [`super::own_login`].)
pub fn admit(
    limits: &Limits,
    protect: &[Pattern],
    change: &Change,
    account: &str,
) -> Result<(), String> {
    check_account(limits, account)?;
    let folded = limits.folding.fold(account);
    let options = MatchOptions {
        case_sensitive: limits.folding == Folding::Exact,
        ..MatchOptions::new()
    };
    if let Some(p) = protect.iter().find(|p| p.matches_with(&folded, options)) {
        return Err(format!(
            "account {account:?} is protected on this target (protect pattern {:?}); take it out of protect to let pwsync change it",
            p.as_str()
        ));
    }
    if !change.op.carries_values() {
        return Ok(());
    }
    // A delete without a value removes every password: nothing to check.
    if change.values.is_empty() && change.op != Op::Delete {
        return Err(format!("{} without a value", change.op));
    }
    if matches!(change.op, Op::Replace | Op::Add) && change.values.len() > 1 && !limits.multi_valued
    {
        return Err(format!(
            "{} with {} values, but this target ({}) holds one password per account; send one value",
            change.op,
            change.values.len(),
            limits.scheme
        ));
    }
    for (i, v) in change.values.iter().enumerate() {
        let bytes = v.expose();
        let which = if change.values.len() > 1 {
            format!("value {} of the {}", i + 1, change.op)
        } else {
            "the password".to_string()
        };
        if bytes.is_empty() {
            return Err(format!("{which} is empty"));
        }
        if bytes.contains(&0) {
            return Err(format!(
                "{which} contains a NUL byte, which no login on this target ({}) can type or verify",
                limits.scheme
            ));
        }
        if limits.password_utf8 && std::str::from_utf8(bytes).is_err() {
            return Err(format!(
                "{which} is not UTF-8, which this target ({}) needs",
                limits.scheme
            ));
        }
        let (forbidden, why) = limits.password_forbidden;
        if let Some(c) = String::from_utf8_lossy(bytes)
            .chars()
            .find(|c| forbidden.contains(c))
        {
            return Err(format!(
                "{which} contains {}, which this target ({}) cannot take: {why}",
                c.escape_debug(),
                limits.scheme
            ));
        }
        if bytes.len() > limits.max_password_bytes {
            return Err(format!(
                "{which} is {} bytes; this target stores {}, which reads only {} bytes{}",
                bytes.len(),
                limits.scheme,
                limits.max_password_bytes,
                if limits.longer_passwords.is_empty() {
                    String::new()
                } else {
                    format!(": {}", limits.longer_passwords)
                }
            ));
        }
        if let Some(max) = limits.max_password_utf16_units {
            let units = String::from_utf8_lossy(bytes).encode_utf16().count();
            if units > max {
                return Err(format!(
                    "{which} is {units} UTF-16 code units; this target ({}) takes at most {max} UTF-16 code units (one for most characters, two for one outside the Basic Multilingual Plane, such as an emoji)",
                    limits.scheme
                ));
            }
        }
    }
    Ok(())
}

/// Whether `account` is a name this target represents unambiguously.
pub fn check_account(limits: &Limits, account: &str) -> Result<(), String> {
    if account.is_empty() {
        return Err("the account name is empty".into());
    }
    if account.len() > limits.max_account_bytes {
        return Err(format!(
            "account name of {} bytes; this target keeps only {} bytes of a name apart (a longer one would change another account); map the user to a shorter account",
            account.len(),
            limits.max_account_bytes
        ));
    }
    if let Some(c) = account
        .chars()
        .find(|c| c.is_control() || limits.account_forbidden.contains(c))
    {
        return Err(format!(
            "account name {account:?} contains {c:?}, which this target cannot hold in a name; map the user to another account"
        ));
    }
    if !limits.account_edge_spaces
        && (account.starts_with(char::is_whitespace) || account.ends_with(char::is_whitespace))
    {
        return Err(format!(
            "account name {account:?} begins or ends with a space, which this target drops (it would be another account's name); map the user"
        ));
    }
    if let Some(c) = account
        .chars()
        .next()
        .filter(|c| limits.account_forbidden_first.contains(c))
    {
        return Err(format!(
            "account name {account:?} begins with {c:?}, which this target reads differently; map the user"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::Secret;

    fn bcrypt() -> Limits {
        Limits {
            max_password_bytes: 71,
            longer_passwords: "set hash = \"argon2id\"",
            account_forbidden: &[':'],
            account_edge_spaces: false,
            account_forbidden_first: &['#'],
            ..Limits::text("bcrypt")
        }
    }

    fn replace(values: &[&[u8]]) -> Change {
        Change::new(
            "u",
            "s",
            Op::Replace,
            values.iter().map(|v| Secret::new(v.to_vec())).collect(),
        )
    }

    #[test]
    fn passwords_at_and_past_the_limit() {
        let l = bcrypt();
        assert!(admit(&l, &[], &replace(&[&[b'a'; 71]]), "u").is_ok());
        let e = admit(&l, &[], &replace(&[&[b'a'; 72]]), "u").unwrap_err();
        assert!(
            e.contains("72 bytes") && e.contains("bcrypt") && e.contains("argon2id"),
            "{e}"
        );
        assert!(admit(&l, &[], &replace(&[b"a\0b"]), "u")
            .unwrap_err()
            .contains("NUL"));
        assert!(admit(&l, &[], &replace(&[b"\xff"]), "u")
            .unwrap_err()
            .contains("UTF-8"));
        assert!(admit(&l, &[], &replace(&[b"a", b"b"]), "u")
            .unwrap_err()
            .contains("one password"));
        let lines = Limits {
            password_forbidden: (&['\n'], "one line"),
            ..Limits::text("krb")
        };
        let e = admit(&lines, &[], &replace(&[b"a\nb"]), "u").unwrap_err();
        assert!(e.contains("\\n") && e.contains("one line"), "{e}");
        assert!(admit(&lines, &[], &replace(&[b"a\rb"]), "u").is_ok());
    }

    #[test]
    fn names_and_protection() {
        let l = bcrypt();
        for bad in [" lead", "trail ", "#hash", "a:b", "a\nb", ""] {
            assert!(check_account(&l, bad).is_err(), "{bad:?}");
        }
        let protect: Vec<Pattern> = DEFAULT_PROTECT
            .iter()
            .map(|p| Pattern::new(p).unwrap())
            .collect();
        let ldap = Limits {
            folding: Folding::CaseAndSpace,
            ..Limits::text("x")
        };
        assert!(admit(&ldap, &protect, &replace(&[b"p"]), "ROOT").is_err());
        assert!(admit(&l, &protect, &replace(&[b"p"]), "ROOT").is_ok());
        assert!(Folding::CaseAndSpace.same(" Lead  Dev", "lead dev"));
        assert!(!Folding::Exact.same("Alice", "alice"));
    }
}
