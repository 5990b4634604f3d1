//! The change model: what happened to one person's password or account on one system.
//!
//! A [`Change`] is what a source hook hands the agent and what a consumer applies to a target.
//! It only ever travels inside an envelope, encrypted. [`Change::validate`] is the one place that
//! says what a well-formed change is; the agent calls it before sealing and the consumer after
//! opening.

use crate::error::DecodeError;
use crate::limits::*;
use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// What happened. The first three act on password values (multi-valued, as LDAP
/// `userPassword`); the last three on the account.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum Op {
    /// The values become the only passwords.
    Replace,
    /// The values are added to the existing ones.
    Add,
    /// The values are removed; with no value, every value is (the account has no password
    /// left, as after LDAP's `delete: userPassword`).
    Delete,
    /// The account is locked.
    Revoke,
    /// The account is unlocked.
    Resume,
    /// The account is removed (or locked for good, by target policy).
    Remove,
    /// A placeholder the agent sends in place of a spooled change it could no longer read (a
    /// corrupted spool record), so the sequence stays gap-free. It carries no user and no values;
    /// consumers apply nothing and report it. Never accepted from a source hook.
    Lost,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::Replace,
        Op::Add,
        Op::Delete,
        Op::Revoke,
        Op::Resume,
        Op::Remove,
    ];

    /// Whether this op carries password values.
    pub fn carries_values(self) -> bool {
        matches!(self, Op::Replace | Op::Add | Op::Delete)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Replace => "replace",
            Op::Add => "add",
            Op::Delete => "delete",
            Op::Revoke => "revoke",
            Op::Resume => "resume",
            Op::Remove => "remove",
            Op::Lost => "lost",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Op, String> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| format!("unknown op {s:?}: expected one of replace, add, delete, revoke, resume, remove"))
    }
}

/// One change for one user, as captured on its origin system.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Change {
    /// The account name on the origin system.
    pub user: String,
    /// The system the change was made on; a change is never applied back to it (G6).
    pub origin: String,
    pub op: Op,
    /// Password values in cleartext; empty for account events.
    pub values: Vec<Secret>,
    /// Optional extra attributes (never secret), passed through to targets.
    pub attributes: BTreeMap<String, String>,
    /// The password the person replaced, when the source saw it (a person's own change:
    /// PAM's old authentication token). Only with [`Op::Replace`]. A target that applies a
    /// change the way the person made it (AD's user-change form, which enforces history and
    /// minimum age) needs it; the others ignore it. Not part of the derived encoding: see
    /// [`Change::encode_into`].
    #[serde(skip)]
    pub previous: Option<Secret>,
}

/// The attribute that marks a change as a backfill: a password seen at a successful login
/// (PAM `auth`, an LDAP bind), not a change the person made. A backfill fills gaps and never
/// overrides: consumers apply it only at targets where pwsync never wrote for that user, and
/// never once a real change of that user was seen.
pub const BACKFILL_ATTRIBUTE: &str = "pwsync.backfill";

fn invalid(reason: String) -> DecodeError {
    DecodeError::Invalid {
        what: "change",
        reason,
    }
}

impl Change {
    /// Whether this change is a backfill ([`BACKFILL_ATTRIBUTE`]).
    pub fn is_backfill(&self) -> bool {
        self.attributes.contains_key(BACKFILL_ATTRIBUTE)
    }

    pub fn new(
        user: impl Into<String>,
        origin: impl Into<String>,
        op: Op,
        values: Vec<Secret>,
    ) -> Self {
        Change {
            user: user.into(),
            origin: origin.into(),
            op,
            values,
            attributes: BTreeMap::new(),
            previous: None,
        }
    }

    /// The encoding inside an envelope: `postcard(Change) · [postcard(previous)]`. A change
    /// without a previous password encodes as it always has, so envelopes written before the
    /// field existed decode unchanged; one with it appends it (a reader that predates it refuses
    /// the trailing bytes rather than drop the value silently). Writes into `buf`, which must be
    /// large enough ([`Change::encoded_len_bound`]); returns the length used.
    pub fn encode_into(&self, buf: &mut [u8]) -> Result<usize, DecodeError> {
        let too_small = |e: postcard::Error| DecodeError::Malformed {
            what: "change",
            reason: e.to_string(),
        };
        let used = postcard::to_slice(self, buf).map_err(too_small)?.len();
        match &self.previous {
            None => Ok(used),
            Some(p) => Ok(used
                + postcard::to_slice(p, &mut buf[used..])
                    .map_err(too_small)?
                    .len()),
        }
    }

    /// Decodes [`Change::encode_into`]'s form (not validated: call [`Change::validate`]).
    pub fn decode(bytes: &[u8]) -> Result<Change, DecodeError> {
        let (mut change, rest) =
            postcard::take_from_bytes::<Change>(bytes).map_err(|e| DecodeError::Malformed {
                what: "change",
                reason: e.to_string(),
            })?;
        if !rest.is_empty() {
            change.previous = Some(crate::codec::decode_exact("previous password", rest)?);
        }
        Ok(change)
    }

    /// An upper bound of the postcard encoding's length (each length prefix is at most 5 bytes).
    pub fn encoded_len_bound(&self) -> usize {
        let field = |len: usize| len + 5;
        16 + field(self.user.len())
            + field(self.origin.len())
            + self.values.iter().map(|v| field(v.len())).sum::<usize>()
            + self.previous.as_ref().map_or(0, |p| field(p.len()))
            + self
                .attributes
                .iter()
                .map(|(k, v)| field(k.len()) + field(v.len()))
                .sum::<usize>()
    }

    /// The placeholder for a change the agent lost: see [`Op::Lost`].
    pub fn lost(origin: impl Into<String>) -> Self {
        Change::new("", origin, Op::Lost, vec![])
    }

    /// Checks every limit and rule; errors name the field but never include a value.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.op == Op::Lost {
            return if self.user.is_empty() && self.values.is_empty() && self.attributes.is_empty() {
                Ok(())
            } else {
                Err(invalid(
                    "a lost-change placeholder carries no user, values or attributes".into(),
                ))
            };
        }
        if self.user.is_empty() || self.user.len() > MAX_USER_BYTES {
            return Err(invalid(format!(
                "user name must be 1 to {MAX_USER_BYTES} bytes"
            )));
        }
        if self.user.chars().any(char::is_control) {
            return Err(invalid("user name contains control characters".into()));
        }
        if self.origin.is_empty()
            || self.origin.len() > MAX_ORIGIN_BYTES
            || self.origin.chars().any(char::is_control)
        {
            return Err(invalid(format!(
                "origin must be 1 to {MAX_ORIGIN_BYTES} bytes without control characters"
            )));
        }
        if self.op.carries_values() {
            // A delete with no value removes every value (LDAP's `delete: userPassword`).
            let least = if self.op == Op::Delete { 0 } else { 1 };
            if self.values.len() < least || self.values.len() > MAX_VALUES {
                return Err(invalid(format!(
                    "{} needs {least} to {MAX_VALUES} password values",
                    self.op
                )));
            }
            if self
                .values
                .iter()
                .any(|v| v.is_empty() || v.len() > MAX_VALUE_BYTES)
            {
                return Err(invalid(format!(
                    "a password value must be 1 to {MAX_VALUE_BYTES} bytes"
                )));
            }
        } else if !self.values.is_empty() {
            return Err(invalid(format!("{} carries no password values", self.op)));
        }
        if let Some(p) = &self.previous {
            if self.op != Op::Replace {
                return Err(invalid(format!(
                    "only a replace carries a previous password, not {}",
                    self.op
                )));
            }
            if p.is_empty() || p.len() > MAX_VALUE_BYTES {
                return Err(invalid(format!(
                    "the previous password must be 1 to {MAX_VALUE_BYTES} bytes"
                )));
            }
        }
        if self.attributes.len() > MAX_ATTRIBUTES {
            return Err(invalid(format!("at most {MAX_ATTRIBUTES} attributes")));
        }
        for (k, v) in &self.attributes {
            if k.is_empty()
                || k.len() > MAX_ATTRIBUTE_NAME_BYTES
                || v.len() > MAX_ATTRIBUTE_VALUE_BYTES
            {
                return Err(invalid(format!(
                    "attribute names are 1 to {MAX_ATTRIBUTE_NAME_BYTES} bytes, values at most {MAX_ATTRIBUTE_VALUE_BYTES}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_round_trip() {
        for op in Op::ALL {
            assert_eq!(op.as_str().parse::<Op>().unwrap(), op);
        }
        assert!("frobnicate".parse::<Op>().is_err());
        assert!(
            "lost".parse::<Op>().is_err(),
            "hooks cannot submit placeholders"
        );
    }

    #[test]
    fn the_previous_password_is_appended_and_its_absence_encodes_as_before() {
        let mut c = Change::new("alice", "h", Op::Replace, vec!["new".into()]);
        let mut buf = vec![0u8; c.encoded_len_bound()];
        let n = c.encode_into(&mut buf).unwrap();
        assert_eq!(&buf[..n], postcard::to_allocvec(&c).unwrap(), "as before");
        assert_eq!(Change::decode(&buf[..n]).unwrap(), c);
        c.previous = Some("old".into());
        let mut buf = vec![0u8; c.encoded_len_bound()];
        let n = c.encode_into(&mut buf).unwrap();
        let back = Change::decode(&buf[..n]).unwrap();
        assert_eq!(back.previous.as_ref().unwrap().expose(), b"old");
        assert_eq!(back, c);
        assert!(back.validate().is_ok());
        // Garbage after the change is refused, not taken for a password.
        let mut bad = buf[..n].to_vec();
        bad.push(0);
        assert!(Change::decode(&bad).is_err());
        let revoke = Change {
            previous: Some("old".into()),
            ..Change::new("alice", "h", Op::Revoke, vec![])
        };
        assert!(revoke.validate().is_err());
    }

    #[test]
    fn validation_rules() {
        assert!(Change::new("alice", "h", Op::Replace, vec!["pw".into()])
            .validate()
            .is_ok());
        assert!(Change::new("alice", "h", Op::Revoke, vec![])
            .validate()
            .is_ok());
        assert!(Change::new("alice", "h", Op::Replace, vec![])
            .validate()
            .is_err());
        assert!(Change::new("alice", "h", Op::Revoke, vec!["pw".into()])
            .validate()
            .is_err());
        assert!(Change::new("", "h", Op::Revoke, vec![]).validate().is_err());
        assert!(Change::new("a\nb", "h", Op::Revoke, vec![])
            .validate()
            .is_err());
        let err = Change::new(
            "alice",
            "h",
            Op::Replace,
            vec![Secret::new(vec![b'x'; MAX_VALUE_BYTES + 1])],
        )
        .validate()
        .unwrap_err();
        assert!(!err.to_string().contains("xxxx"));
    }
}
