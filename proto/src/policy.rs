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
}

/// One rule and where it came from ("web stores bcrypt", "the [policy] of group g1").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcedRule {
    pub rule: Rule,
    pub source: String,
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
                _ => 0,
            })
            .sum();
        if listed > MAX_LIST_BYTES {
            return Err(invalid(format!(
                "{listed} bytes of forbidden words and passwords (at most {MAX_LIST_BYTES})"
            )));
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
                return Err(format!("{why}: {}", r.source));
            }
        }
        Ok(())
    }

    /// Rules that no password can keep together (a minimum above a maximum), in words; empty
    /// when the policy can be satisfied.
    pub fn contradictions(&self) -> Vec<String> {
        let mut out = vec![];
        for min in &self.rules {
            let Rule::MinChars(n) = min.rule else {
                continue;
            };
            for max in &self.rules {
                let limit = match max.rule {
                    Rule::MaxChars(m) => m,
                    // One byte per character at best.
                    Rule::MaxBytes(m) => m,
                    _ => continue,
                };
                if n > limit {
                    out.push(format!(
                        "{} ({}) and {} ({}) leave no password",
                        min.rule.describe(),
                        min.source,
                        max.rule.describe(),
                        max.source
                    ));
                }
            }
        }
        out
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
}
