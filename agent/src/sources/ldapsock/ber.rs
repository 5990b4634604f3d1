//! The one BER structure ldap-sock reads: the Password Modify extended request (RFC 3062), a
//! SEQUENCE of optional `[0] userIdentity`, `[1] oldPasswd`, `[2] newPasswd` OCTET STRINGs.
//! Definite lengths only, as LDAP requires; anything else is an error. Fields are kept in
//! zeroizing buffers.

use super::modification::Value;
use super::SockError;
use zeroize::Zeroizing;

/// The Password Modify extended operation's OID.
pub const PASSWD_MODIFY_OID: &str = "1.3.6.1.4.1.4203.1.11.1";

/// The fields of a Password Modify request.
#[derive(Default)]
pub struct PasswdModify {
    pub user_identity: Option<Value>,
    pub old: Option<Value>,
    pub new: Option<Value>,
}

/// Parses the BER of a Password Modify request.
pub fn parse_passwd_modify(ber: &[u8]) -> Result<PasswdModify, SockError> {
    let bad = |m: &str| SockError::Message(format!("Password Modify request: {m}"));
    let (tag, body, rest) = ber_element(ber).ok_or_else(|| bad("not BER"))?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(bad("not one SEQUENCE"));
    }
    let mut out = PasswdModify::default();
    let mut inner = body;
    while !inner.is_empty() {
        let (tag, value, rest) =
            ber_element(inner).ok_or_else(|| bad("a field that is not BER"))?;
        let v = Some(Zeroizing::new(value.to_vec()));
        match tag {
            0x80 => out.user_identity = v,
            0x81 => out.old = v,
            0x82 => out.new = v,
            _ => return Err(bad("an unknown field")),
        }
        inner = rest;
    }
    Ok(out)
}

/// One BER element: (tag, contents, what follows).
fn ber_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, x| (acc << 8) | *x as usize);
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn a_password_modify_request_is_read() {
        // ldappasswd -a Alice-Old-1 -s Alice-New-22, by the user (no userIdentity).
        let ber = base64::engine::general_purpose::STANDARD
            .decode("MBuBC0FsaWNlLU9sZC0xggxBbGljZS1OZXctMjI=")
            .unwrap();
        let r = parse_passwd_modify(&ber).unwrap();
        assert!(r.user_identity.is_none());
        assert_eq!(r.old.unwrap().as_slice(), b"Alice-Old-1");
        assert_eq!(r.new.unwrap().as_slice(), b"Alice-New-22");
        // By an administrator, for a DN.
        let ber = base64::engine::general_purpose::STANDARD
            .decode("MDWAJXVpZD1hbGljZSxvdT1wZW9wbGUsZGM9ZXhhbXBsZSxkYz1vcmeCDEFkbWluLVNldC0zMw==")
            .unwrap();
        let r = parse_passwd_modify(&ber).unwrap();
        assert_eq!(
            r.user_identity.unwrap().as_slice(),
            b"uid=alice,ou=people,dc=example,dc=org"
        );
        assert!(parse_passwd_modify(&ber[..ber.len() - 1]).is_err());
        assert!(parse_passwd_modify(b"\x04\x00").is_err());
    }
}
