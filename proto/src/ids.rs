//! Identifier types. Each carries its invariant so that code handling one never re-checks it:
//! an [`AgentId`] or [`GroupName`] is always safe to put in an MQTT topic level and a file name;
//! a [`Seq`] is an agent's gap-free sequence number; an [`Offset`] is a position in the relay's
//! journal; a [`KeyId`] is the SHA-256 fingerprint of a public key.

use crate::error::DecodeError;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest agent id or group name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

fn check_name(what: &'static str, s: &str) -> Result<(), DecodeError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if s.is_empty() || s.len() > MAX_NAME_BYTES || !s.chars().all(ok_char) || s.starts_with('.') {
        return Err(DecodeError::Invalid {
            what,
            reason: format!(
                "{s:?} must be 1 to {MAX_NAME_BYTES} characters of A-Z a-z 0-9 . _ - \
                 and must not start with '.'"
            ),
        });
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: impl Into<String>) -> Result<Self, DecodeError> {
                let s = s.into();
                check_name($what, &s)?;
                Ok($name(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = DecodeError;
            fn try_from(s: String) -> Result<Self, DecodeError> {
                $name::new(s)
            }
        }
        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }
        impl std::str::FromStr for $name {
            type Err = DecodeError;
            fn from_str(s: &str) -> Result<Self, DecodeError> {
                $name::new(s)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

name_type!(
    /// The name of an agent: one per host or source system.
    AgentId,
    "agent id"
);
name_type!(
    /// The name of a consumer group: every consumer of a group shares one cursor at the relay.
    GroupName,
    "group name"
);

/// An agent's sequence number: starts at 1, gap-free per agent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct Seq(pub u64);

impl Seq {
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A position in the relay's journal: starts at 1, increases by one per journaled envelope.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
pub struct Offset(pub u64);

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The SHA-256 fingerprint of a public key's DER encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 32]);

impl KeyId {
    pub fn of_public_der(der: &[u8]) -> KeyId {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
        let mut id = [0u8; 32];
        id.copy_from_slice(d.as_ref());
        KeyId(id)
    }

    /// The full fingerprint in lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for KeyId {
    /// The first 16 hex digits: enough to tell keys apart in logs and listings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_topic_and_file_safe() {
        for good in ["host-1", "db01.example.org", "A_b"] {
            assert!(AgentId::new(good).is_ok(), "{good}");
        }
        for bad in ["", "a/b", "+", "#", "..", ".hidden", "a b", &"x".repeat(65)] {
            assert!(AgentId::new(bad).is_err(), "{bad}");
            assert!(GroupName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn invalid_names_are_rejected_when_decoding() {
        let bytes = postcard::to_allocvec(&"a/b".to_string()).unwrap();
        assert!(postcard::from_bytes::<AgentId>(&bytes).is_err());
    }
}
