//! Who may connect to the relay's MQTT listener, and what each client may touch.
//!
//! A client is enrolled as an [`Identity`]: an agent (`agent:NAME`) or a consumer group
//! (`consumer:GROUP`). Enrolment makes a random 256-bit token, gives it to the operator once, and
//! keeps only its SHA-256 in the credentials file (mode 0600; a fast hash is enough for a random
//! token, unlike for a person's password). The file is re-read when it changes, so enrolling or
//! removing a client needs no restart. The topic rules are fixed, not configured:
//!
//! | identity | may publish | may subscribe |
//! |---|---|---|
//! | `agent:A` | `pwsync/v1/up/A` | `pwsync/v1/ack/A`, `pwsync/v1/policy/G` (any group G) |
//! | `consumer:G` | `pwsync/v1/commit/G`, `pwsync/v1/policy/G` | `pwsync/v1/down/G`, `pwsync/v1/policy/G` |
//!
//! A group's policy is signed by the group (`pwsync_proto::policy`); agents verify it, so
//! letting every agent read every group's policy tells it nothing it could misuse. A consumer
//! reads its own group's policy topic to see what the agents hold, and supersedes a policy it
//! did not make (`pwsync_consumer::service`).
//!
//! Exact topics only: no wildcard filter is ever allowed to a client.

use pwsync_proto::reloaded::ReloadedFile;
use pwsync_proto::{topics, AgentId, GroupName};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Agent(AgentId),
    Consumer(GroupName),
}

impl Identity {
    /// The MQTT username of this identity.
    pub fn username(&self) -> String {
        match self {
            Identity::Agent(a) => format!("agent:{a}"),
            Identity::Consumer(g) => format!("consumer:{g}"),
        }
    }

    pub fn parse(username: &str) -> Option<Identity> {
        let (kind, name) = username.split_once(':')?;
        match kind {
            "agent" => AgentId::new(name).ok().map(Identity::Agent),
            "consumer" => GroupName::new(name).ok().map(Identity::Consumer),
            _ => None,
        }
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        match self {
            Identity::Agent(a) => topic == topics::up(a),
            Identity::Consumer(g) => topic == topics::commit(g) || topic == topics::policy(g),
        }
    }

    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Agent(a) => {
                filter == topics::ack(a)
                    || matches!(topics::parse(filter), Some(topics::Topic::Policy(_)))
            }
            Identity::Consumer(g) => filter == topics::down(g) || filter == topics::policy(g),
        }
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.username())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("credentials file {path}: {why}")]
    File { path: PathBuf, why: String },
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    /// username → hex SHA-256 of the token.
    #[serde(default)]
    clients: BTreeMap<String, String>,
}

fn sha256_hex(token: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A login that verified: who it is, and the hash of the token it used (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: Identity,
    token_sha256: String,
}

/// The credentials file, re-read when it changes.
pub struct Credentials {
    file: ReloadedFile<CredentialsFile>,
}

impl Credentials {
    /// Opens (and checks) the credentials file; a missing file is an empty one.
    pub fn open(path: &Path) -> Result<Credentials, CredentialsError> {
        let c = Credentials {
            file: ReloadedFile::new(path),
        };
        c.current()?;
        Ok(c)
    }

    fn read(path: &Path) -> Result<CredentialsFile, CredentialsError> {
        let err = |why: String| CredentialsError::File {
            path: path.into(),
            why,
        };
        if !path.exists() {
            return Ok(CredentialsFile::default());
        }
        pwsync_proto::keys::check_private_mode(path).map_err(|e| err(e.to_string()))?;
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        toml::from_str(&text).map_err(|e| err(e.to_string()))
    }

    fn current(&self) -> Result<std::sync::Arc<CredentialsFile>, CredentialsError> {
        self.file.get(Self::read)
    }

    /// The identity `username` stands for, if `password` is its token.
    pub fn verify(&self, username: &str, password: &[u8]) -> Option<Identity> {
        self.login(username, password).map(|l| l.identity)
    }

    /// [`Credentials::verify`], with what the gateway needs to tell later whether this login
    /// still holds ([`Credentials::holds`]).
    pub fn login(&self, username: &str, password: &[u8]) -> Option<Verified> {
        let identity = Identity::parse(username)?;
        let file = match self.current() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the credentials file; refusing logins");
                return None;
            }
        };
        let stored = file.clients.get(username)?;
        let given = sha256_hex(password);
        aws_lc_rs::constant_time::verify_slices_are_equal(stored.as_bytes(), given.as_bytes())
            .ok()
            .map(|_| Verified {
                identity,
                token_sha256: given,
            })
    }

    /// Whether `login` is still enrolled with the token it logged in with: false once
    /// `pwsync-relay unenroll` removed it or `enroll` gave it a new token. Re-reads the file if
    /// it changed; an unreadable file is an error, not a "no".
    pub fn holds(&self, login: &Verified) -> Result<bool, CredentialsError> {
        let file = self.current()?;
        Ok(file
            .clients
            .get(&login.identity.username())
            .is_some_and(|stored| {
                aws_lc_rs::constant_time::verify_slices_are_equal(
                    stored.as_bytes(),
                    login.token_sha256.as_bytes(),
                )
                .is_ok()
            }))
    }

    /// The enrolled usernames.
    pub fn usernames(&self) -> Result<Vec<String>, CredentialsError> {
        Ok(self.current()?.clients.keys().cloned().collect())
    }
}

/// A random 256-bit token, URL-safe base64.
pub fn random_token() -> Result<Zeroizing<String>, CredentialsError> {
    use base64::Engine;
    let mut raw = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(raw.as_mut()).map_err(|_| CredentialsError::File {
        path: PathBuf::new(),
        why: "the system gave no randomness for a token".into(),
    })?;
    Ok(Zeroizing::new(
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw.as_ref()),
    ))
}

/// Enrols `identity` in the credentials file at `path` (replacing an earlier token of the same
/// identity) and returns its new token, which exists nowhere else.
pub fn enroll(path: &Path, identity: &Identity) -> Result<Zeroizing<String>, CredentialsError> {
    let mut file = Credentials::read(path)?;
    let token = random_token()?;
    file.clients
        .insert(identity.username(), sha256_hex(token.as_bytes()));
    write(path, &file)?;
    Ok(token)
}

/// Removes `identity`'s login; true if it was enrolled. The running relay closes its open
/// sessions when it next re-reads the file (within [`crate::gateway::CREDENTIALS_RELOAD`]).
pub fn remove(path: &Path, identity: &Identity) -> Result<bool, CredentialsError> {
    let mut file = Credentials::read(path)?;
    let was = file.clients.remove(&identity.username()).is_some();
    write(path, &file)?;
    Ok(was)
}

fn write(path: &Path, file: &CredentialsFile) -> Result<(), CredentialsError> {
    let err = |why: String| CredentialsError::File {
        path: path.into(),
        why,
    };
    let text = format!(
        "# pwsync relay credentials: the SHA-256 of each enrolled client's token.\n# Managed by `pwsync-relay enroll`; keep mode 0600.\n{}",
        toml::to_string(file).map_err(|e| err(e.to_string()))?
    );
    let tmp = path.with_extension("tmp");
    crate::pki::write_private(&tmp, &text).map_err(|e| err(e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_enrolled_token_verifies_once_and_the_rules_are_exact_topics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        let a = Identity::Agent(AgentId::new("host-a").unwrap());
        let token = enroll(&path, &a).unwrap();
        let creds = Credentials::open(&path).unwrap();
        assert_eq!(
            creds.verify("agent:host-a", token.as_bytes()),
            Some(a.clone())
        );
        assert_eq!(creds.verify("agent:host-a", b"guess"), None);
        assert_eq!(creds.verify("agent:host-b", token.as_bytes()), None);
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains(token.as_str()));
        assert!(a.may_publish("pwsync/v1/up/host-a"));
        assert!(!a.may_publish("pwsync/v1/up/host-b"));
        assert!(!a.may_subscribe("pwsync/v1/down/#"));
        assert!(!a.may_subscribe("pwsync/v1/ack/+"));
        assert!(a.may_subscribe("pwsync/v1/ack/host-a"));
        assert!(a.may_subscribe("pwsync/v1/policy/g1"));
        assert!(!a.may_subscribe("pwsync/v1/policy/+"));
        assert!(!a.may_publish("pwsync/v1/policy/g1"));
        let g = Identity::Consumer(GroupName::new("g1").unwrap());
        assert!(g.may_subscribe("pwsync/v1/down/g1"));
        assert!(g.may_subscribe("pwsync/v1/policy/g1"));
        assert!(!g.may_subscribe("pwsync/v1/policy/g2"));
        assert!(!g.may_subscribe("pwsync/v1/down/g2"));
        // Re-enrolling replaces the token; removal ends the login.
        let again = enroll(&path, &a).unwrap();
        assert_eq!(creds.verify("agent:host-a", token.as_bytes()), None);
        assert!(creds.verify("agent:host-a", again.as_bytes()).is_some());
        assert!(remove(&path, &a).unwrap());
        assert_eq!(creds.verify("agent:host-a", again.as_bytes()), None);
    }

    #[test]
    fn a_login_no_longer_holds_once_removed_or_given_a_new_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        let a = Identity::Agent(AgentId::new("host-a").unwrap());
        let g = Identity::Consumer(GroupName::new("g1").unwrap());
        let token = enroll(&path, &a).unwrap();
        let group_token = enroll(&path, &g).unwrap();
        let creds = Credentials::open(&path).unwrap();
        let login = creds.login("agent:host-a", token.as_bytes()).unwrap();
        let group = creds.login("consumer:g1", group_token.as_bytes()).unwrap();
        assert!(creds.holds(&login).unwrap() && creds.holds(&group).unwrap());
        let _ = enroll(&path, &a).unwrap();
        assert!(
            !creds.holds(&login).unwrap(),
            "a replaced token still holds"
        );
        assert!(remove(&path, &g).unwrap());
        assert!(!creds.holds(&group).unwrap(), "a removed login still holds");
    }
}
