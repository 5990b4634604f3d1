//! Which account a DN names.
//!
//! The account is the value the directory *stores*: [`super::directory::Directory::stored_dn`]
//! gives the entry's DN as stored, and [`UserNaming`] maps that DN to a user name: the value of
//! its first RDN (`uid=alice,ou=people,…` → `alice`), or the value where `{user}` stands in
//! `user_dn_template`, or the group `user` of `user_dn_pattern` matching the whole DN. A DN the
//! mapping does not fit names no account. Values are unescaped as RFC 4514 writes them.

use super::LdapSockConfig;

/// How a DN names its user: `[ldap_sock]`'s `user_dn_template` or `user_dn_pattern` (at most
/// one), else the first RDN's value.
pub enum UserNaming {
    FirstRdn,
    Template(String),
    /// Anchored at both ends, case-insensitive; has a group named `user`.
    Pattern(regex::Regex),
}

impl UserNaming {
    /// The mapping `cfg` asks for; an error says what is wrong with it.
    pub fn new(cfg: &LdapSockConfig) -> Result<UserNaming, String> {
        match (&cfg.user_dn_template, &cfg.user_dn_pattern) {
            (Some(_), Some(_)) => {
                Err("[ldap_sock] has both user_dn_template and user_dn_pattern: keep one".into())
            }
            (Some(t), None) if t.matches("{user}").count() != 1 => Err(format!(
                "[ldap_sock] user_dn_template {t:?} must hold {{user}} exactly once"
            )),
            (Some(t), None) => Ok(UserNaming::Template(t.clone())),
            (None, Some(p)) => {
                let re = regex::RegexBuilder::new(&format!("^(?:{p})$"))
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        format!("[ldap_sock] user_dn_pattern is not a regular expression: {e}")
                    })?;
                if !re.capture_names().any(|n| n == Some("user")) {
                    return Err(format!(
                        "[ldap_sock] user_dn_pattern {p:?} has no group (?P<user>...) for the user name"
                    ));
                }
                Ok(UserNaming::Pattern(re))
            }
            (None, None) => Ok(UserNaming::FirstRdn),
        }
    }

    /// The user `dn` names, unescaped; `None` when the mapping does not fit `dn`.
    pub fn user_of(&self, dn: &str) -> Option<String> {
        match self {
            UserNaming::FirstRdn => user_of_dn(dn),
            UserNaming::Template(t) => user_of_dn_by_template(dn, t),
            UserNaming::Pattern(re) => {
                unescape_value(re.captures(dn)?.name("user")?.as_str()).filter(|u| !u.is_empty())
            }
        }
    }
}

/// The user name of `dn`: its first RDN's value, unescaped (RFC 4514).
pub fn user_of_dn(dn: &str) -> Option<String> {
    unescape_value(dn.split_once('=')?.1)
}

/// The user name of `dn` under `template` (`uid={user},ou=people,dc=example,dc=org`): the
/// escaped value where `{user}` stands, unescaped; `None` when `dn` is not of that form (the
/// fixed parts compared as DNs are: case and spaces after commas aside).
pub fn user_of_dn_by_template(dn: &str, template: &str) -> Option<String> {
    let (prefix, suffix) = template.split_once("{user}")?;
    let (lower, prefix, suffix) = (dn.to_ascii_lowercase(), norm_dn(prefix), norm_dn(suffix));
    if !lower.starts_with(&prefix) {
        return None;
    }
    let rest = &dn[prefix.len()..];
    // The value ends at the first comma that is not escaped.
    let mut end = rest.len();
    let mut escaped = false;
    for (i, c) in rest.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            ',' if !escaped => {
                end = i;
                break;
            }
            _ => escaped = false,
        }
    }
    let (value, tail) = rest.split_at(end);
    (norm_dn(tail) == suffix).then_some(())?;
    unescape_value(value)
}

/// An RDN value as RFC 4514 escapes it, up to its end (`,` or `+`), unescaped.
fn unescape_value(escaped: &str) -> Option<String> {
    let mut value = vec![];
    let mut chars = escaped.bytes().peekable();
    while let Some(c) = chars.next() {
        match c {
            b'\\' => {
                let a = chars.next()?;
                if a.is_ascii_hexdigit() && chars.peek().is_some_and(|b| b.is_ascii_hexdigit()) {
                    let b = chars.next()?;
                    let hex = [a, b];
                    value.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                } else {
                    value.push(a);
                }
            }
            b',' | b'+' => break,
            c => value.push(c),
        }
    }
    String::from_utf8(value).ok().filter(|v| !v.is_empty())
}

/// A DN for comparing (case and spaces after commas do not matter).
pub fn norm_dn(dn: &str) -> String {
    dn.split(',')
        .map(|p| p.trim().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::ldapsock::SockMode;

    #[test]
    fn a_dn_names_its_user_by_rdn_template_or_pattern() {
        let cfg = |template: Option<&str>, pattern: Option<&str>| LdapSockConfig {
            socket: "s".into(),
            socket_mode: 0o660,
            slapd_user: "openldap".into(),
            state_dir: "d".into(),
            mode: SockMode::Strict,
            url: "ldap://127.0.0.1".into(),
            user_dn_template: template.map(Into::into),
            user_dn_pattern: pattern.map(Into::into),
            sync_base: None,
            ignore_bind_dns: vec![],
            backfill: false,
            backfill_interval_secs: 1,
            settle_secs: 1,
            metrics_listen: None,
        };
        let rdn = UserNaming::new(&cfg(None, None)).unwrap();
        assert_eq!(rdn.user_of(r"uid=al\2Cice,ou=x").as_deref(), Some("al,ice"));
        let t = UserNaming::new(&cfg(Some("uid={user},ou=people,dc=ex"), None)).unwrap();
        assert_eq!(
            t.user_of("UID=bob, ou=People,dc=ex").as_deref(),
            Some("bob")
        );
        assert_eq!(t.user_of("uid=bob,ou=staff,dc=ex"), None);
        let p = UserNaming::new(&cfg(
            None,
            Some("(uid|cn)=(?P<user>[^,]+),ou=(staff|contractors),dc=ex"),
        ))
        .unwrap();
        assert_eq!(
            p.user_of(r"cn=Carol\2B,OU=Staff,dc=ex").as_deref(),
            Some("Carol+")
        );
        assert_eq!(
            p.user_of("uid=dan,ou=contractors,dc=ex").as_deref(),
            Some("dan")
        );
        // Anchored: a longer DN, or one in another branch, names nobody.
        assert_eq!(p.user_of("uid=dan,ou=contractors,dc=ex,dc=org"), None);
        assert_eq!(p.user_of("uid=dan,ou=admins,dc=ex"), None);
        let e = |t, p| UserNaming::new(&cfg(t, p)).err().unwrap();
        assert!(e(Some("uid={user}"), Some("x")).contains("keep one"));
        assert!(e(Some("uid=x,dc=ex"), None).contains("exactly once"));
        assert!(e(None, Some("uid=([^,]+)")).contains("(?P<user>"));
        assert!(e(None, Some("uid=(?P<user>")).contains("not a regular expression"));
    }

    #[test]
    fn dn_user_names_and_scope() {
        assert_eq!(
            user_of_dn("uid=alice,ou=people,dc=x").as_deref(),
            Some("alice")
        );
        assert_eq!(
            user_of_dn("cn=O\\2cBrien\\+x,dc=x").as_deref(),
            Some("O,Brien+x")
        );
        assert_eq!(user_of_dn("uid=,dc=x"), None);
        assert_eq!(norm_dn("ou=People, DC=x"), "ou=people,dc=x");
        let t = "uid={user},ou=people,dc=x";
        assert_eq!(
            user_of_dn_by_template("UID=a\\,b,ou=People, dc=x", t).as_deref(),
            Some("a,b")
        );
        assert_eq!(user_of_dn_by_template("uid=a,ou=admins,dc=x", t), None);
        assert_eq!(user_of_dn_by_template("cn=a,ou=people,dc=x", t), None);
        assert_eq!(user_of_dn_by_template("uid=a,sub,ou=people,dc=x", t), None);
    }
}
