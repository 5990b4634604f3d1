//! `agent.toml`: every key the agent reads, with its default. `deploy/agent.toml` is the
//! commented example; `pwsync-agent check --config FILE` validates one.

use pwsync_proto::AgentId;
use pwsync_runtime::transport::TransportConfig;
use pwsync_runtime::{load_toml, resolve, ConfigError};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub use crate::scope::ScopeConfig;
pub use crate::sources::ldapsock::{LdapSockConfig, SockMode};
pub use crate::sources::samba::SambaConfig;

pub const DEFAULT_PATH: &str = "/etc/pwsync/agent.toml";

/// What the agent answers when it cannot make a change durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Reject: the source system refuses the password change, nothing is half-synced.
    #[default]
    Strict,
    /// Accept and log the failure loudly: the source system goes ahead alone.
    Lenient,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name: its topics, its enrolment, its key.
    pub agent_id: AgentId,
    /// The system changes captured here come from (default: the agent id). A consumer never
    /// writes a change back to the target with this system name.
    #[serde(default)]
    pub origin: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    pub keys: KeysConfig,
    pub socket: SocketConfig,
    pub spool: SpoolConfig,
    #[serde(default)]
    pub scope: ScopeConfig,
    pub relay: RelayConfig,
    /// TLS and login for the relay's MQTT listener. Required: see [`TransportConfig`].
    #[serde(default)]
    pub transport: Option<TransportConfig>,
    /// `/metrics` and `/healthz`; off unless `listen` is set.
    #[serde(default)]
    pub metrics: pwsync_runtime::observe::MetricsConfig,
    /// Capture on a Samba AD domain controller (`pwsync-agent samba-sync`); see
    /// `deploy/samba/README.md`.
    #[serde(default)]
    pub samba: Option<SambaConfig>,
    #[serde(default)]
    pub ldap_sock: Option<LdapSockConfig>,
    /// The consumer groups whose password policies are enforced at capture (`crate::policy`).
    #[serde(default)]
    pub policy: Option<crate::policy::PolicyConfig>,
    /// At most one backfill (a password seen at a login) per user within this many seconds.
    /// Default 3600.
    #[serde(default = "default_backfill_interval")]
    pub backfill_interval_secs: u64,
}

fn default_backfill_interval() -> u64 {
    crate::backfill::DEFAULT_INTERVAL_SECS
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// This agent's Ed25519 private key (mode 0600).
    pub signing_key: PathBuf,
    /// The consumers' RSA public key the agent encrypts for.
    pub consumer_public_key: PathBuf,
    /// The relay's Ed25519 public key: acks are verified with it.
    pub relay_public_key: PathBuf,
    /// This agent's certificate (`pwsync-relay enroll agent NAME --scope ...`), attached to every
    /// envelope: consumers that trust the enrolment key then need no key file for this agent.
    #[serde(default)]
    pub certificate: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketConfig {
    pub path: PathBuf,
    /// File mode of the socket (default 0o660).
    #[serde(default = "default_socket_mode")]
    pub mode: u32,
    /// A group whose members may submit (besides root and the agent's own user).
    #[serde(default)]
    pub group: Option<String>,
    /// Users whose submits may say the source has set the password already
    /// (`pwsync.committed`), so the password policy does not refuse them: the service users of
    /// sources that commit before they submit (root and the agent's own user always may). From
    /// anyone else the mark is ignored and logged. Default: none.
    #[serde(default)]
    pub committers: Vec<String>,
}

fn default_socket_mode() -> u32 {
    0o660
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Capacity in bytes; when full, new changes are rejected (strict) and old ones kept.
    #[serde(default = "default_spool_bytes")]
    pub max_bytes: u64,
}

fn default_spool_bytes() -> u64 {
    256 * 1024 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// The relay, or (`endpoints`) several relays sharing one journal, tried in order
    /// ([`pwsync_runtime::failover`]).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// MQTT client id (default `pwsync-agent-{agent_id}`); must be stable across restarts.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Envelopes published and not yet acked by the relay, at most.
    #[serde(default = "default_window")]
    pub window: u16,
    /// Seconds without an ack before unacked envelopes are sent again.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// Longest wait between reconnect attempts, in seconds.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
}

fn default_window() -> u16 {
    1024
}
fn default_ack_timeout() -> u64 {
    10
}
fn default_reconnect_max() -> u64 {
    30
}

impl RelayConfig {
    /// The relays to try, in order (checked by [`AgentConfig::load`]).
    pub fn endpoints(&self) -> Result<Vec<(String, u16)>, String> {
        pwsync_runtime::failover::endpoints(self.host.as_deref(), self.port, &self.endpoints)
    }
}

impl AgentConfig {
    /// What an agent that checks no password against any consumer group's policy is told, at
    /// `check` and at start-up: such an agent lets a source set a password some target cannot
    /// hold. `None` when `[policy]` names at least one group.
    pub fn policy_warning(&self) -> Option<String> {
        if self.policy.as_ref().is_some_and(|p| !p.groups.is_empty()) {
            return None;
        }
        Some(
            "no [policy] groups: passwords are not checked against any consumer group's policy \
             where they are typed (PAM's check line, ldap-sock, submit), so a password some \
             target cannot hold is set at the source and then refused at that target, and the \
             person has two passwords; add [policy] groups = { GROUP = \"PATH/TO/group.pub\" } \
             (each consumer group's group_signing_key's .pub; see the example agent.toml)"
                .into(),
        )
    }

    /// Loads and checks a config file; relative paths are made relative to its folder.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut c: AgentConfig = load_toml(path)?;
        for p in [
            &mut c.keys.signing_key,
            &mut c.keys.consumer_public_key,
            &mut c.keys.relay_public_key,
            &mut c.socket.path,
            &mut c.spool.dir,
        ] {
            *p = resolve(path, p);
        }
        if let Some(p) = c.keys.certificate.as_mut() {
            *p = resolve(path, p);
        }
        if let Some(s) = c.ldap_sock.as_mut() {
            s.socket = resolve(path, &s.socket);
            s.state_dir = resolve(path, &s.state_dir);
        }
        if let Some(p) = c.policy.as_mut() {
            for key in p.groups.values_mut() {
                *key = resolve(path, key);
            }
        }
        if let Some(s) = c.samba.as_mut() {
            s.smb_conf = resolve(path, &s.smb_conf);
            s.state_dir = resolve(path, &s.state_dir);
            if let Some(g) = s.gnupg_home.as_mut() {
                *g = resolve(path, g);
            }
        }
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        match c.transport.as_mut() {
            Some(t) => t.resolve_paths(path),
            None => return Err(invalid("no [transport] section: give the relay's CA (ca_file) and this agent's login (username, password_file) from `pwsync-relay enroll agent NAME`".into())),
        }
        c.relay
            .endpoints()
            .map_err(|e| invalid(format!("[relay] {e}")))?;
        if c.relay.window == 0 {
            return Err(invalid("relay.window must be at least 1".into()));
        }
        if c.socket.mode > 0o777 {
            return Err(invalid(format!(
                "socket.mode {:o} is not a file mode",
                c.socket.mode
            )));
        }
        crate::scope::Scope::new(&c.scope).map_err(invalid)?;
        if let Some(s) = &c.ldap_sock {
            crate::sources::ldapsock::UserNaming::new(s).map_err(invalid)?;
            if s.settle_secs < 2 {
                return Err(invalid(format!(
                    "[ldap_sock] settle_secs = {} is too short: a change slapd is still applying would be judged not applied; give 2 or more (default 10)",
                    s.settle_secs
                )));
            }
        }
        Ok(c)
    }

    /// The `[transport]` section (present: `load` refuses a config without it).
    pub fn transport(&self) -> TransportConfig {
        self.transport.clone().unwrap_or_default()
    }

    pub fn origin(&self) -> String {
        self.origin
            .clone()
            .unwrap_or_else(|| self.agent_id.to_string())
    }

    pub fn client_id(&self) -> String {
        self.relay
            .client_id
            .clone()
            .unwrap_or_else(|| format!("pwsync-agent-{}", self.agent_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_example_is_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let c = AgentConfig::load(&path).unwrap();
        assert_eq!(c.agent_id.as_str(), "host1.example.org");
        assert_eq!(c.socket.mode, 0o660);
        assert_eq!(c.mode, Mode::Strict);
    }

    /// The example with the commented `# [section]` block uncommented (its `# #` lines stay
    /// comments), loaded.
    fn example_with(section: &str) -> AgentConfig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml"),
        )
        .unwrap();
        let marker = format!("# [{section}]\n");
        let (head, rest) = example.split_once(&marker).unwrap();
        let block: String = rest
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #"))
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        std::fs::write(&path, format!("{head}[{section}]\n{block}")).unwrap();
        AgentConfig::load(&path).unwrap()
    }

    #[test]
    fn the_deploy_example_enforces_a_policy_and_an_agent_without_one_is_warned() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let mut c = AgentConfig::load(&path).unwrap();
        let p = c.policy.clone().unwrap();
        assert_eq!(p.groups.len(), 1);
        assert_eq!(p.max_age_secs, 86_400);
        assert_eq!(p.undeniable, ["root", "breakglass-*"]);
        assert_eq!(c.policy_warning(), None);
        c.policy = None;
        let said = c.policy_warning().unwrap();
        assert!(said.contains("[policy] groups"), "{said}");
        c.policy = Some(crate::policy::PolicyConfig {
            groups: Default::default(),
            ..p
        });
        assert!(c.policy_warning().is_some());
    }

    #[test]
    fn the_deploy_examples_samba_section_is_valid_uncommented() {
        let s = example_with("samba").samba.unwrap();
        assert_eq!(s.state_dir, Path::new("/var/lib/pwsync/samba"));
        assert_eq!(s.smb_conf, Path::new("/etc/samba/smb.conf"));
        assert!(s.gnupg_home.is_some());
    }

    #[test]
    fn the_deploy_examples_ldap_sock_section_is_valid_uncommented() {
        let s = example_with("ldap_sock").ldap_sock.unwrap();
        assert_eq!(s.socket, Path::new("/run/pwsync/slapd-sock"));
        assert_eq!(s.mode, SockMode::Strict);
        assert_eq!(s.socket_mode, 0o660);
        assert_eq!(s.ignore_bind_dns.len(), 1);
    }

    #[test]
    fn unknown_keys_are_refused_with_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml"),
        )
        .unwrap();
        std::fs::write(&path, example.replace("[spool]", "[spool]\nmax_bytez = 1")).unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("agent.toml") && err.contains("max_bytez"),
            "{err}"
        );
    }
}
