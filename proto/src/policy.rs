//! The combined password policy: what every target of a consumer group can hold and what its
//! operator asks for, as data, signed by the group and checked where the person types the
//! password.
//!
//! A consumer group builds one [`PasswordPolicy`] from its targets' declared limits and its
//! `[policy]` section, signs it with the group key ([`crate::signed`], kind 6) and publishes it
//! on `pwsync/v1/policy/GROUP` ([`crate::topics::policy`]). An agent verifies it against the
//! group keys it trusts, keeps the newest `version` of each group (an older or equal one is a
//! replay and is ignored), and refuses a password when any rule of any group refuses it
//! ([`check_all`]): the strictest policy every target can satisfy is all their rules at once.
//!
//! Every rule names where it came from (`source`: a target and what it stores, or the group's
//! `[policy]`), and a refusal is "RULE: SOURCE" in words the person can act on ("at most 72
//! bytes: web stores bcrypt"). A refusal never holds the password or any part of it; the
//! forbidden words and passwords are matched here, locally, so no password leaves the host to
//! be checked.

use crate::error::DecodeError;
use crate::ids::GroupName;
use crate::signed::SignedMessage;
use serde::{Deserialize, Serialize};

/// The most rules one policy holds.
pub const MAX_RULES: usize = 64;
/// The most bytes of forbidden words and passwords one policy holds (it travels in one signed
/// message, [`crate::limits::MAX_SIGNED_BYTES`]).
pub const MAX_LIST_BYTES: usize = 96 * 1024;

/// What a rule asks of a password.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// At least this many characters.
    MinChars(u32),
    /// At most this many characters.
    MaxChars(u32),
    /// At most this many bytes (UTF-8): what a hash scheme reads whole.
    MaxBytes(u32),
    /// Characters from at least this many of four classes: lower case, upper case, digits,
    /// others.
    Classes(u8),
    /// Must be UTF-8 text.
    Utf8,
    /// None of these characters.
    ForbiddenChars(Vec<char>),
    /// Must not contain the user name (case aside), when it is 3 characters or more.
    NotUserName,
    /// Must not contain any of these words (lower case; case aside).
    ForbiddenWords(Vec<String>),
    /// Must not be one of these passwords (lower case; case aside).
    ForbiddenPasswords(Vec<String>),
    /// At most this many UTF-16 code units: how Active Directory counts a password's length
    /// (a character outside the Basic Multilingual Plane is two).
    MaxUtf16Units(u32),
    /// `rule`, for some users only: a domain's fine-grained policy for the accounts it applies
    /// to, or its default policy for every other account.
    Scoped { scope: Scope, rule: Box<Rule> },
}

/// Which users a [`Rule::Scoped`] applies to. Names are kept in lower case and compared with
/// the user's name in lower case (directories compare account names without case; for a system
/// that does not, such as Kerberos, a rule may reach a user whose name differs only in case:
/// stricter, never laxer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Only these users.
    Only(Vec<String>),
    /// Every user but these.
    AllBut(Vec<String>),
}

impl Scope {
    /// The scope of `users`, their names put in lower case (sorted, once each).
    pub fn only(users: impl IntoIterator<Item = String>) -> Scope {
        Scope::Only(Self::names(users))
    }

    /// Every user but `users`.
    pub fn all_but(users: impl IntoIterator<Item = String>) -> Scope {
        Scope::AllBut(Self::names(users))
    }

    fn names(users: impl IntoIterator<Item = String>) -> Vec<String> {
        let set: std::collections::BTreeSet<String> =
            users.into_iter().map(|u| u.to_lowercase()).collect();
        set.into_iter().collect()
    }

    /// Whether `user` is in this scope.
    pub fn covers(&self, user: &str) -> bool {
        let lower = user.to_lowercase();
        match self {
            Scope::Only(list) => list.binary_search(&lower).is_ok(),
            Scope::AllBut(list) => list.binary_search(&lower).is_err(),
        }
    }

    /// The names it lists.
    pub fn names_listed(&self) -> &[String] {
        match self {
            Scope::Only(l) | Scope::AllBut(l) => l,
        }
    }

    /// The scope in words, for `pwsync-agent policy` (at most a few names).
    pub fn describe(&self) -> String {
        let list = self.names_listed();
        let shown: Vec<String> = list.iter().take(3).map(|n| shown(n)).collect();
        let more = if list.len() > 3 {
            format!(" and {} more", list.len() - 3)
        } else {
            String::new()
        };
        match self {
            Scope::Only(_) => format!("for {}{more}", shown.join(", ")),
            Scope::AllBut(_) => format!("for all but {}{more}", shown.join(", ")),
        }
    }
}

/// One rule and where it came from ("web stores bcrypt", "the [policy] of group g1").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcedRule {
    pub rule: Rule,
    pub source: String,
}

impl SourcedRule {
    /// Where the rule came from, fit to show on a terminal or in a PAM prompt: a line break,
    /// an escape sequence or any other control character in the group's text is written as
    /// its escape (`\n`, `\u{1b}`), never passed on raw.
    pub fn source_shown(&self) -> String {
        shown(&self.source)
    }
}

/// `text` with every control character written as its escape.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One group's policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordPolicy {
    pub group: GroupName,
    /// Grows with every change of the rules; an agent keeps only the highest it verified.
    pub version: u64,
    /// When the group made this version (ms since the Unix epoch).
    pub issued_ms: u64,
    /// When the group last published it (ms): an agent counts the policy's age from this.
    pub published_ms: u64,
    pub rules: Vec<SourcedRule>,
}

impl SignedMessage for PasswordPolicy {
    const KIND: u8 = 6;
    const NAME: &'static str = "password policy";
    fn validate(&self) -> Result<(), DecodeError> {
        let invalid = |reason: String| DecodeError::Invalid {
            what: Self::NAME,
            reason,
        };
        if self.rules.len() > MAX_RULES {
            return Err(invalid(format!(
                "{} rules (at most {MAX_RULES})",
                self.rules.len()
            )));
        }
        let listed: usize = self
            .rules
            .iter()
            .map(|r| match &r.rule {
                Rule::ForbiddenWords(w) | Rule::ForbiddenPasswords(w) => {
                    w.iter().map(|s| s.len() + 1).sum()
                }
                Rule::Scoped { scope, .. } => {
                    scope.names_listed().iter().map(|s| s.len() + 1).sum()
                }
                _ => 0,
            })
            .sum();
        if listed > MAX_LIST_BYTES {
            return Err(invalid(format!(
                "{listed} bytes of forbidden words, passwords and scoped names (at most {MAX_LIST_BYTES})"
            )));
        }
        for r in &self.rules {
            if let Rule::Scoped { scope, rule } = &r.rule {
                if matches!(**rule, Rule::Scoped { .. }) {
                    return Err(invalid("a scope within a scope".into()));
                }
                let names = scope.names_listed();
                if names.windows(2).any(|w| w[0] >= w[1])
                    || names.iter().any(|n| *n != n.to_lowercase())
                {
                    return Err(invalid(
                        "a scope's names are not in lower case, sorted, once each".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Rule {
    /// Why `password` of `user` breaks this rule, in words without the password; `None` when it
    /// keeps it.
    pub fn refuses(&self, user: &str, password: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(password);
        let chars = text.chars().count();
        match self {
            Rule::MinChars(n) if chars < *n as usize => Some(format!("at least {n} characters")),
            Rule::MaxChars(n) if chars > *n as usize => Some(format!("at most {n} characters")),
            Rule::MaxBytes(n) if password.len() > *n as usize => Some(format!(
                "at most {n} bytes (this one is {})",
                password.len()
            )),
            Rule::Classes(need) => {
                let have = classes(&text);
                (have < *need as usize).then(|| {
                    format!(
                        "needs {need} of 4 character classes (lower case, upper case, digits, others); this one has {have}"
                    )
                })
            }
            Rule::Utf8 if std::str::from_utf8(password).is_err() => {
                Some("must be UTF-8 text".into())
            }
            Rule::ForbiddenChars(list) => text
                .chars()
                .find(|c| list.contains(c))
                .map(|c| format!("must not contain {}", c.escape_debug())),
            Rule::NotUserName
                if user.chars().count() >= 3
                    && text.to_lowercase().contains(&user.to_lowercase()) =>
            {
                Some("must not contain the user name".into())
            }
            Rule::ForbiddenWords(words) => {
                let lower = text.to_lowercase();
                words
                    .iter()
                    .any(|w| !w.is_empty() && lower.contains(w.as_str()))
                    .then(|| "must not contain a forbidden word".to_string())
            }
            Rule::ForbiddenPasswords(list) => {
                let lower = text.to_lowercase();
                list.contains(&lower)
                    .then(|| "is on the list of forbidden passwords".to_string())
            }
            Rule::MaxUtf16Units(n) => {
                let units = text.encode_utf16().count();
                (units > *n as usize)
                    .then(|| format!("at most {n} UTF-16 code units (this one is {units})"))
            }
            Rule::Scoped { scope, rule } if scope.covers(user) => rule.refuses(user, password),
            _ => None,
        }
    }

    /// The rule in words, for `pwsync-agent policy`.
    pub fn describe(&self) -> String {
        match self {
            Rule::MinChars(n) => format!("at least {n} characters"),
            Rule::MaxChars(n) => format!("at most {n} characters"),
            Rule::MaxBytes(n) => format!("at most {n} bytes"),
            Rule::Classes(n) => format!("{n} of 4 character classes"),
            Rule::Utf8 => "UTF-8 text".into(),
            Rule::ForbiddenChars(l) => format!(
                "none of {}",
                l.iter()
                    .map(|c| c.escape_debug().to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Rule::NotUserName => "not containing the user name".into(),
            Rule::ForbiddenWords(w) => format!("none of {} forbidden words", w.len()),
            Rule::ForbiddenPasswords(p) => format!("not one of {} forbidden passwords", p.len()),
            Rule::MaxUtf16Units(n) => format!("at most {n} UTF-16 code units"),
            Rule::Scoped { scope, rule } => format!("{} {}", rule.describe(), scope.describe()),
        }
    }

    /// The rule without its scope, and the scope (`None`: everyone).
    pub fn unscoped(&self) -> (&Rule, Option<&Scope>) {
        match self {
            Rule::Scoped { scope, rule } => (rule, Some(scope)),
            other => (other, None),
        }
    }
}

/// How many of the four classes (lower, upper, digit, other) `text` uses.
fn classes(text: &str) -> usize {
    let mut seen = [false; 4];
    for c in text.chars() {
        let i = if c.is_lowercase() {
            0
        } else if c.is_uppercase() {
            1
        } else if c.is_ascii_digit() {
            2
        } else {
            3
        };
        seen[i] = true;
    }
    seen.iter().filter(|s| **s).count()
}

impl PasswordPolicy {
    /// The first of this group's rules that refuses `password`, as "RULE: SOURCE".
    pub fn check(&self, user: &str, password: &[u8]) -> Result<(), String> {
        for r in &self.rules {
            if let Some(why) = r.rule.refuses(user, password) {
                return Err(format!("{why}: {}", r.source_shown()));
            }
        }
        Ok(())
    }

    /// Rules that no password can keep together (a minimum above a maximum), in words; empty
    /// when the policy can be satisfied.
    pub fn contradictions(&self) -> Vec<String> {
        let mut out = vec![];
        for min in &self.rules {
            let (Rule::MinChars(n), min_scope) = min.rule.unscoped() else {
                continue;
            };
            for max in &self.rules {
                let (max_rule, max_scope) = max.rule.unscoped();
                let limit = match max_rule {
                    Rule::MaxChars(m) => *m,
                    // One byte, one UTF-16 code unit per character at best.
                    Rule::MaxBytes(m) | Rule::MaxUtf16Units(m) => *m,
                    _ => continue,
                };
                // Rules of disjoint scopes (a domain's default and a fine-grained policy) never
                // meet in one user.
                let meet = match (min_scope, max_scope) {
                    (Some(Scope::Only(a)), Some(Scope::AllBut(b)))
                    | (Some(Scope::AllBut(b)), Some(Scope::Only(a))) => {
                        a.iter().any(|u| b.binary_search(u).is_err())
                    }
                    (Some(Scope::Only(a)), Some(Scope::Only(b))) => {
                        a.iter().any(|u| b.binary_search(u).is_ok())
                    }
                    _ => true,
                };
                if *n > limit && meet {
                    out.push(format!(
                        "{} ({}) and {} ({}) leave no password",
                        min.rule.describe(),
                        min.source_shown(),
                        max.rule.describe(),
                        max.source_shown()
                    ));
                }
            }
        }
        out
    }
}

/// How far ahead of a receiver's clock a policy's version and times may be. The group makes
/// versions from its clock (`max(last + 1, now in ms)`), so a version this bound lets through is
/// overtaken by the group's own next version within this long: no single signed message can
/// make later genuine policies look old for longer.
pub const AHEAD_TOLERANCE_MS: u64 = 10 * 60 * 1000;

/// What a receiver of a verified policy (an agent, the relay) does with it, given the one it
/// holds: one rule for both, so they always hold the same policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    /// A newer version: held from now on.
    Taken,
    /// The version held, published again later: held (its age starts over).
    Refreshed,
    /// The very publication held: nothing to do.
    Repeated,
    /// An older version, the held version with other rules, or the held version published
    /// earlier: ignored.
    Replayed,
    /// Rules no password can keep (a minimum above a maximum): ignored, so one mistake cannot
    /// refuse every password.
    Unsatisfiable,
    /// A version or time more than [`AHEAD_TOLERANCE_MS`] ahead of the receiver's clock:
    /// ignored, so it cannot pin the group.
    FromTheFuture,
}

impl Acceptance {
    /// Whether the receiver holds the offered policy afterwards.
    pub fn holds(self) -> bool {
        matches!(self, Acceptance::Taken | Acceptance::Refreshed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Acceptance::Taken => "taken",
            Acceptance::Refreshed => "refreshed",
            Acceptance::Repeated => "repeated",
            Acceptance::Replayed => "replayed",
            Acceptance::Unsatisfiable => "unsatisfiable",
            Acceptance::FromTheFuture => "from_the_future",
        }
    }
}

impl PasswordPolicy {
    /// Whether a receiver whose clock reads `now_ms` and who holds `held` takes this (verified)
    /// policy of the same group.
    pub fn acceptance(&self, held: Option<&PasswordPolicy>, now_ms: u64) -> Acceptance {
        if !self.contradictions().is_empty() {
            return Acceptance::Unsatisfiable;
        }
        let limit = now_ms.saturating_add(AHEAD_TOLERANCE_MS);
        if self.version > limit || self.issued_ms > limit || self.published_ms > limit {
            return Acceptance::FromTheFuture;
        }
        let Some(h) = held else {
            return Acceptance::Taken;
        };
        use std::cmp::Ordering::*;
        match (
            self.version.cmp(&h.version),
            self.published_ms.cmp(&h.published_ms),
        ) {
            (Greater, _) => Acceptance::Taken,
            (Less, _) => Acceptance::Replayed,
            (Equal, _) if self.rules != h.rules => Acceptance::Replayed,
            (Equal, Equal) => Acceptance::Repeated,
            (Equal, Less) => Acceptance::Replayed,
            (Equal, Greater) => Acceptance::Refreshed,
        }
    }
}

/// Checks `password` against every policy: the first refusal, naming its group's rule.
pub fn check_all<'a>(
    policies: impl IntoIterator<Item = &'a PasswordPolicy>,
    user: &str,
    password: &[u8],
) -> Result<(), String> {
    for p in policies {
        p.check(user, password)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    fn policy(rules: Vec<(Rule, &str)>) -> PasswordPolicy {
        PasswordPolicy {
            group: GroupName::new("g1").unwrap(),
            version: 7,
            issued_ms: 1,
            published_ms: 2,
            rules: rules
                .into_iter()
                .map(|(rule, source)| SourcedRule {
                    rule,
                    source: source.into(),
                })
                .collect(),
        }
    }

    #[test]
    fn each_rule_refuses_with_its_source_and_never_the_password() {
        let p = policy(vec![
            (Rule::MaxBytes(72), "web stores bcrypt"),
            (Rule::MinChars(10), "the [policy] of group g1"),
            (Rule::Classes(3), "dc (Active Directory)"),
            (Rule::ForbiddenChars(vec!['\n']), "realm (Kerberos)"),
            (Rule::NotUserName, "dc (Active Directory)"),
            (
                Rule::ForbiddenWords(vec!["acme".into()]),
                "the [policy] of group g1",
            ),
            (
                Rule::ForbiddenPasswords(vec!["summer2026!x".into()]),
                "the [policy] of group g1",
            ),
        ]);
        let long = "Aa1-".repeat(19);
        let cases: [(&str, Option<&str>); 8] = [
            (
                &long,
                Some("at most 72 bytes (this one is 76): web stores bcrypt"),
            ),
            (
                "Aa1-short",
                Some("at least 10 characters: the [policy] of group g1"),
            ),
            ("alllowercase-", Some("needs 3 of 4 character classes")),
            (
                "Line-1\nBreak",
                Some("must not contain \\n: realm (Kerberos)"),
            ),
            ("My-Alice-Pw-1", Some("must not contain the user name")),
            ("Best-ACME-pw-1", Some("must not contain a forbidden word")),
            (
                "SUMMER2026!x",
                Some("is on the list of forbidden passwords"),
            ),
            ("Good-Enough-pw-1", None),
        ];
        for (pw, want) in cases {
            let got = p.check("alice", pw.as_bytes());
            match want {
                None => assert_eq!(got, Ok(()), "{pw}"),
                Some(w) => {
                    let e = got.expect_err(pw);
                    assert!(e.contains(w), "{pw}: {e}");
                    assert!(!e.contains(pw), "{e}");
                }
            }
        }
        // A short user name is not looked for.
        assert_eq!(
            policy(vec![(Rule::NotUserName, "x")]).check("al", b"Xal-pw"),
            Ok(())
        );
    }

    #[test]
    fn signed_round_trip_refuses_another_key_and_oversized_lists() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let p = policy(vec![(Rule::MinChars(8), "x")]);
        let bytes = crate::signed::sign(&p, &key).unwrap();
        let back: PasswordPolicy = crate::signed::verify(&bytes, &key.verifying_key()).unwrap();
        assert_eq!(back, p);
        assert!(crate::signed::verify::<PasswordPolicy>(&bytes, &other.verifying_key()).is_err());
        let big = policy(vec![(
            Rule::ForbiddenPasswords(vec!["x".repeat(1000); 100]),
            "x",
        )]);
        assert!(crate::signed::sign(&big, &key).is_err());
    }

    #[test]
    fn a_minimum_above_a_maximum_is_a_contradiction() {
        let p = policy(vec![
            (Rule::MinChars(80), "ops"),
            (Rule::MaxBytes(72), "web"),
        ]);
        assert_eq!(p.contradictions().len(), 1);
        assert!(policy(vec![
            (Rule::MinChars(8), "ops"),
            (Rule::MaxBytes(72), "web")
        ])
        .contradictions()
        .is_empty());
    }

    #[test]
    fn utf16_units_count_as_active_directory_does() {
        let p = policy(vec![(Rule::MaxUtf16Units(4), "dc")]);
        // 4 accented characters: 8 bytes, 4 units.
        assert_eq!(p.check("u", "éééé".as_bytes()), Ok(()));
        // One character outside the BMP is two units.
        let e = p.check("u", "ééé\u{1F600}".as_bytes()).unwrap_err();
        assert!(
            e.contains("at most 4 UTF-16 code units (this one is 5)"),
            "{e}"
        );
    }

    #[test]
    fn a_scoped_rule_reaches_only_its_users() {
        let p = policy(vec![
            (
                Rule::Scoped {
                    scope: Scope::only(["Admin1".to_string()]),
                    rule: Box::new(Rule::MinChars(20)),
                },
                "dc (fine-grained policy admins)",
            ),
            (
                Rule::Scoped {
                    scope: Scope::all_but(["admin1".to_string()]),
                    rule: Box::new(Rule::MinChars(12)),
                },
                "dc (domain)",
            ),
        ]);
        assert!(p
            .check("ADMIN1", b"twelve-chars-ok")
            .unwrap_err()
            .contains("at least 20"));
        assert_eq!(p.check("alice", b"twelve-chars"), Ok(()));
        assert!(p
            .check("alice", b"eleven-char")
            .unwrap_err()
            .contains("at least 12"));
        assert!(p.contradictions().is_empty());
        // A maximum for everyone meets a scoped minimum above it.
        let mut q = p.clone();
        q.rules.push(SourcedRule {
            rule: Rule::MaxBytes(16),
            source: "web".into(),
        });
        assert_eq!(q.contradictions().len(), 1);
        // Names out of order, or a scope within a scope, are not a valid policy.
        let key = SigningKey::generate().unwrap();
        for bad in [
            Rule::Scoped {
                scope: Scope::Only(vec!["b".into(), "a".into()]),
                rule: Box::new(Rule::MinChars(1)),
            },
            Rule::Scoped {
                scope: Scope::Only(vec!["A".into()]),
                rule: Box::new(Rule::MinChars(1)),
            },
            Rule::Scoped {
                scope: Scope::only(["a".to_string()]),
                rule: Box::new(Rule::Scoped {
                    scope: Scope::only(["a".to_string()]),
                    rule: Box::new(Rule::MinChars(1)),
                }),
            },
        ] {
            assert!(crate::signed::sign(&policy(vec![(bad, "x")]), &key).is_err());
        }
    }

    #[test]
    fn one_acceptance_rule_refuses_contradictions_the_future_and_replays() {
        let now = 1_000_000_000_000u64;
        let at = |version: u64, published: u64, min: u32| PasswordPolicy {
            version,
            issued_ms: published,
            published_ms: published,
            ..policy(vec![(Rule::MinChars(min), "x")])
        };
        let held = at(now, now, 8);
        assert_eq!(
            at(now + 1, now, 8).acceptance(Some(&held), now),
            Acceptance::Taken
        );
        assert_eq!(
            at(now, now + 5, 8).acceptance(Some(&held), now),
            Acceptance::Refreshed
        );
        assert_eq!(
            at(now, now, 8).acceptance(Some(&held), now),
            Acceptance::Repeated
        );
        assert_eq!(
            at(now, now - 5, 8).acceptance(Some(&held), now),
            Acceptance::Replayed
        );
        assert_eq!(
            at(now, now + 5, 9).acceptance(Some(&held), now),
            Acceptance::Replayed
        );
        assert_eq!(
            at(now - 1, now + 5, 8).acceptance(Some(&held), now),
            Acceptance::Replayed
        );
        assert_eq!(
            at(u64::MAX, now, 8).acceptance(Some(&held), now),
            Acceptance::FromTheFuture
        );
        assert_eq!(
            at(now, u64::MAX, 8).acceptance(Some(&held), now),
            Acceptance::FromTheFuture
        );
        let edge = now + AHEAD_TOLERANCE_MS;
        assert_eq!(at(edge, edge, 8).acceptance(None, now), Acceptance::Taken);
        assert_eq!(
            at(edge + 1, now, 8).acceptance(None, now),
            Acceptance::FromTheFuture
        );
        let mut impossible = at(now + 1, now, 50);
        impossible.rules.push(SourcedRule {
            rule: Rule::MaxChars(8),
            source: "y".into(),
        });
        assert_eq!(
            impossible.acceptance(Some(&held), now),
            Acceptance::Unsatisfiable
        );
    }

    #[test]
    fn a_sources_control_characters_are_shown_escaped() {
        let p = policy(vec![(Rule::MinChars(20), "ops\n\u{1b}[2Jgone")]);
        let e = p.check("u", b"short").unwrap_err();
        assert!(e.contains("ops\\n\\u{1b}[2Jgone"), "{e}");
        assert!(!e.contains('\n') && !e.contains('\u{1b}'), "{e}");
    }
}
