//! The directory of enrolled agents: one `{agent id}.pub` file (Ed25519, PEM) per agent. The
//! relay checks every envelope's signature against it before journaling; consumers check it
//! again before decrypting. Adding an agent is adding a file and removing the file withdraws
//! it: keys are re-read at most [`RECHECK_AFTER`] after they were last read, so neither needs a
//! restart.
//!
//! [`AgentKeys`] is the one place that decides which key must have signed an envelope: the
//! agent certificate it carries, when the enrolment key is trusted, else this directory; and the
//! revocation list either way.

use crate::certificate::{AgentCertificate, CertificateError, RevocationList, Trust};
use crate::envelope::Envelope;
use crate::ids::AgentId;
use crate::keys::VerifyingKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a key read from its file is trusted before the file is read again.
pub const RECHECK_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct AgentDirectory {
    dir: PathBuf,
    known: Mutex<HashMap<AgentId, (VerifyingKey, Instant)>>,
    recheck_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentLookupError {
    #[error("agent {0} is not enrolled (no {0}.pub in the agents directory)")]
    NotEnrolled(AgentId),
    #[error("agent {agent}'s key file is unusable: {reason}")]
    BadKey { agent: AgentId, reason: String },
}

impl AgentDirectory {
    pub fn new(dir: &Path) -> Self {
        AgentDirectory {
            dir: dir.to_path_buf(),
            known: Mutex::new(HashMap::new()),
            recheck_after: RECHECK_AFTER,
        }
    }

    /// The same directory, re-reading key files after `recheck_after` instead of the default.
    pub fn with_recheck_after(mut self, recheck_after: Duration) -> Self {
        self.recheck_after = recheck_after;
        self
    }

    pub fn path_of(&self, agent: &AgentId) -> PathBuf {
        self.dir.join(format!("{agent}.pub"))
    }

    /// The agent's public key, read from its file the first time it is asked for (an agent not
    /// yet enrolled is looked for again on every call, so enrolling needs no restart).
    pub fn key(&self, agent: &AgentId) -> Result<VerifyingKey, AgentLookupError> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, read_at)) = known.get(agent) {
            if read_at.elapsed() < self.recheck_after {
                return Ok(key.clone());
            }
        }
        let path = self.path_of(agent);
        if !path.exists() {
            known.remove(agent);
            return Err(AgentLookupError::NotEnrolled(agent.clone()));
        }
        match VerifyingKey::load(&path) {
            Ok(key) => {
                known.insert(agent.clone(), (key.clone(), Instant::now()));
                Ok(key)
            }
            Err(e) => Err(AgentLookupError::BadKey {
                agent: agent.clone(),
                reason: e.to_string(),
            }),
        }
    }

    /// Enrolled agents, by file name.
    pub fn list(&self) -> std::io::Result<Vec<AgentId>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".pub")) {
                if let Ok(id) = AgentId::new(id) {
                    out.push(id);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// How a relay or consumer finds the key that must have signed an envelope: the certificate the
/// envelope carries, when an enrolment key is trusted, else the agent's key file; either way
/// refused when the revocation list names the agent (or the certificate's serial).
#[derive(Debug)]
pub struct AgentKeys {
    pub directory: AgentDirectory,
    trust: Option<Trust>,
    revoked: RevocationList,
}

/// Who may have signed an envelope: the key to verify it with and, for a certified agent, its
/// certificate (whose scope then says which users it may speak for).
#[derive(Debug)]
pub struct Speaker {
    pub key: VerifyingKey,
    pub certificate: Option<AgentCertificate>,
}

#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error(transparent)]
    NotEnrolled(#[from] AgentLookupError),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error("agent {0} is revoked")]
    Revoked(AgentId),
}

/// Why an envelope's speaker was refused, as relay and consumer count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No key file and no certificate for the agent (it may be enrolled later).
    UnknownAgent,
    /// The agent, or its certificate, is on the revocation list.
    Revoked,
    /// The certificate does not verify, has expired, or names another agent.
    BadCertificate,
}

impl Refusal {
    /// The counter it is counted under.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownAgent => "unknown_agent",
            Refusal::Revoked => "revoked",
            Refusal::BadCertificate => "bad_certificate",
        }
    }
}

impl SpeakerError {
    /// Why, as a [`Refusal`].
    pub fn refusal(&self) -> Refusal {
        match self {
            SpeakerError::NotEnrolled(_) => Refusal::UnknownAgent,
            SpeakerError::Revoked(_)
            | SpeakerError::Certificate(CertificateError::Revoked { .. }) => Refusal::Revoked,
            SpeakerError::Certificate(_) => Refusal::BadCertificate,
        }
    }
}

impl AgentKeys {
    pub fn new(
        directory: AgentDirectory,
        enrolment: Option<VerifyingKey>,
        revocation_list: Option<&Path>,
    ) -> AgentKeys {
        AgentKeys {
            directory,
            trust: enrolment.map(|enrolment| Trust { enrolment }),
            revoked: RevocationList::new(revocation_list),
        }
    }

    pub fn speaker(&self, env: &Envelope) -> Result<Speaker, SpeakerError> {
        let agent = env.agent();
        if let (Some(trust), Some(bytes)) = (&self.trust, env.certificate()) {
            let (cert, key) = trust.check(bytes, agent, crate::hlc::wall_ms(), &self.revoked)?;
            return Ok(Speaker {
                key,
                certificate: Some(cert),
            });
        }
        if self.revoked.is_revoked(agent, None) {
            return Err(SpeakerError::Revoked(agent.clone()));
        }
        Ok(Speaker {
            key: self.directory.key(agent)?,
            certificate: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::SigningKey;

    #[test]
    fn finds_enrolled_agents_and_names_the_missing() {
        let dir = tempfile::tempdir().unwrap();
        let d = AgentDirectory::new(dir.path());
        let a = AgentId::new("host1").unwrap();
        assert!(matches!(d.key(&a), Err(AgentLookupError::NotEnrolled(_))));
        let k = SigningKey::generate().unwrap();
        k.verifying_key().save(&d.path_of(&a)).unwrap();
        assert_eq!(d.key(&a).unwrap(), k.verifying_key());
        assert_eq!(d.list().unwrap(), vec![a.clone()]);
        // Removing the file withdraws the agent once the recheck time has passed.
        let d = d.with_recheck_after(Duration::ZERO);
        std::fs::remove_file(d.path_of(&a)).unwrap();
        assert!(matches!(d.key(&a), Err(AgentLookupError::NotEnrolled(_))));
    }
}
