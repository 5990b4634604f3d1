//! `consumer.toml`: every key the consumer reads, with its default. `deploy/consumer.toml` is
//! the commented example; `pwsync-consumer check --config FILE` validates one.

use pwsync_proto::GroupName;
use pwsync_runtime::transport::TransportConfig;
use pwsync_runtime::{load_toml, resolve, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/pwsync/consumer.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The consumer group this consumer belongs to (its cursor at the relay).
    pub group: GroupName,
    pub keys: KeysConfig,
    pub broker: BrokerConfig,
    /// TLS and login for the relay's MQTT listener. Required: see [`TransportConfig`].
    #[serde(default)]
    pub transport: Option<TransportConfig>,
    /// `/metrics` and `/healthz`. Default `127.0.0.1:9465`.
    #[serde(default = "default_metrics")]
    pub metrics: pwsync_runtime::observe::MetricsConfig,
    pub state: StateConfig,
    /// Which users each agent may speak for (shell patterns), by agent id. An agent not listed
    /// gets `default_agent_scope`.
    #[serde(default)]
    pub agent_scope: BTreeMap<String, Vec<String>>,
    #[serde(default = "all")]
    pub default_agent_scope: Vec<String>,
    #[serde(default)]
    pub retry: RetryConfig,
    /// `[targets.NAME]` sections; see `targets::build`.
    #[serde(default)]
    pub targets: BTreeMap<String, toml::Table>,
    /// The organisation's password rules, published with the targets' own (`crate::policy`).
    #[serde(default)]
    pub policy: crate::policy::PolicyConfig,
    /// The account audit on a timer (`crate::audit`).
    #[serde(default)]
    pub audit: AuditConfig,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// How often the running consumer audits every account, in seconds (0: only when asked,
    /// by `pwsync-consumer audit`). Default 86400 (daily).
    #[serde(default = "default_audit_every")]
    pub every_secs: u64,
    /// At most this many accounts read a second, all targets together: the load an audit puts
    /// on the targets. Default 20.
    #[serde(default = "default_audit_rate")]
    pub reads_per_sec: u32,
}

fn default_audit_every() -> u64 {
    86_400
}
fn default_audit_rate() -> u32 {
    20
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            every_secs: default_audit_every(),
            reads_per_sec: default_audit_rate(),
        }
    }
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// RSA private keys (mode 0600); several while a key is being rotated.
    pub decryption_keys: Vec<PathBuf>,
    /// The group's Ed25519 private key (mode 0600): commits are signed with it.
    pub group_signing_key: PathBuf,
    /// The relay's Ed25519 public key: deliveries are verified with it.
    pub relay_public_key: PathBuf,
    /// Enrolled agents' public keys, one `{agent id}.pub` each.
    pub agents_dir: PathBuf,
    /// The organisation's enrolment public key: an envelope carrying an agent certificate it
    /// signed needs no key file here, and the certificate's scope replaces `[agent_scope]`.
    #[serde(default)]
    pub enrolment_public_key: Option<PathBuf>,
    /// Withdrawn agents and certificates, one a line (`NAME` or `serial:N`); re-read on change.
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// The relay, or (`endpoints`) several relays sharing one journal, tried in order
    /// ([`pwsync_runtime::failover`]).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Default `pwsync-consumer-{group}`; stable across restarts.
    #[serde(default)]
    pub client_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The consumer's state folder: cursor, dedupe, per-user order, retry queues, dead letters.
    pub dir: PathBuf,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First retry delay, in milliseconds (doubles per attempt, with jitter). Default 1000.
    #[serde(default = "default_base_ms")]
    pub base_ms: u64,
    /// Longest retry delay, in seconds. Default 300.
    #[serde(default = "default_max_secs")]
    pub max_secs: u64,
    /// How long a change for an account that does not exist yet keeps being retried before it
    /// becomes a dead letter, in seconds. Default 3600.
    #[serde(default = "default_no_such_user")]
    pub no_such_user_secs: u64,
}

fn default_base_ms() -> u64 {
    1000
}
fn default_max_secs() -> u64 {
    300
}
fn default_no_such_user() -> u64 {
    3600
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            base_ms: default_base_ms(),
            max_secs: default_max_secs(),
            no_such_user_secs: default_no_such_user(),
        }
    }
}

fn default_metrics() -> pwsync_runtime::observe::MetricsConfig {
    pwsync_runtime::observe::MetricsConfig {
        listen: Some(([127, 0, 0, 1], 9465).into()),
    }
}

impl ConsumerConfig {
    pub fn load(path: &Path) -> Result<ConsumerConfig, ConfigError> {
        let mut c: ConsumerConfig = load_toml(path)?;
        for k in &mut c.keys.decryption_keys {
            *k = resolve(path, k);
        }
        c.keys.group_signing_key = resolve(path, &c.keys.group_signing_key);
        c.keys.relay_public_key = resolve(path, &c.keys.relay_public_key);
        c.keys.agents_dir = resolve(path, &c.keys.agents_dir);
        for p in [
            &mut c.keys.enrolment_public_key,
            &mut c.keys.revocation_list,
        ]
        .into_iter()
        .flatten()
        {
            *p = resolve(path, p);
        }
        c.state.dir = resolve(path, &c.state.dir);
        if let Some(p) = c.policy.forbidden_list.as_mut() {
            *p = resolve(path, p);
        }
        match c.transport.as_mut() {
            Some(t) => t.resolve_paths(path),
            None => return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "no [transport] section: give the relay's CA (ca_file) and this group's login (username, password_file) from `pwsync-relay enroll consumer GROUP`".into(),
            }),
        }
        if let Err(e) = c.endpoints() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: format!("[broker] {e}"),
            });
        }
        if c.keys.decryption_keys.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                message: "keys.decryption_keys is empty: the consumer could open nothing".into(),
            });
        }
        Ok(c)
    }

    /// The `[transport]` section (present: `load` refuses a config without it).
    pub fn transport(&self) -> TransportConfig {
        self.transport.clone().unwrap_or_default()
    }

    /// The relays to try, in order (checked by [`ConsumerConfig::load`]).
    pub fn endpoints(&self) -> Result<Vec<(String, u16)>, String> {
        pwsync_runtime::failover::endpoints(
            self.broker.host.as_deref(),
            self.broker.port,
            &self.broker.endpoints,
        )
    }

    pub fn client_id(&self) -> String {
        self.broker
            .client_id
            .clone()
            .unwrap_or_else(|| format!("pwsync-consumer-{}", self.group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/consumer.toml")
    }

    #[test]
    fn the_deploy_example_is_a_valid_config() {
        let path = example();
        let c = ConsumerConfig::load(&path).unwrap();
        assert_eq!(c.agent_scope["hr-portal"], vec!["emp-*".to_string()]);
        // The LDAP, AD, Kerberos and PostgreSQL targets read their password files when built; the example's
        // paths do not exist here, so build the others, then check each error names its file.
        let mut offline = ConsumerConfig::load(&path).unwrap();
        let online = [
            ("directory", "ldap-bind.pw"),
            ("active-directory", "ad-bind.pw"),
            ("realm", "kadmin.keytab"),
            ("app-db", "pg.pw"),
        ];
        for (name, _) in online {
            offline.targets.remove(name);
        }
        assert_eq!(crate::build_targets(&offline, &path).unwrap().len(), 3);
        for (name, file) in online {
            let mut one = ConsumerConfig::load(&path).unwrap();
            one.targets.retain(|k, _| k == name);
            let err = crate::build_targets(&one, &path).err().unwrap().to_string();
            assert!(
                err.contains(&format!("[targets.{name}]")) && err.contains(file),
                "{err}"
            );
        }
    }

    #[test]
    fn an_unknown_key_in_a_target_section_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("consumer.toml");
        let text = std::fs::read_to_string(example()).unwrap();
        std::fs::write(&path, text.replace("cost = 10\n", "cost = 10\ncots = 3\n")).unwrap();
        let mut c = ConsumerConfig::load(&path).unwrap();
        c.targets.retain(|k, _| k == "intranet");
        let err = crate::build_targets(&c, &path).err().unwrap().to_string();
        assert!(err.contains("cots") && err.contains("intranet"), "{err}");
    }
}
