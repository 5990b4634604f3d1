//! slapd-sock(5)'s messages, as slapd writes them to the overlay's socket.
//!
//! A message is a kind on its first line (`MODIFY`, `EXTENDED`, `BIND`, `RESULT`, …), then LDIF
//! lines (`key: value`, `key:: base64`, folded lines continued by a leading space), ended by an
//! empty line. A MODIFY's modifications are `add:`/`delete:`/`replace:`/`increment:` naming the
//! attribute, its value lines, and `-`. This module only reads: every value is kept in a
//! zeroizing buffer, and a message that does not follow this form is an error, never a guess.

use super::modification::{Kind, Modification, Value};
use super::SockError;
use base64::Engine;
use zeroize::Zeroizing;

/// Largest message read from slapd.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// What a message is: the request slapd asks about, or the result of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verb {
    Modify,
    Extended,
    Bind,
    Result,
    /// Any other request (ADD, DELETE, SEARCH, …): never a password change ldap-sock captures.
    Other(String),
}

impl Verb {
    fn from_line(line: &str) -> Verb {
        match line {
            "MODIFY" => Verb::Modify,
            "EXTENDED" => Verb::Extended,
            "BIND" => Verb::Bind,
            "RESULT" => Verb::Result,
            other => Verb::Other(other.to_string()),
        }
    }
}

/// One message from slapd: its verb and its lines in order.
pub struct Message {
    pub verb: Verb,
    lines: Vec<(String, Value)>,
}

/// A connection id and message id: what ties a request to its result.
pub type OpId = (u64, u64);

impl Message {
    /// Parses one message (ended by an empty line; folded lines joined; `::` values decoded).
    pub fn parse(input: &[u8]) -> Result<Message, SockError> {
        let bad = |m: &str| SockError::Message(m.into());
        let text = input
            .strip_suffix(b"\n\n")
            .ok_or_else(|| bad("not ended by an empty line"))?;
        let mut raw: Vec<Zeroizing<Vec<u8>>> = vec![];
        for line in text.split(|b| *b == b'\n') {
            match (line.first(), raw.last_mut()) {
                (Some(b' '), Some(last)) => last.extend_from_slice(&line[1..]),
                _ => raw.push(Zeroizing::new(line.to_vec())),
            }
        }
        let mut it = raw.into_iter();
        let verb = it
            .next()
            .and_then(|k| String::from_utf8(k.to_vec()).ok())
            .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_uppercase()))
            .map(|k| Verb::from_line(&k))
            .ok_or_else(|| bad("no request kind on the first line"))?;
        let mut lines = vec![];
        for line in it {
            if line.as_slice() == b"-" {
                lines.push(("-".into(), Zeroizing::new(vec![])));
                continue;
            }
            let colon = line
                .iter()
                .position(|b| *b == b':')
                .ok_or_else(|| bad("a line without a colon"))?;
            let key = String::from_utf8(line[..colon].to_vec())
                .map_err(|_| bad("a key that is not UTF-8"))?
                .to_ascii_lowercase();
            let rest = &line[colon + 1..];
            let value = if let Some(b64) = rest.strip_prefix(b":") {
                let b64 = b64.strip_prefix(b" ").unwrap_or(b64);
                Zeroizing::new(
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|_| bad("a base64 value that does not decode"))?,
                )
            } else {
                Zeroizing::new(rest.strip_prefix(b" ").unwrap_or(rest).to_vec())
            };
            lines.push((key, value));
        }
        Ok(Message { verb, lines })
    }

    /// The first value of `key`, as bytes.
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.lines.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The first value of `key`, as text.
    pub fn text(&self, key: &str) -> Option<String> {
        self.value(key)
            .and_then(|v| String::from_utf8(v.to_vec()).ok())
    }

    /// The connection and message id that tie a request to its result.
    pub fn op_id(&self) -> Option<OpId> {
        Some((
            self.text("connid")?.trim().parse().ok()?,
            self.text("msgid")?.trim().parse().ok()?,
        ))
    }

    /// A MODIFY's modifications of `userPassword`, in the order the client sent them. An
    /// unfinished modification (no closing `-`) is an error: slapd always closes them.
    pub fn password_mods(&self) -> Result<Vec<Modification>, SockError> {
        let mut out = vec![];
        let mut current: Option<(Kind, String, Vec<Value>)> = None;
        for (k, v) in &self.lines {
            if let Some(kind) = Kind::from_line(k) {
                if current.is_some() {
                    return Err(SockError::Message("a modification not ended by `-`".into()));
                }
                let attr = String::from_utf8_lossy(v).trim().to_ascii_lowercase();
                current = Some((kind, attr, vec![]));
            } else if k == "-" {
                if let Some((kind, attr, values)) = current.take() {
                    if is_user_password(&attr) {
                        out.push(Modification { kind, values });
                    }
                }
            } else if let Some((_, attr, values)) = current.as_mut() {
                if *k == *attr {
                    values.push(v.clone());
                }
            }
        }
        if current.is_some() {
            return Err(SockError::Message("a modification not ended by `-`".into()));
        }
        Ok(out)
    }
}

/// `userPassword` by any of its names (slapd writes the schema's name, options aside).
fn is_user_password(attr: &str) -> bool {
    let base = attr.split(';').next().unwrap_or(attr);
    base == "userpassword" || base == "2.5.4.35"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_modify_message_yields_its_password_mods_in_order() {
        let m = Message::parse(
            b"MODIFY\nmsgid: 2\nconnid: 1004\nsuffix: dc=example,dc=org\ndn: uid=alice,ou=people,dc=example,dc=org\nadd: userPassword\nuserPassword:: TW9kaWZ5LVJlcC00NA==\n-\nreplace: description\ndescription: x\n-\ndelete: userPassword\nuserPassword: Old\n-\ndelete: userPassword\n-\n\n",
        )
        .unwrap();
        assert_eq!(m.verb, Verb::Modify);
        assert_eq!(m.op_id(), Some((1004, 2)));
        let mods = m.password_mods().unwrap();
        assert_eq!(mods.len(), 3);
        assert_eq!(mods[0].kind, Kind::Add);
        assert_eq!(mods[0].values[0].as_slice(), b"Modify-Rep-44");
        assert_eq!(mods[1].kind, Kind::Delete);
        assert_eq!(mods[1].values[0].as_slice(), b"Old");
        assert_eq!(mods[2].kind, Kind::Delete);
        assert!(mods[2].values.is_empty());
        assert!(Message::parse(b"MODIFY\nmsgid: 2\n").is_err());
        assert!(Message::parse(b"MODIFY\nno colon\n\n").is_err());
        let open =
            Message::parse(b"MODIFY\ndn: x\nadd: userPassword\nuserPassword: a\n\n").unwrap();
        assert!(open.password_mods().is_err());
    }

    #[test]
    fn a_bind_whose_password_breaks_the_message_does_not_parse() {
        // slapd writes a bind's password raw: one with a line break is no LDIF.
        assert!(
            Message::parse(b"BIND\nmsgid: 1\ndn: uid=a,dc=x\nmethod: 128\ncred: a\nb\n\n").is_err()
        );
    }
}
