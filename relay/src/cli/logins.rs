//! Keys, logins and the agents' table: `keygen`, `enroll`, `revoke`, `unenroll`, `agents`.
//! Tokens go to files (mode 0600), never to the terminal.

use super::load;
use crate::credentials::{Credentials, Identity};
use crate::enrol;
use anyhow::Context;
use clap::Subcommand;
use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::{AgentId, GroupName, SigningKey};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand, Clone)]
pub enum Who {
    /// An agent, by its agent id.
    Agent { name: String },
    /// A consumer group, by its group name.
    Consumer { group: String },
}

impl Who {
    pub fn identity(&self) -> anyhow::Result<Identity> {
        Ok(match self {
            Who::Agent { name } => Identity::Agent(
                AgentId::new(name.as_str())
                    .map_err(|e| anyhow::anyhow!("agent id {name:?}: {e}"))?,
            ),
            Who::Consumer { group } => Identity::Consumer(
                GroupName::new(group.as_str())
                    .map_err(|e| anyhow::anyhow!("group name {group:?}: {e}"))?,
            ),
        })
    }
}

/// What `enroll` was given.
pub struct EnrollArgs {
    pub who: Who,
    pub out: Option<PathBuf>,
    pub public_key: Option<PathBuf>,
    pub scope: Vec<String>,
    pub valid_days: u64,
    pub keygen: bool,
}

/// Gives a client its MQTT login (and an agent its certificate or key).
pub fn enroll(config: &Path, args: EnrollArgs) -> anyhow::Result<ExitCode> {
    let EnrollArgs {
        who,
        out,
        public_key,
        scope,
        valid_days,
        keygen,
    } = args;
    let cfg = load(config)?;
    let identity = who.identity()?;
    let Some(out) = out else {
        anyhow::bail!(
            "give --out DIR: the token is written to DIR/mqtt.pw (mode 0600), never printed"
        );
    };
    let public_key = match (keygen, &identity) {
        (false, _) => public_key,
        (true, Identity::Agent(_)) => {
            pwsync_runtime::private_dir(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            let key = SigningKey::generate()?;
            key.save(&out.join("agent.key"))?;
            key.verifying_key().save(&out.join("agent.pub"))?;
            println!(
                "wrote {0}/agent.key (private, 0600: move it to the agent host, keys.signing_key) and {0}/agent.pub (key id {1})",
                out.display(),
                key.verifying_key().key_id().to_hex()
            );
            Some(out.join("agent.pub"))
        }
        (true, _) => anyhow::bail!("--keygen makes an agent's key pair; a consumer group makes its keys with `pwsync-consumer keygen`"),
    };
    let done = enrol::enroll(
        &cfg,
        &enrol::Enrolment {
            identity: &identity,
            out: &out,
            public_key: public_key.as_deref(),
            scope: &scope,
            valid_days,
        },
    )?;
    if let Some((cert, file)) = &done.certificate {
        println!(
            "certified {} (serial {}, scope {}, valid {valid_days} days) in {}; set keys.certificate to it in the agent's config",
            cert.agent,
            cert.serial,
            cert.scope.join(","),
            file.display()
        );
    }
    let pw = done.token_file;
    println!(
        "enrolled {identity}; its token is in {} (mode 0600; move it to the client).\nThe client's config:\n\n[transport]\nusername = \"{identity}\"\npassword_file = \"{}\"\n{}",
        pw.display(),
        pw.display(),
        match (&cfg.broker.insecure_plaintext, &cfg.broker.tls_cert) {
            (true, _) => "insecure_plaintext = true\n".to_string(),
            (false, Some(cert)) => match cert.with_file_name("ca.pem") {
                ca if ca.exists() => format!("# copy {0} to the client\nca_file = \"{0}\"\n", ca.display()),
                _ => format!("# the CA (PEM) that signed {}\nca_file = \"/etc/pwsync/tls/ca.pem\"\n", cert.display()),
            },
            (false, None) => String::new(),
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Withdraws an agent or one certificate in `keys.revocation_list`.
pub fn revoke(config: &Path, entry: &str) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let Some(list) = &cfg.keys.revocation_list else {
        anyhow::bail!("keys.revocation_list is not set in the relay config");
    };
    enrol::revoke(list, entry)?;
    println!(
        "{entry} revoked in {}; copy it to every consumer's keys.revocation_list",
        list.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Withdraws a client's login (and an agent's key).
pub fn unenroll(config: &Path, who: &Who) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let identity = who.identity()?;
    let (had_login, key) = enrol::unenroll(&cfg, &identity)?;
    if let Some(key) = key {
        println!(
            "removed {}: the relay journals nothing more from {identity}",
            key.display()
        );
    }
    if had_login {
        println!("{identity} can no longer log in");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{identity} was not enrolled");
        Ok(ExitCode::FAILURE)
    }
}

/// Every agent enrolled or seen, and when.
pub fn agents(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let mut enrolled: Vec<String> = AgentDirectory::new(&cfg.keys.agents_dir)
        .list()
        .with_context(|| format!("reading {}", cfg.keys.agents_dir.display()))?
        .iter()
        .map(|a| a.to_string())
        .collect();
    if let Ok(c) = Credentials::open(&cfg.broker.credentials) {
        enrolled.extend(
            c.usernames()?
                .iter()
                .filter_map(|u| u.strip_prefix("agent:").map(String::from)),
        );
    }
    print!(
        "{}",
        crate::liveness::table(&enrolled, &cfg.journal.dir.join(crate::liveness::FILE))
    );
    Ok(ExitCode::SUCCESS)
}

/// The relay's (or the enrolment) signing key pair in `out`.
pub fn keygen(out: &Path, enrolment: bool) -> anyhow::Result<ExitCode> {
    let (name, goes_to) = if enrolment {
        ("enrolment", "every consumer (keys.enrolment_public_key); enrolment.key is the relay's keys.enrolment_key")
    } else {
        ("relay", "every agent and consumer (keys.relay_public_key)")
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key = SigningKey::generate()?;
    key.save(&out.join(format!("{name}.key")))?;
    key.verifying_key().save(&out.join(format!("{name}.pub")))?;
    println!(
        "wrote {0}/{name}.key (private, 0600) and {0}/{name}.pub\nGive {name}.pub to {goes_to}.",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
