//! Enrolment: what `pwsync-relay enroll`, `unenroll` and `revoke` do to the relay's files.
//!
//! - [`enroll`] gives a client (`agent NAME` or `consumer GROUP`) a login: a random token
//!   written only to `OUT/mqtt.pw` (mode 0600, never printed), its hash in the credentials
//!   file. For an agent it also files its public key in `agents_dir` or, with a scope, issues
//!   a certificate ([`certify`]) signed by the enrolment key.
//! - [`unenroll`] withdraws the login (the gateway closes its open sessions on its next re-read
//!   of the credentials) and an agent's key file.
//! - [`revoke`] appends an agent id or `serial:N` to the revocation list, checked first.

use crate::config::RelayConfig;
use crate::credentials::{self, Identity};
use anyhow::Context;
use pwsync_proto::certificate::AgentCertificate;
use pwsync_proto::{AgentId, SigningKey, VerifyingKey};
use std::path::{Path, PathBuf};

/// An hour of leeway for hosts whose clocks are a little behind the relay's.
const NOT_BEFORE_LEEWAY_MS: u64 = 3_600_000;

/// A certificate for `agent`'s `key`, for users matching `scope`, valid from an hour before
/// `now_ms` for `valid_days`, with `serial`; and its signed encoding.
pub fn certify(
    enrolment: &SigningKey,
    agent: &AgentId,
    key: &VerifyingKey,
    scope: &[String],
    valid_days: u64,
    now_ms: u64,
    serial: u64,
) -> anyhow::Result<(AgentCertificate, Vec<u8>)> {
    anyhow::ensure!(!scope.is_empty(), "a certificate needs a scope");
    let cert = AgentCertificate {
        agent: agent.clone(),
        key: key.spki_der(),
        scope: scope.to_vec(),
        serial,
        not_before_ms: now_ms.saturating_sub(NOT_BEFORE_LEEWAY_MS),
        not_after_ms: now_ms.saturating_add(valid_days.saturating_mul(86_400_000)),
    };
    let signed = cert.issue(enrolment)?;
    Ok((cert, signed))
}

/// What [`enroll`] asked for.
pub struct Enrolment<'a> {
    pub identity: &'a Identity,
    /// Where the token (and a certificate) go.
    pub out: &'a Path,
    /// An agent's public key file.
    pub public_key: Option<&'a Path>,
    /// Users the agent may speak for (a certificate); empty for a key-file agent.
    pub scope: &'a [String],
    pub valid_days: u64,
}

/// What [`enroll`] wrote.
pub struct Enrolled {
    pub token_file: PathBuf,
    pub key_file: Option<PathBuf>,
    pub certificate: Option<(AgentCertificate, PathBuf)>,
}

/// Enrols a client; see the module documentation.
pub fn enroll(cfg: &RelayConfig, e: &Enrolment<'_>) -> anyhow::Result<Enrolled> {
    let mut done = Enrolled {
        token_file: e.out.join("mqtt.pw"),
        key_file: None,
        certificate: None,
    };
    let agent_key = match (e.identity, e.public_key) {
        (Identity::Agent(id), Some(file)) => Some((
            id,
            VerifyingKey::load(file)
                .with_context(|| format!("the agent's public key {}", file.display()))?,
        )),
        (Identity::Consumer(_), Some(_)) => {
            anyhow::bail!("--public-key is for agents: a consumer group's key goes in [groups]")
        }
        _ => None,
    };
    std::fs::create_dir_all(e.out).with_context(|| format!("creating {}", e.out.display()))?;
    match (agent_key, e.scope.is_empty()) {
        (Some((id, key)), false) => {
            let Some(enrolment) = &cfg.keys.enrolment_key else {
                anyhow::bail!("--scope needs keys.enrolment_key in the relay config (pwsync-relay keygen --enrolment --out DIR makes one)");
            };
            let enrolment = SigningKey::load(enrolment)?;
            let mut serial = [0u8; 8];
            aws_lc_rs::rand::fill(&mut serial).map_err(|_| anyhow::anyhow!("no randomness"))?;
            let (cert, signed) = certify(
                &enrolment,
                id,
                &key,
                e.scope,
                e.valid_days,
                pwsync_proto::hlc::wall_ms(),
                u64::from_le_bytes(serial) >> 1,
            )?;
            let file = e.out.join("agent.cert");
            std::fs::write(&file, signed).with_context(|| format!("writing {}", file.display()))?;
            done.certificate = Some((cert, file));
        }
        (Some((id, key)), true) => {
            std::fs::create_dir_all(&cfg.keys.agents_dir)?;
            let file = cfg.keys.agents_dir.join(format!("{id}.pub"));
            key.save(&file)?;
            done.key_file = Some(file);
        }
        (None, false) => anyhow::bail!(
            "--scope certifies an agent: give `enroll agent NAME --public-key FILE --scope PATTERNS`"
        ),
        (None, true) => {}
    }
    let token = credentials::enroll(&cfg.broker.credentials, e.identity)?;
    crate::pki::write_private(&done.token_file, &format!("{}\n", token.as_str()))?;
    Ok(done)
}

/// Withdraws `identity`'s login and, for an agent, its key file. Returns whether it had a login
/// and which key file went.
pub fn unenroll(cfg: &RelayConfig, identity: &Identity) -> anyhow::Result<(bool, Option<PathBuf>)> {
    let mut removed_key = None;
    if let Identity::Agent(id) = identity {
        let key = cfg.keys.agents_dir.join(format!("{id}.pub"));
        if key.exists() {
            std::fs::remove_file(&key).with_context(|| format!("removing {}", key.display()))?;
            removed_key = Some(key);
        }
    }
    Ok((
        credentials::remove(&cfg.broker.credentials, identity)?,
        removed_key,
    ))
}

/// Appends `entry` (an agent id or `serial:N`) to the revocation list at `list`.
pub fn revoke(list: &Path, entry: &str) -> anyhow::Result<()> {
    let valid = match entry.strip_prefix("serial:") {
        Some(n) => n.parse::<u64>().is_ok(),
        None => AgentId::new(entry).is_ok(),
    };
    anyhow::ensure!(valid, "{entry:?} is neither an agent id nor serial:N");
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(list)
        .and_then(|mut f| writeln!(f, "{entry}"))
        .with_context(|| format!("appending to {}", list.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_binds_agent_key_and_scope_and_verifies_only_with_the_enrolment_key() {
        let enrolment = SigningKey::generate().unwrap();
        let agent_key = SigningKey::generate().unwrap().verifying_key();
        let id = AgentId::new("hr-portal").unwrap();
        let scope = vec!["emp-*".to_string()];
        let (cert, signed) =
            certify(&enrolment, &id, &agent_key, &scope, 30, 10 * 86_400_000, 42).unwrap();
        assert_eq!(
            cert.not_after_ms - cert.not_before_ms,
            30 * 86_400_000 + 3_600_000
        );
        let back: AgentCertificate =
            pwsync_proto::signed::verify(&signed, &enrolment.verifying_key()).unwrap();
        assert_eq!(back, cert);
        assert_eq!(back.verifying_key().unwrap(), agent_key);
        let other = SigningKey::generate().unwrap().verifying_key();
        assert!(pwsync_proto::signed::verify::<AgentCertificate>(&signed, &other).is_err());
        assert!(certify(&enrolment, &id, &agent_key, &[], 30, 0, 1).is_err());
    }

    #[test]
    fn enrol_and_unenrol_write_and_withdraw_exactly_the_clients_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("relay.toml"),
            "[broker]\nlisten = \"127.0.0.1:1\"\ninsecure_plaintext = true\n\n[keys]\nsigning_key = \"relay.key\"\nagents_dir = \"agents\"\n\n[journal]\ndir = \"journal\"\n",
        )
        .unwrap();
        let cfg = RelayConfig::load(&d.join("relay.toml")).unwrap();
        let key = SigningKey::generate().unwrap();
        key.verifying_key().save(&d.join("host-a.pub")).unwrap();
        let id = Identity::Agent(AgentId::new("host-a").unwrap());
        let out = d.join("out");
        let done = enroll(
            &cfg,
            &Enrolment {
                identity: &id,
                out: &out,
                public_key: Some(&d.join("host-a.pub")),
                scope: &[],
                valid_days: 30,
            },
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&done.token_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = std::fs::read_to_string(&done.token_file).unwrap();
        let logins = credentials::Credentials::open(&cfg.broker.credentials).unwrap();
        assert!(logins
            .usernames()
            .unwrap()
            .contains(&"agent:host-a".to_string()));
        assert!(!std::fs::read_to_string(&cfg.broker.credentials)
            .unwrap()
            .contains(token.trim()));
        assert_eq!(done.key_file, Some(d.join("agents/host-a.pub")));
        // A scope without an enrolment key is refused before anything is written.
        let scoped = Enrolment {
            identity: &id,
            out: &out,
            public_key: Some(&d.join("host-a.pub")),
            scope: &["emp-*".to_string()],
            valid_days: 30,
        };
        assert!(enroll(&cfg, &scoped).is_err());
        assert_eq!(
            unenroll(&cfg, &id).unwrap(),
            (true, Some(d.join("agents/host-a.pub")))
        );
        assert_eq!(unenroll(&cfg, &id).unwrap(), (false, None));
    }

    #[test]
    fn revoke_appends_only_agent_ids_and_serials() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("revoked.txt");
        revoke(&list, "host-a").unwrap();
        revoke(&list, "serial:77").unwrap();
        assert!(revoke(&list, "serial:x").is_err());
        assert!(revoke(&list, "bad\nid").is_err());
        assert_eq!(
            std::fs::read_to_string(&list).unwrap(),
            "host-a\nserial:77\n"
        );
    }
}
