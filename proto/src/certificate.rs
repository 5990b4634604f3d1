//! Agent certificates: the organisation's enrolment key vouching that an agent id, with one
//! Ed25519 signing key, may speak for the users its scope matches, for a time.
//!
//! A certificate travels inside every envelope its agent seals (the header's `certificate`), so
//! a relay or consumer that trusts the enrolment public key knows a new host the moment its
//! first change arrives: adding a host changes nothing on any consumer. Envelopes spooled or
//! journaled before a key rotation carry the old certificate and stay valid until it expires
//! (the overlap is the certificate's validity). Withdrawing an agent is one line in a
//! [`RevocationList`]: its id, or `serial:N` for one certificate.
//!
//! Order of checks wherever an envelope is opened ([`crate::agents::AgentKeys`]): the
//! certificate's signature, its agent and validity, the revocation list, then the envelope's
//! signature with the certified key, then (after decryption, since the user is encrypted) the
//! certified scope.

use crate::error::{DecodeError, OpenError};
use crate::ids::AgentId;
use crate::keys::{SigningKey, VerifyingKey};
use crate::reloaded::ReloadedFile;
use crate::signed::{self, SignedMessage};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

/// The largest encoded certificate an envelope may carry.
pub const MAX_CERTIFICATE_BYTES: usize = 1024;
const MAX_SCOPE_PATTERNS: usize = 32;
const MAX_PATTERN_BYTES: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentCertificate {
    pub agent: AgentId,
    /// The agent's Ed25519 public key (SubjectPublicKeyInfo DER).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// Glob patterns of the users this agent may speak for.
    pub scope: Vec<String>,
    pub serial: u64,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl SignedMessage for AgentCertificate {
    const KIND: u8 = 4;
    const NAME: &'static str = "agent certificate";
    fn validate(&self) -> Result<(), DecodeError> {
        let invalid = |reason: &str| DecodeError::Invalid {
            what: "agent certificate",
            reason: reason.into(),
        };
        if self.scope.is_empty() || self.scope.len() > MAX_SCOPE_PATTERNS {
            return Err(invalid("scope must hold 1 to 32 patterns"));
        }
        if self
            .scope
            .iter()
            .any(|p| p.is_empty() || p.len() > MAX_PATTERN_BYTES)
        {
            return Err(invalid("a scope pattern is empty or too long"));
        }
        if self.key.len() > 128 || self.not_after_ms < self.not_before_ms {
            return Err(invalid("impossible key or validity"));
        }
        Ok(())
    }
}

impl AgentCertificate {
    /// Signs the certificate with the enrolment key; the bytes an agent's config points to.
    pub fn issue(&self, enrolment: &SigningKey) -> Result<Vec<u8>, DecodeError> {
        self.validate()?;
        let bytes = signed::sign(self, enrolment)?;
        if bytes.len() > MAX_CERTIFICATE_BYTES {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max: MAX_CERTIFICATE_BYTES,
            });
        }
        Ok(bytes)
    }

    pub fn verifying_key(&self) -> Result<VerifyingKey, String> {
        VerifyingKey::from_spki_der(&self.key)
    }
}

/// Why a certificate is not accepted.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("the certificate is not signed by the enrolment key, or is damaged: {0}")]
    NotVouched(OpenError),
    #[error("the certificate is for agent {certified}, not {claimed}")]
    WrongAgent {
        certified: AgentId,
        claimed: AgentId,
    },
    #[error(
        "certificate {serial} of {agent} is not valid now (valid {from} to {until}, ms since 1970)"
    )]
    OutOfValidity {
        agent: AgentId,
        serial: u64,
        from: u64,
        until: u64,
    },
    #[error("agent {agent} (certificate {serial}) is revoked")]
    Revoked { agent: AgentId, serial: u64 },
    #[error("the certified key is unusable: {0}")]
    BadKey(String),
}

/// The agents and certificates withdrawn: a text file, one entry a line (an agent id, or
/// `serial:N`), `#` comments. Re-read when it changes; a missing file revokes nothing; a file
/// that is there but cannot be read (permissions, not UTF-8, a folder) fails closed: every
/// agent counts as revoked until it can be read, and an error says why.
pub struct RevocationList {
    file: Option<ReloadedFile<HashSet<String>>>,
}

impl std::fmt::Debug for RevocationList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationList")
            .field("path", &self.file.as_ref().map(|r| r.path()))
            .finish()
    }
}

impl RevocationList {
    pub fn new(path: Option<&Path>) -> RevocationList {
        RevocationList {
            file: path.map(ReloadedFile::new),
        }
    }

    fn parse(path: &Path) -> Result<HashSet<String>, std::io::Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    /// Whether `agent` (or its certificate `serial`) is withdrawn.
    pub fn is_revoked(&self, agent: &AgentId, serial: Option<u64>) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        let entries = match file.get(Self::parse) {
            Ok(entries) => entries,
            Err(e) => {
                static LAST_SAID_S: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(0);
                let now_s = crate::hlc::wall_ms() / 1000;
                if LAST_SAID_S.swap(now_s, std::sync::atomic::Ordering::Relaxed) + 10 <= now_s {
                    tracing::error!(path = %file.path().display(), error = %e, "the revocation list cannot be read: every agent counts as revoked until it can (fix its permissions or contents)");
                }
                return true;
            }
        };
        entries.contains(agent.as_str())
            || serial.is_some_and(|s| entries.contains(&format!("serial:{s}")))
    }
}

/// What a relay or consumer trusts certificates with.
#[derive(Debug)]
pub struct Trust {
    pub enrolment: VerifyingKey,
}

impl Trust {
    /// Checks a certificate carried by an envelope of `claimed` at time `now_ms`.
    pub fn check(
        &self,
        bytes: &[u8],
        claimed: &AgentId,
        now_ms: u64,
        revoked: &RevocationList,
    ) -> Result<(AgentCertificate, VerifyingKey), CertificateError> {
        let cert: AgentCertificate =
            signed::verify(bytes, &self.enrolment).map_err(CertificateError::NotVouched)?;
        if &cert.agent != claimed {
            return Err(CertificateError::WrongAgent {
                certified: cert.agent,
                claimed: claimed.clone(),
            });
        }
        if now_ms < cert.not_before_ms || now_ms > cert.not_after_ms {
            return Err(CertificateError::OutOfValidity {
                agent: cert.agent.clone(),
                serial: cert.serial,
                from: cert.not_before_ms,
                until: cert.not_after_ms,
            });
        }
        if revoked.is_revoked(&cert.agent, Some(cert.serial)) {
            return Err(CertificateError::Revoked {
                agent: cert.agent.clone(),
                serial: cert.serial,
            });
        }
        let key = cert.verifying_key().map_err(CertificateError::BadKey)?;
        Ok((cert, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_revocation_list_fails_closed_and_a_missing_one_revokes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let agent = AgentId::new("host-a").unwrap();
        let missing = RevocationList::new(Some(&dir.path().join("none")));
        assert!(!missing.is_revoked(&agent, Some(1)));
        // A folder where the file should be cannot be read as one.
        std::fs::create_dir(dir.path().join("revoked")).unwrap();
        let unreadable = RevocationList::new(Some(&dir.path().join("revoked")));
        assert!(unreadable.is_revoked(&agent, Some(1)));
        std::fs::write(dir.path().join("bad"), b"\xff\xfe").unwrap();
        assert!(RevocationList::new(Some(&dir.path().join("bad"))).is_revoked(&agent, None));
        std::fs::write(dir.path().join("ok"), "other # comment\n").unwrap();
        assert!(!RevocationList::new(Some(&dir.path().join("ok"))).is_revoked(&agent, None));
    }

    fn cert(agent: &str, key: &SigningKey) -> AgentCertificate {
        AgentCertificate {
            agent: AgentId::new(agent).unwrap(),
            key: key.verifying_key().spki_der(),
            scope: vec!["emp-*".into()],
            serial: 7,
            not_before_ms: 1_000,
            not_after_ms: 2_000,
        }
    }

    #[test]
    fn a_certificate_is_accepted_only_as_issued_for_its_agent_in_time_and_unrevoked() {
        let dir = tempfile::tempdir().unwrap();
        let (org, agent_key) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let trust = Trust {
            enrolment: org.verifying_key(),
        };
        let list_path = dir.path().join("revoked");
        let revoked = RevocationList::new(Some(&list_path));
        let a = AgentId::new("host-a").unwrap();
        let bytes = cert("host-a", &agent_key).issue(&org).unwrap();
        let (c, key) = trust.check(&bytes, &a, 1_500, &revoked).unwrap();
        assert_eq!((c.serial, key), (7, agent_key.verifying_key()));
        let b = AgentId::new("host-b").unwrap();
        assert!(matches!(
            trust.check(&bytes, &b, 1_500, &revoked),
            Err(CertificateError::WrongAgent { .. })
        ));
        assert!(matches!(
            trust.check(&bytes, &a, 2_001, &revoked),
            Err(CertificateError::OutOfValidity { .. })
        ));
        let forged = cert("host-a", &agent_key)
            .issue(&SigningKey::generate().unwrap())
            .unwrap();
        assert!(matches!(
            trust.check(&forged, &a, 1_500, &revoked),
            Err(CertificateError::NotVouched(_))
        ));
        std::fs::write(&list_path, "# withdrawn\nserial:7\n").unwrap();
        assert!(matches!(
            trust.check(&bytes, &a, 1_500, &revoked),
            Err(CertificateError::Revoked { .. })
        ));
        std::fs::write(&list_path, "host-a  # the whole agent\n").unwrap();
        assert!(revoked.is_revoked(&a, None));
        assert!(!revoked.is_revoked(&b, None));
    }
}
