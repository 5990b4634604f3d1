//! A whole pwsync installation in a temp dir: keys, configs, a relay, agents, and test-side
//! consumer groups, each daemon a real process.

use crate::group_client::{GroupClient, GroupSetup};
use crate::probe::Probe;
use crate::process::{bin, free_port, wait_until, Daemon};
use pwsync_agent::api::{Request, Response, StatusReport};
use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::keys::RsaBits;
use pwsync_proto::{DecryptionKey, GroupName, Op, Opener, Secret, SigningKey, VerifyingKey};
use pwsync_runtime::transport::TransportConfig;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Options for one agent's config.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub mode: &'static str,
    pub max_bytes: u64,
    pub exclude: Vec<String>,
    pub socket_mode: u32,
    pub window: u16,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            mode: "strict",
            max_bytes: 256 * 1024 * 1024,
            exclude: vec!["root".into()],
            socket_mode: 0o600,
            window: 256,
        }
    }
}

pub struct AgentHandle {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub key: SigningKey,
    pub daemon: Option<Daemon>,
}

pub struct ConsumerHandle {
    pub group: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
}

/// A further relay: its listener, config, `/metrics` port and process.
pub struct RelayReplica {
    pub port: u16,
    pub metrics_port: u16,
    pub config: PathBuf,
    pub daemon: Option<Daemon>,
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub relay_port: u16,
    pub relay_dir: PathBuf,
    pub relay_config: PathBuf,
    pub relay_key: SigningKey,
    pub groups: BTreeMap<String, SigningKey>,
    pub consumer_key_pem: PathBuf,
    pub relay: Option<Daemon>,
    pub agents: Vec<AgentHandle>,
    pub consumers: Vec<ConsumerHandle>,
    /// Further relays sharing the first one's keys, logins and (JetStream) journal.
    pub replicas: Vec<RelayReplica>,
    /// The relays' ports agents and consumers added from now on list (`endpoints`), when more
    /// than the first relay's.
    pub endpoints: Vec<u16>,
    /// The first relay's config with `{PORT}`, `{JOURNAL}` and `{EXTRA}` to fill in.
    relay_template: String,
    /// username → the `[transport]` section of its enrolment.
    enrolled: std::sync::Mutex<BTreeMap<String, String>>,
}

/// The relay's log line once it is connected and subscribed.
const RELAY_READY: &str = "relay subscribed";

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

impl Cluster {
    /// Keys and a relay config for `groups`; nothing started. `broker_extra` is added to the
    /// relay's `[broker]` section.
    pub fn new(groups: &[&str], broker_extra: &str) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("pwsync-e2e")
            .tempdir()
            .expect("temp dir");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let relay_dir = root.path().join("relay");
        std::fs::create_dir_all(relay_dir.join("agents")).expect("mkdir");
        std::fs::create_dir_all(relay_dir.join("groups")).expect("mkdir");
        std::fs::create_dir_all(root.path().join("keys")).expect("mkdir");
        let relay_key = SigningKey::generate().expect("relay key");
        relay_key.save(&relay_dir.join("relay.key")).expect("save");
        relay_key
            .verifying_key()
            .save(&relay_dir.join("relay.pub"))
            .expect("save");
        let consumer = DecryptionKey::generate_bits(RsaBits::Rsa2048).expect("rsa");
        let consumer_key_pem = root.path().join("keys/consumer.key");
        consumer.save(&consumer_key_pem).expect("save");
        consumer
            .encryption_key()
            .save(&root.path().join("keys/consumer.pub"))
            .expect("save");
        let relay_port = free_port();
        let mut group_keys = BTreeMap::new();
        let mut groups_toml = String::new();
        for g in groups {
            let k = SigningKey::generate().expect("group key");
            k.verifying_key()
                .save(&relay_dir.join(format!("groups/{g}.pub")))
                .expect("save");
            groups_toml +=
                &format!("\n[groups.{g}]\npublic_key = \"groups/{g}.pub\"\nredelivery_secs = 2\n");
            group_keys.insert(g.to_string(), k);
        }
        // TLS on the relay's listener, from a CA of this cluster's own.
        let tls = relay_dir.join("tls");
        std::fs::create_dir_all(&tls).expect("mkdir");
        let ca = pwsync_relay::pki::Ca::generate("pwsync test CA").expect("CA");
        let server = ca.issue_server(&["127.0.0.1"]).expect("server certificate");
        write(&tls.join("ca.pem"), &ca.cert_pem);
        write(&tls.join("relay.pem"), &server.cert_pem);
        pwsync_relay::pki::write_private(&tls.join("relay.key"), &server.key_pem).expect("key");
        pwsync_relay::pki::write_private(&tls.join("ca.key"), &ca.key_pem).expect("key");
        let relay_config = relay_dir.join("relay.toml");
        let relay_template = format!(
            "[broker]\nlisten = \"127.0.0.1:{{PORT}}\"\ntls_cert = \"tls/relay.pem\"\ntls_key = \"tls/relay.key\"\n{broker_extra}\n\n[keys]\nsigning_key = \"relay.key\"\nagents_dir = \"agents\"\n\n[journal]\ndir = \"{{JOURNAL}}\"\n{groups_toml}\n{{EXTRA}}\n"
        );
        write(
            &relay_config,
            &relay_template
                .replace("{PORT}", &relay_port.to_string())
                .replace("{JOURNAL}", "journal")
                .replace("{EXTRA}", ""),
        );
        Cluster {
            root,
            rt,
            relay_port,
            relay_dir,
            relay_config,
            relay_key,
            groups: group_keys,
            consumer_key_pem,
            relay: None,
            agents: Vec::new(),
            consumers: Vec::new(),
            replicas: Vec::new(),
            endpoints: Vec::new(),
            relay_template,
            enrolled: Default::default(),
        }
    }

    /// Puts the first relay's journal on JetStream (`section`: its `[journal.jetstream]`) and
    /// its `/metrics` on `metrics_port`; before it starts. Replicas added later get the same
    /// journal section.
    pub fn use_jetstream(&mut self, section: &str, metrics_port: u16) {
        self.relay_template = self.relay_template.replace("{EXTRA}", section);
        write(
            &self.relay_config,
            &self.relay_text(self.relay_port, "journal", Some(metrics_port)),
        );
    }

    fn relay_text(&self, port: u16, journal: &str, metrics_port: Option<u16>) -> String {
        let metrics = metrics_port
            .map(|m| format!("\n[metrics]\nlisten = \"127.0.0.1:{m}\"\n"))
            .unwrap_or_default();
        self.relay_template
            .replace("{PORT}", &port.to_string())
            .replace("{JOURNAL}", journal)
            .replace("{EXTRA}", "")
            + &metrics
    }

    /// Writes another relay like the first (same keys, logins and journal settings; its own
    /// port, folder and `/metrics` port) and makes agents and consumers added from now on list
    /// every relay. Returns its index in [`Cluster::replicas`].
    pub fn add_relay_replica(&mut self) -> usize {
        let n = self.replicas.len() + 2;
        let (port, metrics_port) = (free_port(), free_port());
        let config = self.relay_dir.join(format!("relay-{n}.toml"));
        write(
            &config,
            &self.relay_text(port, &format!("journal-{n}"), Some(metrics_port)),
        );
        self.replicas.push(RelayReplica {
            port,
            metrics_port,
            config,
            daemon: None,
        });
        self.endpoints = std::iter::once(self.relay_port)
            .chain(self.replicas.iter().map(|r| r.port))
            .collect();
        self.replicas.len() - 1
    }

    /// Starts (or starts again) relay replica `i` and waits until it is subscribed.
    pub fn start_relay_replica(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        let ready_before = r
            .daemon
            .as_ref()
            .map(|d| d.log_text().matches(RELAY_READY).count())
            .unwrap_or(0);
        match &mut r.daemon {
            Some(d) => d.start_again(),
            None => {
                let log = self.root.path().join(format!("relay-{}.log", i + 2));
                let config = r.config.display().to_string();
                r.daemon = Some(Daemon::start(
                    &format!("relay-{}", i + 2),
                    bin("pwsync-relay"),
                    &["--config", &config, "run"],
                    log,
                ));
            }
        }
        let d = self.replicas[i].daemon.as_ref().expect("replica");
        wait_until(
            Duration::from_secs(40),
            "the relay replica to subscribe at its broker",
            || d.log_text().matches(RELAY_READY).count() > ready_before,
        );
    }

    pub fn relay_replica(&mut self, i: usize) -> &mut Daemon {
        self.replicas[i].daemon.as_mut().expect("replica started")
    }

    /// The `host`/`port` or `endpoints` lines of an agent's `[relay]` or a consumer's
    /// `[broker]`.
    fn relay_lines(&self) -> String {
        if self.endpoints.len() > 1 {
            let list = self
                .endpoints
                .iter()
                .map(|p| format!("\"127.0.0.1:{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            format!("endpoints = [{list}]")
        } else {
            format!("host = \"127.0.0.1\"\nport = {}", self.relay_port)
        }
    }

    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// Enrols `username` (`agent:NAME` or `consumer:GROUP`) at the relay, with its token in
    /// `dir/mqtt.pw`; returns the client's `[transport]` section.
    pub fn enroll(&self, username: &str, dir: &Path) -> String {
        if let Some(section) = self.enrolled.lock().expect("lock").get(username) {
            return section.clone(); // one token per identity: enrolling again would replace it
        }
        let identity = pwsync_relay::credentials::Identity::parse(username).expect("identity");
        let token =
            pwsync_relay::credentials::enroll(&self.relay_dir.join("credentials.toml"), &identity)
                .expect("enroll");
        std::fs::create_dir_all(dir).expect("mkdir");
        let pw = dir.join("mqtt.pw");
        pwsync_relay::pki::write_private(&pw, &token).expect("token");
        let section = format!(
            "[transport]\nca_file = \"{}\"\nusername = \"{username}\"\npassword_file = \"{}\"\n",
            self.relay_dir.join("tls/ca.pem").display(),
            pw.display()
        );
        self.enrolled
            .lock()
            .expect("lock")
            .insert(username.into(), section.clone());
        section
    }

    /// A raw MQTT client logged in as `username` (enrolled here), through the relay's gateway.
    pub fn probe_as(&self, username: &str, client_id: &str, topics: &[&str]) -> Probe {
        Probe::connect(
            &self.rt,
            self.relay_port,
            client_id,
            &self.login(username),
            topics,
        )
    }

    /// A raw MQTT client at the relay's internal broker, with the relay's own rights: for tests
    /// of what consumers and agents check by themselves. The relay must be running.
    pub fn probe_as_relay(&self, client_id: &str, topics: &[&str]) -> Probe {
        #[derive(serde::Deserialize)]
        struct Internal {
            address: std::net::SocketAddr,
            username: String,
            password: String,
        }
        let text = std::fs::read_to_string(self.relay_dir.join("journal/broker-internal.toml"))
            .expect("the running relay's broker-internal.toml");
        let internal: Internal = toml::from_str(&text).expect("broker-internal.toml");
        let pw = self.root.path().join("internal.pw");
        pwsync_relay::pki::write_private(&pw, &internal.password).expect("pw");
        let transport = TransportConfig {
            username: Some(internal.username),
            password_file: Some(pw),
            insecure_plaintext: true,
            ..TransportConfig::default()
        };
        Probe::connect(
            &self.rt,
            internal.address.port(),
            client_id,
            &transport,
            topics,
        )
    }

    /// [`Cluster::enroll`] as a parsed [`TransportConfig`], for test-side MQTT clients.
    pub fn login(&self, username: &str) -> TransportConfig {
        let dir = self
            .root
            .path()
            .join("logins")
            .join(username.replace(':', "-"));
        toml::from_str::<BTreeMap<String, TransportConfig>>(&self.enroll(username, &dir))
            .expect("transport section")
            .remove("transport")
            .expect("transport")
    }

    /// Creates an agent's keys and config and enrols it at the relay; returns its index.
    pub fn add_agent(&mut self, id: &str, o: AgentOptions) -> usize {
        let dir = self.root.path().join(id);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let key = SigningKey::generate().expect("agent key");
        key.save(&dir.join("agent.key")).expect("save");
        key.verifying_key()
            .save(&self.relay_dir.join(format!("agents/{id}.pub")))
            .expect("enrol");
        let exclude = o
            .exclude
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("agent.toml");
        let transport = self.enroll(&format!("agent:{id}"), &dir);
        write(
            &config,
            &format!(
                "agent_id = \"{id}\"\nmode = \"{}\"\n\n[keys]\nsigning_key = \"agent.key\"\nconsumer_public_key = \"../keys/consumer.pub\"\nrelay_public_key = \"../relay/relay.pub\"\n\n[socket]\npath = \"agent.sock\"\nmode = {}\n\n[spool]\ndir = \"spool\"\nmax_bytes = {}\n\n[scope]\ninclude = [\"*\"]\nexclude = [{exclude}]\n\n[relay]\n{}\nwindow = {}\nack_timeout_secs = 2\nreconnect_max_secs = 1\n\n{transport}",
                o.mode, o.socket_mode, o.max_bytes, self.relay_lines(), o.window
            ),
        );
        self.agents.push(AgentHandle {
            id: id.into(),
            socket: dir.join("agent.sock"),
            spool: dir.join("spool"),
            config,
            dir,
            key,
            daemon: None,
        });
        self.agents.len() - 1
    }

    /// Starts (or starts again) the relay and waits until its client is subscribed at the broker.
    pub fn start_relay(&mut self) {
        let ready_before = self
            .relay
            .as_ref()
            .map(|r| r.log_text().matches(RELAY_READY).count())
            .unwrap_or(0);
        match &mut self.relay {
            Some(d) => d.start_again(),
            None => {
                let log = self.root.path().join("relay.log");
                let config = self.relay_config.display().to_string();
                self.relay = Some(Daemon::start(
                    "relay",
                    bin("pwsync-relay"),
                    &["--config", &config, "run"],
                    log,
                ));
            }
        }
        let relay = self.relay.as_ref().expect("relay");
        wait_until(
            Duration::from_secs(20),
            "the relay to subscribe at its broker",
            || relay.log_text().matches(RELAY_READY).count() > ready_before,
        );
    }

    pub fn relay(&mut self) -> &mut Daemon {
        self.relay.as_mut().expect("relay started")
    }

    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_with_env(i, &[]);
    }

    /// [`Cluster::start_agent`] with `env` in the agent's environment (its first start decides).
    pub fn start_agent_with_env(&mut self, i: usize, env: &[(&str, &str)]) {
        let a = &mut self.agents[i];
        match &mut a.daemon {
            Some(d) => d.start_again(),
            None => {
                let log = a.dir.join("agent.log");
                let config = a.config.display().to_string();
                a.daemon = Some(Daemon::start_with_env(
                    &a.id,
                    bin("pwsync-agent"),
                    &["--config", &config, "run"],
                    log,
                    env,
                ));
            }
        }
        let socket = self.agents[i].socket.clone();
        let id = self.agents[i].id.clone();
        wait_until(
            Duration::from_secs(20),
            &format!("agent {id} to serve its socket"),
            || {
                self.rt
                    .block_on(pwsync_agent::client::request(
                        &socket,
                        &Request::Status,
                        Duration::from_secs(2),
                    ))
                    .is_ok()
            },
        );
    }

    pub fn agent(&mut self, i: usize) -> &mut Daemon {
        self.agents[i].daemon.as_mut().expect("agent started")
    }

    /// Submits through the socket API (as the PAM module does).
    pub fn submit(&self, i: usize, user: &str, op: Op, password: Option<&str>) -> Response {
        self.try_submit(i, user, op, password)
            .expect("agent answers")
    }

    /// [`Cluster::submit`], with the client's error instead of a panic when the agent is down.
    pub fn try_submit(
        &self,
        i: usize,
        user: &str,
        op: Op,
        password: Option<&str>,
    ) -> Result<Response, String> {
        let req = Request::Submit {
            user: user.into(),
            op,
            values: password.map(|p| vec![Secret::from(p)]).unwrap_or_default(),
            attributes: BTreeMap::new(),
            previous: None,
        };
        self.rt
            .block_on(pwsync_agent::client::request(
                &self.agents[i].socket,
                &req,
                Duration::from_secs(30),
            ))
            .map_err(|e| e.to_string())
    }

    /// Submits `changes` (user, password) through the socket with `concurrency` clients at once;
    /// returns the responses in order.
    pub fn submit_many(
        &self,
        i: usize,
        changes: Vec<(String, String)>,
        concurrency: usize,
    ) -> Vec<Response> {
        let socket = self.agents[i].socket.clone();
        self.rt.block_on(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut tasks = Vec::new();
            for (user, pw) in changes {
                let permit = sem.clone().acquire_owned().await.expect("semaphore");
                let socket = socket.clone();
                tasks.push(tokio::spawn(async move {
                    let req = replace_request(user, &pw);
                    let r =
                        pwsync_agent::client::request(&socket, &req, Duration::from_secs(60)).await;
                    drop(permit);
                    r.expect("agent answers")
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        })
    }

    /// Submits `changes` over `connections` sockets kept open, each sending its share one after
    /// another (as a bulk source would). The responses come back in the order of `changes`.
    pub fn submit_many_connected(
        &self,
        i: usize,
        changes: Vec<(String, String)>,
        connections: usize,
    ) -> Vec<Response> {
        let socket = self.agents[i].socket.clone();
        let n = changes.len();
        self.rt.block_on(async move {
            let mut shares: Vec<Vec<(usize, String, String)>> =
                vec![Vec::new(); connections.max(1)];
            for (k, (user, pw)) in changes.into_iter().enumerate() {
                shares[k % connections.max(1)].push((k, user, pw));
            }
            let tasks: Vec<_> = shares
                .into_iter()
                .map(|share| {
                    let socket = socket.clone();
                    tokio::spawn(async move {
                        let mut conn = pwsync_agent::client::Connection::open(
                            &socket,
                            Duration::from_secs(60),
                        )
                        .await
                        .expect("agent socket");
                        let mut out = Vec::new();
                        for (k, user, pw) in share {
                            let req = replace_request(user, &pw);
                            out.push((k, conn.ask(&req).await.expect("agent answers")));
                        }
                        out
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(n);
            for t in tasks {
                all.extend(t.await.expect("task"));
            }
            all.sort_by_key(|(k, _)| *k);
            all.into_iter().map(|(_, r)| r).collect()
        })
    }

    /// Submits with the real CLI, the password on stdin.
    pub fn submit_cli(&self, i: usize, user: &str, password: &str) -> Output {
        self.submit_cli_with(i, user, &[], password)
    }

    /// [`Cluster::submit_cli`] with more arguments; `input` is stdin as it is (one value a line).
    pub fn submit_cli_with(&self, i: usize, user: &str, args: &[&str], input: &str) -> Output {
        let mut child = Command::new(bin("pwsync-agent"))
            .args([
                "--config",
                &self.agents[i].config.display().to_string(),
                "submit",
                "--user",
                user,
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pwsync-agent submit");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{input}\n").as_bytes())
            .expect("write password");
        child.wait_with_output().expect("submit output")
    }

    pub fn status(&self, i: usize) -> StatusReport {
        match self.rt.block_on(pwsync_agent::client::request(
            &self.agents[i].socket,
            &Request::Status,
            Duration::from_secs(10),
        )) {
            Ok(Response::Status(s)) => *s,
            other => panic!("status: {other:?}"),
        }
    }

    /// Runs one of the tools to completion.
    pub fn tool(&self, program: &str, args: &[&str]) -> Output {
        Command::new(bin(program))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// `pwsync-relay journal COMMAND` (`stats`, `groups`, `ls`) with the relay's config: its
    /// output; a refusal fails the test with what the tool said.
    pub fn journal(&self, command: &str) -> String {
        let config = self.relay_config.display().to_string();
        let out = self.tool("pwsync-relay", &["--config", &config, "journal", command]);
        assert!(
            out.status.success(),
            "pwsync-relay journal {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A test-side consumer group connected to the relay's broker.
    pub fn group_client(&self, group: &str) -> GroupClient {
        let key = SigningKey::from_pem(
            &std::fs::read_to_string(self.group_key_pem(group)).expect("group key"),
        )
        .expect("pem");
        let opener =
            Opener::new([DecryptionKey::load(&self.consumer_key_pem).expect("consumer key")]);
        GroupClient::start(
            &self.rt,
            GroupSetup {
                port: self.relay_port,
                transport: self.login(&format!("consumer:{group}")),
                group: GroupName::new(group).expect("group name"),
                key,
                relay_key: self.relay_verifying_key(),
                opener: Arc::new(opener),
                agents: Arc::new(AgentDirectory::new(&self.relay_dir.join("agents"))),
            },
        )
    }

    fn group_key_pem(&self, group: &str) -> PathBuf {
        let path = self.root.path().join(format!("keys/group-{group}.key"));
        if !path.exists() {
            self.groups[group].save(&path).expect("save group key");
        }
        path
    }

    pub fn relay_verifying_key(&self) -> VerifyingKey {
        self.relay_key.verifying_key()
    }

    /// Writes a consumer of `group` whose config ends with `extra` (agent scope, retry and
    /// `[targets.*]` sections); returns its index. Its folder is `<root>/consumer-<name>`.
    pub fn add_consumer(&mut self, name: &str, group: &str, extra: &str) -> usize {
        let dir = self.root.path().join(format!("consumer-{name}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        self.groups[group]
            .save(&dir.join("group.key"))
            .expect("group key");
        let config = dir.join("consumer.toml");
        write(
            &config,
            &format!(
                "group = \"{group}\"\n\n{}\n[keys]\ndecryption_keys = [\"../keys/consumer.key\"]\ngroup_signing_key = \"group.key\"\nrelay_public_key = \"../relay/relay.pub\"\nagents_dir = \"../relay/agents\"\n\n[broker]\n{}\n\n[state]\ndir = \"state\"\n\n{extra}\n",
                self.enroll(&format!("consumer:{group}"), &dir),
                self.relay_lines()
            ),
        );
        self.consumers.push(ConsumerHandle {
            group: group.into(),
            dir,
            config,
            daemon: None,
        });
        self.consumers.len() - 1
    }

    /// Starts (or starts again) a consumer. With the relay running, waits until the consumer
    /// is subscribed to its deliveries; without, until it is up.
    pub fn start_consumer(&mut self, i: usize) {
        self.start_consumer_with_env(i, &[]);
    }

    /// [`Cluster::start_consumer`] with `env` in the consumer's environment (its first start
    /// decides).
    pub fn start_consumer_with_env(&mut self, i: usize, env: &[(&str, &str)]) {
        let relay_up = self.relay.as_mut().is_some_and(|r| r.is_running());
        let mark = if relay_up {
            "consumer subscribed"
        } else {
            "consumer ready"
        };
        let c = &mut self.consumers[i];
        let before = c
            .daemon
            .as_ref()
            .map(|d| d.log_text().matches(mark).count())
            .unwrap_or(0);
        match &mut c.daemon {
            Some(d) => d.start_again(),
            None => {
                let log = c.dir.join("consumer.log");
                let config = c.config.display().to_string();
                c.daemon = Some(Daemon::start_with_env(
                    &format!("consumer-{}", c.group),
                    bin("pwsync-consumer"),
                    &["--config", &config, "run"],
                    log,
                    env,
                ));
            }
        }
        let d = c.daemon.as_ref().expect("consumer");
        let started = crate::process::wait_for(Duration::from_secs(20), || {
            d.log_text().matches(mark).count() > before
        });
        assert!(
            started,
            "timed out waiting for the consumer: {mark}; its log:\n{}",
            d.log_text()
        );
    }

    pub fn consumer(&mut self, i: usize) -> &mut Daemon {
        self.consumers[i].daemon.as_mut().expect("consumer started")
    }

    /// The consumer's status file (written every second while it runs).
    pub fn consumer_status(&self, i: usize) -> serde_json::Value {
        let path = self.consumers[i].dir.join("state/status.json");
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// A counter of the consumer's status (0 when absent).
    pub fn consumer_counter(&self, i: usize, name: &str) -> u64 {
        self.consumer_status(i)["counters"][name]
            .as_u64()
            .unwrap_or(0)
    }

    /// Every log file of the installation, concatenated.
    pub fn all_logs(&self) -> String {
        let mut out = self
            .relay
            .as_ref()
            .map(|r| r.log_text())
            .unwrap_or_default();
        for r in &self.replicas {
            if let Some(d) = &r.daemon {
                out += &d.log_text();
            }
        }
        for a in &self.agents {
            if let Some(d) = &a.daemon {
                out += &d.log_text();
            }
        }
        for c in &self.consumers {
            if let Some(d) = &c.daemon {
                out += &d.log_text();
            }
        }
        out
    }
}

impl Drop for Cluster {
    /// When a test fails, the last lines of every daemon's log go to the test's output: the temp
    /// dir (and the logs in it) is gone afterwards.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut logs: Vec<(String, String)> = Vec::new();
        if let Some(r) = &self.relay {
            logs.push(("relay".into(), r.log_text()));
        }
        for (i, r) in self.replicas.iter().enumerate() {
            if let Some(d) = &r.daemon {
                logs.push((format!("relay-{}", i + 2), d.log_text()));
            }
        }
        for a in &self.agents {
            if let Some(d) = &a.daemon {
                logs.push((a.id.clone(), d.log_text()));
            }
        }
        for c in &self.consumers {
            if let Some(d) = &c.daemon {
                logs.push((format!("consumer-{}", c.group), d.log_text()));
            }
        }
        for (name, text) in logs {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "---- last {} lines of {name}'s log ----\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A submit request replacing `user`'s password with `password`.
fn replace_request(user: String, password: &str) -> Request {
    Request::Submit {
        user,
        op: Op::Replace,
        values: vec![Secret::from(password)],
        attributes: BTreeMap::new(),
        previous: None,
    }
}
