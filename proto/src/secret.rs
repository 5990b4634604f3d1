//! [`Secret`]: the only type that holds a password in cleartext.
//!
//! It zeroizes its bytes when dropped, never prints them (`Debug` says `Secret(<redacted>)`) and
//! has no `Display`. Code that needs the bytes calls [`Secret::expose`], which makes every use
//! easy to find in review.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// Takes a password read from a line of input: the trailing `\n` or `\r\n` is removed, and
    /// the buffer it came from is zeroized.
    pub fn from_line(mut line: Zeroizing<Vec<u8>>) -> Self {
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        Secret(line.to_vec())
    }

    /// The cleartext bytes. Every caller is a place where a password is used.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.as_bytes().to_vec())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        Ok(Secret(bytes.into_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::from("hunter2-very-secret");
        let shown = format!("{s:?} {:?}", vec![s.clone()]);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn from_line_strips_line_endings() {
        let s = Secret::from_line(Zeroizing::new(b"pw\r\n".to_vec()));
        assert_eq!(s.expose(), b"pw");
    }
}
