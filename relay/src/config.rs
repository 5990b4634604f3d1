//! `relay.toml`: every key the relay reads, with its default. `deploy/relay.toml` is the
//! commented example; `pwsync-relay check --config FILE` validates one.

use pwsync_proto::GroupName;
use pwsync_runtime::transport::TransportConfig;
use pwsync_runtime::{load_toml, resolve, ConfigError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/pwsync/relay.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    pub broker: BrokerConfig,
    pub keys: KeysConfig,
    pub journal: JournalConfig,
    /// Consumer groups, by name. A group not declared here gets nothing.
    #[serde(default)]
    pub groups: BTreeMap<GroupName, GroupConfig>,
    /// How the relay reaches an external broker (`[broker] host`); unused with `listen`.
    #[serde(default)]
    pub transport: Option<TransportConfig>,
    /// `/metrics` and `/healthz`. Default `127.0.0.1:9464`.
    #[serde(default = "default_metrics")]
    pub metrics: pwsync_runtime::observe::MetricsConfig,
}

fn default_metrics() -> pwsync_runtime::observe::MetricsConfig {
    pwsync_runtime::observe::MetricsConfig {
        listen: Some(([127, 0, 0, 1], 9464).into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Run rumqttd inside the relay, listening here (MQTT 3.1.1). Leave out to use an external
    /// broker at `host`/`port` instead.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// External broker host (when `listen` is not set), and the address the relay's own client
    /// connects to.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    /// MQTT client id of the relay (stable across restarts).
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Embedded broker: bytes per in-memory segment and segments per topic. The journal, not
    /// the broker, is the store; these only bound the broker's memory.
    #[serde(default = "default_segment_size")]
    pub max_segment_size: usize,
    #[serde(default = "default_segment_count")]
    pub max_segment_count: usize,
    /// Embedded broker: most client connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Embedded broker: most sessions one login (one agent, one consumer group) may have open
    /// at once; a CONNECT past it is refused. An agent holds one session, a consumer group one
    /// per running consumer; the rest is room for a reconnect that overlaps its old session.
    #[serde(default = "default_max_sessions_per_login")]
    pub max_sessions_per_login: usize,
    /// The listener's TLS certificate (PEM chain) and key (mode 0600).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (mTLS), on top of the logins.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Listen without TLS. Only for a test or a single host; warned at every start.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The enrolled clients' logins (`pwsync-relay enroll`). Default `credentials.toml` beside
    /// the config.
    #[serde(default = "default_credentials")]
    pub credentials: PathBuf,
}

fn default_credentials() -> PathBuf {
    "credentials.toml".into()
}

fn default_client_id() -> String {
    "pwsync-relay".into()
}
fn default_segment_size() -> usize {
    64 * 1024 * 1024
}
fn default_segment_count() -> usize {
    4
}
fn default_max_connections() -> usize {
    10_000
}
/// Documented in deploy/relay.toml.
pub const DEFAULT_MAX_SESSIONS_PER_LOGIN: usize = 4;
fn default_max_sessions_per_login() -> usize {
    DEFAULT_MAX_SESSIONS_PER_LOGIN
}

impl BrokerConfig {
    /// Where the relay's own MQTT client connects.
    pub fn client_address(&self) -> (String, u16) {
        match (&self.host, self.port, self.listen) {
            (Some(h), Some(p), _) => (h.clone(), p),
            (_, _, Some(l)) => (l.ip().to_string(), l.port()),
            (Some(h), None, None) => (h.clone(), 1883),
            (None, p, None) => ("127.0.0.1".into(), p.unwrap_or(1883)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// The relay's Ed25519 private key (mode 0600): signs acks and deliveries.
    pub signing_key: PathBuf,
    /// Enrolled agents' public keys, one `{agent id}.pub` per agent.
    pub agents_dir: PathBuf,
    /// The organisation's enrolment key (Ed25519, 0600): `enroll agent --scope` signs agent
    /// certificates with it, and envelopes carrying one are checked against its public half.
    #[serde(default)]
    pub enrolment_key: Option<PathBuf>,
    /// Withdrawn agents and certificates, one a line (`NAME` or `serial:N`).
    #[serde(default)]
    pub revocation_list: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub dir: PathBuf,
    /// Keep records this many seconds after every group has committed them (default 0).
    #[serde(default)]
    pub retention_secs: u64,
    /// Journal on a NATS JetStream cluster instead of the embedded redb file (relays on several
    /// machines, see [`crate::journal::jetstream`]). `dir` still holds this relay's own files
    /// (lock, kept policies, agents' liveness).
    #[serde(default)]
    pub jetstream: Option<JetStreamConfig>,
}

/// `[journal.jetstream]`: where the shared journal lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    /// NATS servers, tried in turn (`nats://host:port` or `tls://host:port`).
    pub servers: Vec<String>,
    /// The records stream; the relays' shared state is in `{stream}_STATE`. Default `PWSYNC`.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Copies of each stream (JetStream's replicas, odd: 1, 3 or 5). Default 3.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Verify the servers' TLS certificates with this CA (and require TLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A NATS credentials file (`.creds`: JWT and NKey seed), mode 0600.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// A NATS user, with its password in `password_file` (mode 0600).
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Seconds to wait for one JetStream answer. Default 5.
    #[serde(default = "default_jetstream_timeout")]
    pub timeout_secs: u64,
}

fn default_stream() -> String {
    "PWSYNC".into()
}
fn default_replicas() -> usize {
    3
}
fn default_jetstream_timeout() -> u64 {
    5
}

impl JetStreamConfig {
    fn problem(&self) -> Option<String> {
        if self.servers.is_empty() {
            return Some("[journal.jetstream] servers lists no NATS server".into());
        }
        let token_ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if self.stream.is_empty() || !self.stream.chars().all(token_ok) {
            return Some(format!(
                "[journal.jetstream] stream {:?} is not a stream name (letters, digits, _ and - only)",
                self.stream
            ));
        }
        if !matches!(self.replicas, 1 | 3 | 5) {
            return Some(format!(
                "[journal.jetstream] replicas = {}: use 1, 3 or 5 (a quorum of an even number is no better than of one fewer)",
                self.replicas
            ));
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Some("[journal.jetstream] user and password_file go together".into());
        }
        if self.user.is_some() && self.credentials_file.is_some() {
            return Some(
                "[journal.jetstream] give either credentials_file or user and password_file, not both"
                    .into(),
            );
        }
        None
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The group's Ed25519 public key: commits are verified with it.
    pub public_key: PathBuf,
    /// Records delivered and not yet committed, at most (sent in signed batches).
    #[serde(default = "default_window")]
    pub window: u16,
    /// Seconds without a commit moving forward before uncommitted deliveries are sent again.
    #[serde(default = "default_redelivery")]
    pub redelivery_secs: u64,
}

fn default_window() -> u16 {
    4096
}
fn default_redelivery() -> u64 {
    10
}

impl RelayConfig {
    /// How this relay decides who signed an envelope: agents_dir, the enrolment key, the
    /// revocation list.
    pub fn agent_keys(&self) -> Result<pwsync_proto::agents::AgentKeys, pwsync_proto::KeyError> {
        Ok(pwsync_proto::agents::AgentKeys::new(
            pwsync_proto::agents::AgentDirectory::new(&self.keys.agents_dir),
            self.enrolment_public_key()?,
            self.keys.revocation_list.as_deref(),
        ))
    }

    /// The public half of `keys.enrolment_key`, if one is configured.
    pub fn enrolment_public_key(
        &self,
    ) -> Result<Option<pwsync_proto::VerifyingKey>, pwsync_proto::KeyError> {
        self.keys
            .enrolment_key
            .as_deref()
            .map(|p| pwsync_proto::SigningKey::load(p).map(|k| k.verifying_key()))
            .transpose()
    }

    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let mut c: RelayConfig = load_toml(path)?;
        c.keys.signing_key = resolve(path, &c.keys.signing_key);
        c.keys.agents_dir = resolve(path, &c.keys.agents_dir);
        for p in [&mut c.keys.enrolment_key, &mut c.keys.revocation_list]
            .into_iter()
            .flatten()
        {
            *p = resolve(path, p);
        }
        c.journal.dir = resolve(path, &c.journal.dir);
        if let Some(js) = c.journal.jetstream.as_mut() {
            for p in [
                &mut js.ca_file,
                &mut js.credentials_file,
                &mut js.password_file,
            ]
            .into_iter()
            .flatten()
            {
                *p = resolve(path, p);
            }
        }
        c.broker.credentials = resolve(path, &c.broker.credentials);
        for p in [
            &mut c.broker.tls_cert,
            &mut c.broker.tls_key,
            &mut c.broker.client_ca,
        ]
        .into_iter()
        .flatten()
        {
            *p = resolve(path, p);
        }
        if let Some(t) = c.transport.as_mut() {
            t.resolve_paths(path);
        }
        for g in c.groups.values_mut() {
            g.public_key = resolve(path, &g.public_key);
        }
        let invalid = |message: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        };
        if c.broker.listen.is_none() && c.broker.host.is_none() {
            return Err(invalid(
                "[broker] needs `listen` (embedded broker) or `host` (external broker)",
            ));
        }
        if c.broker.listen.is_some()
            && !c.broker.insecure_plaintext
            && (c.broker.tls_cert.is_none() || c.broker.tls_key.is_none())
        {
            return Err(invalid(
                "[broker] listen needs tls_cert and tls_key (`pwsync-relay quickstart` makes a private CA and both), or insecure_plaintext = true for a listener without TLS",
            ));
        }
        if c.broker.max_sessions_per_login == 0 {
            return Err(invalid(
                "[broker] max_sessions_per_login must be at least 1 (0 would refuse every client)",
            ));
        }
        if let Some(problem) = c.journal.jetstream.as_ref().and_then(|j| j.problem()) {
            return Err(invalid(&problem));
        }
        if c.groups.values().any(|g| g.window == 0) {
            return Err(invalid("a group's window must be at least 1"));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_example_is_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.toml");
        let c = RelayConfig::load(&path).unwrap();
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.broker.client_address().1, 8883);
        assert!(c.broker.tls_cert.is_some() && !c.broker.insecure_plaintext);
        assert_eq!(
            c.broker.max_sessions_per_login,
            DEFAULT_MAX_SESSIONS_PER_LOGIN
        );
        assert!(c.journal.jetstream.is_none());
    }

    #[test]
    fn the_ha_example_is_a_valid_config() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ha/relay.toml");
        let c = RelayConfig::load(&path).unwrap();
        let js = c.journal.jetstream.unwrap();
        assert_eq!(js.servers.len(), 3);
        assert_eq!(js.replicas, 3);
        assert_eq!(js.user.as_deref(), Some("pwsync-relay"));
    }

    #[test]
    fn a_jetstream_section_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        let with = |section: &str| {
            std::fs::write(
                &path,
                format!("[broker]\nlisten = \"127.0.0.1:1883\"\ninsecure_plaintext = true\n[keys]\nsigning_key = \"k\"\nagents_dir = \"a\"\n[journal]\ndir = \"j\"\n{section}"),
            )
            .unwrap();
            RelayConfig::load(&path).map_err(|e| e.to_string())
        };
        let c = with("[journal.jetstream]\nservers = [\"nats://127.0.0.1:4222\"]\npassword_file = \"nats.pw\"\nuser = \"relay\"\n").unwrap();
        let js = c.journal.jetstream.unwrap();
        assert_eq!((js.stream.as_str(), js.replicas), ("PWSYNC", 3));
        assert_eq!(js.password_file.unwrap(), dir.path().join("nats.pw"));
        for (section, says) in [
            ("servers = []", "lists no NATS server"),
            ("servers = [\"n\"]\nstream = \"a.b\"", "not a stream name"),
            ("servers = [\"n\"]\nreplicas = 2", "use 1, 3 or 5"),
            ("servers = [\"n\"]\nuser = \"u\"", "go together"),
            ("servers = [\"n\"]\nkind = \"x\"", "unknown field"),
        ] {
            let e = with(&format!("[journal.jetstream]\n{section}\n")).unwrap_err();
            assert!(e.contains(says), "{section}: {e}");
        }
    }
}
