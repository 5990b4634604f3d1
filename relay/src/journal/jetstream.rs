//! The journal on a NATS JetStream cluster, shared by every relay that names it: relays are
//! interchangeable in front of it, and the cluster (Raft, replicated file storage) holds what it
//! acknowledged. The invariants are those of [`super`]; this is how they hold when several
//! relays append at once.
//!
//! # In the cluster
//! Two streams, both with `replicas` copies on file storage:
//!
//! | stream | subject | message |
//! |---|---|---|
//! | `STREAM` | `STREAM.r.{agent, hex}` | one [`JournalRecord`]; its stream sequence is its offset |
//! | `STREAM_STATE` (last message per subject) | `STREAM.s.a.{agent, hex}` | highest seq journaled for that agent (8 bytes, big-endian) |
//! | | `STREAM.s.c.{group, hex}` | the group's committed offset (8 bytes) |
//! | | `STREAM.s.p.{group, hex}` | the group's signed password policy |
//!
//! # How an append stays gap-free with several relays
//! One relay appends one batch at a time ([`JetStreamJournal::apply`]); the decisions are the
//! node [`super::chain::ChainAppend`], this module its shell:
//! 1. It reads the stream's last sequence `L`, then each agent's highest journaled seq: the
//!    seq of the agent's last record in the stream, or, when every record of that agent has
//!    been pruned, its register in `STREAM_STATE`.
//! 2. It sorts the batch against those (duplicate, next, gap) and publishes the next ones as a
//!    chain: each carries a `Nats-Msg-Id` unique to this publication, the first expects the
//!    stream's last sequence to be `L` (`Nats-Expected-Last-Sequence`), and every later one
//!    expects the stream's last message to be the one before it in the chain
//!    (`Nats-Expected-Last-Msg-Id`). These are checks on the *whole stream*, not the
//!    per-subject ones (nats-server#4320: per-subject expectations could both be accepted under
//!    concurrent publishes). If another relay appended in between, or one publish fails, that
//!    one and every later one of the chain are refused by the server, so the stream never holds
//!    an agent's seq N+1 without N before it. (Expecting `L`, `L+1`, … instead is not enough:
//!    when one publish is refused and another relay's lands in its place, the next one's
//!    expectation holds again; the test in tests/tests/jetstream.rs found such gaps.) The
//!    relay then reads again and sends the rest: at once after another relay's append (a
//!    bounded number of times), `RETRY_PAUSE` later after any other failure (no leader, no
//!    answer within `ATTEMPT`, no connection), for as long as `APPLY_BUDGET` lasts. So
//!    when a stream's leader is lost, the first round after the cluster has elected another
//!    takes the batch; only after the budget does the batch fail (the relay then tells its
//!    agents where they stand, and they send it again at once).
//! 3. Only then it raises the register of every agent of the batch to what will be acked
//!    (compare-and-set on the subject's last sequence, never lowered; tried again like the
//!    reads), moves the group cursors the same way, and returns: the agents are acked after
//!    that. So an acked seq is in its
//!    register before any record of it can be pruned.
//!
//! A relay that crashes after step 2 leaves records whose agents were never acked: they send
//! again, and step 1 finds the records and calls them duplicates. Consumers drop any replayed
//! `(agent, seq)` in any case, so a record journaled twice (a timed-out publish that did land)
//! is applied once.
//!
//! # Journal time
//! A record's journal time (which the consumer bounds capture times by) is the time the stream
//! leader stamped on it, not the appending relay's clock: relays need not agree on the time,
//! the NATS nodes should (NTP), as for any Raft cluster.
//!
//! # Pruning
//! Every few seconds each relay reads the group cursors; when every declared group has
//! committed past the stream's first records (and they are older than the retention period),
//! it purges them. Before it does, it raises the register of every agent whose last record
//! would go (`chain::registers_before_purge`): records of an append whose relay stopped
//! before step 3 are then not forgotten, and the agent's resend of them is still a duplicate.
//! Purging is idempotent, so relays need not agree on who does it.

use super::chain::{self, Answer, Budget, ChainAppend, Expect, Register, RoundEnd};
use super::rules;
use super::{Applied, Incoming, JournalEntry, JournalError, JournalRecord, JournalStats, Shared};
use crate::config::JetStreamConfig;
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use futures::StreamExt;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{AgentId, GroupName, Offset};
use pwsync_runtime::observe::Check;
use pwsync_runtime::repeated::Repeated;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest one [`JetStreamJournal::apply`] keeps trying before the batch fails.
const APPLY_BUDGET: Duration = Duration::from_secs(12);
/// Longest one apply may take in all (the budget, then the registers and cursors).
const APPLY_DEADLINE: Duration = Duration::from_secs(30);
/// Longest one read of records or of the shared view may take.
const READ_DEADLINE: Duration = Duration::from_secs(15);
/// Most rounds of one apply lost to other relays' appends coming in between.
const APPLY_ROUNDS: u32 = 16;
/// The pause before a read or write of an apply is tried again after it failed (no leader,
/// no answer, no connection): short, so that the first attempt after the cluster has elected
/// a new leader comes within this of the election.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest one attempt at reading the stream's end (or raising a register) is waited for
/// before it is given up and tried again. A request sent while the stream had no leader may
/// never be answered; waiting for the client's own timeout (`timeout_secs`) would hold the
/// first attempt after the election back by that much.
const ATTEMPT: Duration = Duration::from_secs(2);
/// [`ATTEMPT`] once an attempt has failed: the cluster is electing, and a request sent before
/// the election ends may never be answered, so the relay asks again this often (the first
/// attempt after the election then comes within this of it). Reads are small and answered in
/// milliseconds by a leader.
const RECOVERY_ATTEMPT: Duration = Duration::from_millis(500);
/// Reads of records in flight at once.
const READ_AHEAD: usize = 64;
/// How often the shared view (stream end, cursors, health) is read again.
const REFRESH: Duration = Duration::from_secs(1);
/// How often pruning and the kept policies are looked at.
const SLOW_REFRESH: Duration = Duration::from_secs(5);
/// The view is stale (unhealthy) when older than this.
const STALE_AFTER: Duration = Duration::from_secs(5);

fn js_err(what: &str, e: impl std::fmt::Display) -> JournalError {
    JournalError::JetStream(format!("{what}: {e}"))
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The subjects of one journal.
#[derive(Debug, Clone)]
struct Subjects {
    stream: String,
}

impl Subjects {
    fn record(&self, agent: &AgentId) -> String {
        format!("{}.r.{}", self.stream, hex(agent.as_str()))
    }
    fn agent_seq(&self, agent: &AgentId) -> String {
        format!("{}.s.a.{}", self.stream, hex(agent.as_str()))
    }
    fn record_prefix(&self) -> String {
        format!("{}.r.", self.stream)
    }
    fn agent_prefix(&self) -> String {
        format!("{}.s.a.", self.stream)
    }
    fn cursor(&self, group: &GroupName) -> String {
        format!("{}.s.c.{}", self.stream, hex(group.as_str()))
    }
    fn register(&self, register: &Register) -> String {
        match register {
            Register::Agent(agent) => self.agent_seq(agent),
            Register::Cursor(group) => self.cursor(group),
        }
    }
    fn policy(&self, group: &GroupName) -> String {
        format!("{}.s.p.{}", self.stream, hex(group.as_str()))
    }
    /// Core NATS (not journaled): "the stream now ends at offset N", from the relay that
    /// appended, so the others deliver at once rather than at their next reading.
    fn appended(&self) -> String {
        format!("{}.n", self.stream)
    }
    fn state_stream(&self) -> String {
        format!("{}_STATE", self.stream)
    }
}

/// A stream's Raft group as last read: how many of its members are current (the leader
/// included) of how many, and whether that is a quorum. The one place the rule is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Replicas {
    current: usize,
    peers: usize,
    leader: bool,
}

impl Replicas {
    fn of(cluster: &stream::ClusterInfo) -> Replicas {
        if cluster.leader.is_none() && cluster.replicas.is_empty() {
            // A single server without clustering: the stream is all there.
            return Replicas {
                current: 1,
                peers: 1,
                leader: true,
            };
        }
        let leader = cluster.leader.is_some();
        Replicas {
            current: cluster.replicas.iter().filter(|p| p.current).count() + usize::from(leader),
            peers: cluster.replicas.len() + usize::from(leader),
            leader,
        }
    }

    /// A leader, and more than half of the members current: appends can be acknowledged.
    fn quorum(&self) -> bool {
        self.leader && self.current * 2 > self.peers
    }
}

/// The last reading of the cluster (refreshed every [`REFRESH`]).
#[derive(Debug, Default)]
struct View {
    /// Moves at every successful reading.
    generation: u64,
    read_at: Option<Instant>,
    error: Option<String>,
    leader: Option<String>,
    replicas: Replicas,
    records: u64,
    bytes: u64,
    cursors: BTreeMap<GroupName, Offset>,
    policies: Vec<(GroupName, Vec<u8>)>,
}

pub struct JetStreamJournal {
    client: async_nats::Client,
    js: jetstream::Context,
    records: stream::Stream,
    state: stream::Stream,
    subjects: Subjects,
    servers: String,
    next_offset: AtomicU64,
    first_offset: AtomicU64,
    view: Mutex<View>,
    /// One apply at a time from this relay.
    appending: tokio::sync::Mutex<()>,
    replicas: usize,
    /// Makes this journal's message ids unique: a random prefix and a counter.
    id_prefix: String,
    next_id: AtomicU64,
    /// Woken when another relay says it appended.
    appended_elsewhere: tokio::sync::Notify,
    /// The last [`JetStreamJournal::read_from`] failed.
    reads_failing: std::sync::atomic::AtomicBool,
    /// Policies given to [`JetStreamJournal::share_policy`] that the cluster has not taken yet.
    unshared: Mutex<BTreeMap<GroupName, Vec<u8>>>,
    /// One [`JetStreamJournal::keep_policies`] at a time.
    keeping: tokio::sync::Mutex<()>,
    policy_errors: Mutex<Repeated>,
}

/// Connects to the cluster with the configured TLS and login. A relay (`keep_trying`) starts
/// while no server answers and connects when one does; the tools fail at once.
async fn connect(
    cfg: &JetStreamConfig,
    keep_trying: bool,
) -> Result<async_nats::Client, JournalError> {
    let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
    let mut opts = async_nats::ConnectOptions::new()
        .name("pwsync-relay")
        .connection_timeout(timeout)
        .request_timeout(Some(timeout))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS connection lost; reconnecting")
                }
                other => tracing::debug!(event = %other, "NATS"),
            }
        });
    if let Some(ca) = &cfg.ca_file {
        let tls = pwsync_runtime::tls::client_config(Some(ca), None)
            .map_err(|e| js_err("[journal.jetstream] ca_file", e))?;
        opts = opts
            .require_tls(true)
            .tls_client_config(Arc::unwrap_or_clone(tls));
    }
    if let Some(creds) = &cfg.credentials_file {
        pwsync_proto::keys::check_private_mode(creds)
            .map_err(|e| js_err("[journal.jetstream] credentials_file", e))?;
        opts = opts.credentials_file(creds).await.map_err(|e| {
            js_err(
                &format!("[journal.jetstream] credentials_file {}", creds.display()),
                e,
            )
        })?;
    }
    if let (Some(user), Some(file)) = (&cfg.user, &cfg.password_file) {
        let password = pwsync_runtime::transport::read_password(file)
            .map_err(|e| js_err("[journal.jetstream] password_file", e))?;
        opts = opts.user_and_password(user.clone(), password.to_string());
    }
    if keep_trying {
        opts = opts.retry_on_initial_connect();
    }
    let mut addrs = Vec::new();
    for s in &cfg.servers {
        addrs.push(
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| js_err(&format!("[journal.jetstream] server {s:?}"), e))?,
        );
    }
    opts.connect(addrs).await.map_err(|e| {
        js_err(
            &format!(
                "connecting to NATS at {} (check [journal.jetstream] servers, ca_file and the login)",
                cfg.servers.join(", ")
            ),
            e,
        )
    })
}

impl JetStreamJournal {
    /// Connects, creates the streams if they are missing, and starts the task that keeps the
    /// shared view ([`JetStreamJournal::shared`]) fresh and prunes. Waits (logging every 10 s)
    /// while the cluster answers nothing, for at most two minutes.
    pub async fn open(
        cfg: &JetStreamConfig,
        declared: &super::DeclaredGroups,
        retention_ms: u64,
    ) -> Result<Arc<JetStreamJournal>, JournalError> {
        let client = connect(cfg, true).await?;
        let subjects = Subjects {
            stream: cfg.stream.clone(),
        };
        let js = context(&client, cfg);
        let records_cfg = stream::Config {
            name: subjects.stream.clone(),
            subjects: vec![format!("{}.r.>", subjects.stream)],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::New,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            // Message ids are unique per publication (see above): the window only bounds the
            // server's memory of them.
            duplicate_window: Duration::from_secs(10),
            description: Some("pwsync journal: one record per journaled envelope".into()),
            ..Default::default()
        };
        let state_cfg = stream::Config {
            name: subjects.state_stream(),
            subjects: vec![format!("{}.s.>", subjects.stream)],
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: cfg.replicas,
            description: Some("pwsync journal: agents' seqs, group cursors, policies".into()),
            ..Default::default()
        };
        let started = Instant::now();
        let mut logged = Instant::now();
        let (records, state) = loop {
            let made = async {
                let r = js
                    .get_or_create_stream(records_cfg.clone())
                    .await
                    .map_err(|e| js_err("the records stream", e))?;
                let s = js
                    .get_or_create_stream(state_cfg.clone())
                    .await
                    .map_err(|e| js_err("the state stream", e))?;
                Ok::<_, JournalError>((r, s))
            }
            .await;
            match made {
                Ok(both) => break both,
                Err(e) if started.elapsed() < Duration::from_secs(120) => {
                    if logged.elapsed() >= Duration::from_secs(10) {
                        tracing::warn!(error = %e, "waiting for JetStream");
                        logged = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let j = Arc::new(JetStreamJournal::new(
            client, js, records, state, subjects, cfg,
        ));
        // The first reading (stream end, cursors) must succeed before the relay starts: right
        // after a node restarts or a leader changes, reads time out for a few seconds.
        loop {
            j.refresh(&declared.get(), retention_ms, true).await;
            let error = j.view().error.clone();
            match error {
                None => break,
                Some(e) if started.elapsed() < Duration::from_secs(120) => {
                    if logged.elapsed() >= Duration::from_secs(10) {
                        tracing::warn!(error = %e, "waiting for JetStream");
                        logged = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Some(e) => return Err(JournalError::JetStream(e)),
            }
        }
        let info = j.records.cached_info();
        if info.config.num_replicas != cfg.replicas {
            tracing::warn!(
                stream = %j.subjects.stream, has = info.config.num_replicas, configured = cfg.replicas,
                "the stream exists with another replica count; it is used as it is (change it with the NATS tools)"
            );
        }
        match j.client.subscribe(j.subjects.appended()).await {
            Ok(mut news) => {
                let weak = Arc::downgrade(&j);
                tokio::spawn(async move {
                    while let Some(m) = news.next().await {
                        let Some(j) = weak.upgrade() else { return };
                        if let Ok(end) = <[u8; 8]>::try_from(m.payload.as_ref()) {
                            j.next_offset
                                .fetch_max(u64::from_be_bytes(end) + 1, Ordering::Relaxed);
                            j.appended_elsewhere.notify_one();
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, subject = %j.subjects.appended(), "cannot hear of other relays' appends; their records are delivered from here within a second")
            }
        }
        let weak = Arc::downgrade(&j);
        let declared = declared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(REFRESH);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut slow = Instant::now();
            loop {
                every.tick().await;
                let Some(j) = weak.upgrade() else { return };
                let deep = slow.elapsed() >= SLOW_REFRESH;
                if deep {
                    slow = Instant::now();
                }
                j.refresh(&declared.get(), retention_ms, deep).await;
                if deep && !j.unshared_policies().is_empty() {
                    j.keep_policies().await;
                }
            }
        });
        Ok(j)
    }

    /// Connects to existing streams for the offline tools (creating nothing).
    pub async fn attach(cfg: &JetStreamConfig) -> Result<Arc<JetStreamJournal>, JournalError> {
        let client = connect(cfg, false).await?;
        let subjects = Subjects {
            stream: cfg.stream.clone(),
        };
        let js = context(&client, cfg);
        let records = js.get_stream(&subjects.stream).await.map_err(|e| {
            js_err(
                &format!("the stream {} (has a relay run yet?)", subjects.stream),
                e,
            )
        })?;
        let state = js
            .get_stream(subjects.state_stream())
            .await
            .map_err(|e| js_err(&format!("the stream {}", subjects.state_stream()), e))?;
        let j = Arc::new(JetStreamJournal::new(
            client, js, records, state, subjects, cfg,
        ));
        j.refresh(&[], 0, false).await;
        Ok(j)
    }

    /// For `pwsync-relay check`: connects and reads both streams (creating nothing); says
    /// where they stand, or what is wrong.
    pub async fn probe(cfg: &JetStreamConfig) -> Result<String, JournalError> {
        let client = connect(cfg, false).await?;
        let js = context(&client, cfg);
        let subjects = Subjects {
            stream: cfg.stream.clone(),
        };
        let mut lines = Vec::new();
        for name in [subjects.stream.clone(), subjects.state_stream()] {
            match js.get_stream(&name).await {
                Ok(mut s) => {
                    let info = s
                        .info()
                        .await
                        .map_err(|e| js_err(&format!("the stream {name}"), e))?;
                    let cluster = info.cluster.clone().unwrap_or_default();
                    let replicas = Replicas::of(&cluster);
                    let Replicas { current, peers, .. } = replicas;
                    if !replicas.quorum() {
                        return Err(JournalError::JetStream(format!(
                            "the stream {name} has no quorum ({current} of {peers} replicas current, leader {}); relays would hold every change until it has",
                            cluster.leader.as_deref().unwrap_or("none")
                        )));
                    }
                    lines.push(format!(
                        "stream {name}: {} records, {} replicas (configured {}), leader {}, {current} of {peers} current",
                        info.state.messages,
                        info.config.num_replicas,
                        cfg.replicas,
                        cluster.leader.as_deref().unwrap_or("-"),
                    ));
                }
                Err(e)
                    if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    lines.push(format!(
                        "stream {name}: not there yet; the first relay to run creates it with {} replicas",
                        cfg.replicas
                    ));
                }
                Err(e) => return Err(js_err(&format!("the stream {name}"), e)),
            }
        }
        Ok(lines.join("\n"))
    }

    fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        records: stream::Stream,
        state: stream::Stream,
        subjects: Subjects,
        cfg: &JetStreamConfig,
    ) -> JetStreamJournal {
        JetStreamJournal {
            client,
            js,
            records,
            state,
            subjects,
            servers: cfg.servers.join(","),
            next_offset: AtomicU64::new(1),
            first_offset: AtomicU64::new(1),
            view: Mutex::new(View::default()),
            appending: tokio::sync::Mutex::new(()),
            replicas: cfg.replicas,
            id_prefix: random_prefix(),
            next_id: AtomicU64::new(1),
            appended_elsewhere: tokio::sync::Notify::new(),
            reads_failing: std::sync::atomic::AtomicBool::new(false),
            unshared: Mutex::new(BTreeMap::new()),
            keeping: tokio::sync::Mutex::new(()),
            policy_errors: Mutex::new(Repeated::new(
                "cannot keep a group's password policy in JetStream; trying again every 5 s",
                tracing::Level::WARN,
            )),
        }
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn describe(&self) -> String {
        format!(
            "JetStream stream {} at {}",
            self.subjects.stream, self.servers
        )
    }

    pub fn next_offset(&self) -> Offset {
        Offset(self.next_offset.load(Ordering::Relaxed))
    }

    /// The stream's state, from its leader; also moves what this relay knows of its ends.
    async fn stream_info(&self) -> Result<stream::Info, JournalError> {
        let info = self
            .records
            .get_info()
            .await
            .map_err(|e| js_err("reading the stream's state", e))?;
        self.next_offset
            .fetch_max(info.state.last_sequence + 1, Ordering::Relaxed);
        self.first_offset
            .store(info.state.first_sequence.max(1), Ordering::Relaxed);
        Ok(info)
    }

    /// A register's value and the stream sequence of the message holding it (0, 0 if none).
    async fn register(&self, subject: &str) -> Result<(u64, u64), JournalError> {
        match self.state.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                let value = <[u8; 8]>::try_from(m.payload.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        JournalError::JetStream(format!(
                            "{subject} holds {} bytes, not a number: not written by pwsync",
                            m.payload.len()
                        ))
                    })?;
                Ok((value, m.sequence))
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok((0, 0)),
            Err(e) => Err(js_err(&format!("reading {subject}"), e)),
        }
    }

    /// Raises a register to at least `value` (never lowers it); returns what it holds after.
    async fn raise(&self, subject: &str, value: u64) -> Result<u64, JournalError> {
        for _ in 0..APPLY_ROUNDS {
            let (held, at) = self.register(subject).await?;
            if !chain::needs_raising(held, value) {
                return Ok(held);
            }
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::copy_from_slice(&value.to_be_bytes()))
                .expected_last_subject_sequence(at);
            let ack = self
                .js
                .send_publish(subject.to_string(), publish)
                .await
                .map_err(|e| js_err(&format!("writing {subject}"), e))?;
            match ack.await {
                Ok(_) => return Ok(value),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                Err(e) => return Err(js_err(&format!("writing {subject}"), e)),
            }
        }
        Err(JournalError::JetStream(format!(
            "{subject}: other relays kept writing it; try again"
        )))
    }

    /// The highest seq journaled for `agent`: its last record's, or its register's when every
    /// record of it has been pruned.
    async fn agent_last(&self, agent: &AgentId) -> Result<u64, JournalError> {
        let subject = self.subjects.record(agent);
        match self.records.get_last_raw_message_by_subject(&subject).await {
            Ok(m) => JournalRecord::decode(&m.payload)
                .map(|r| r.seq.0)
                .map_err(|e| js_err(&format!("the record at offset {}", m.sequence), e)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(self.register(&self.subjects.agent_seq(agent)).await?.0)
            }
            Err(e) => Err(js_err(&format!("reading agent {agent}'s last record"), e)),
        }
    }

    /// Journals a batch (see the module's account of how), then moves the group cursors;
    /// fails rather than wait past [`APPLY_DEADLINE`] for anything.
    pub async fn apply(
        &self,
        incoming: &[Incoming],
        commits: &[(GroupName, Offset)],
    ) -> Result<Applied, JournalError> {
        tokio::time::timeout(APPLY_DEADLINE, self.apply_now(incoming, commits))
            .await
            .map_err(|_| {
                JournalError::JetStream(format!(
                    "a batch took more than {APPLY_DEADLINE:?}; its agents send it again"
                ))
            })?
    }

    async fn apply_now(
        &self,
        incoming: &[Incoming],
        commits: &[(GroupName, Offset)],
    ) -> Result<Applied, JournalError> {
        let _turn = self.appending.lock().await;
        let started = Instant::now();
        let budget = Budget {
            contended_rounds: APPLY_ROUNDS,
            total_ms: APPLY_BUDGET.as_millis() as u64,
            pause_ms: RETRY_PAUSE.as_millis() as u64,
        };
        let batch = incoming.iter().map(|i| (i.agent.clone(), i.seq)).collect();
        let mut append = ChainAppend::new(batch, budget, 0);
        loop {
            let attempt = if append.recovering() {
                RECOVERY_ATTEMPT
            } else {
                ATTEMPT
            };
            let failed = self.append_round(&mut append, incoming, attempt).await;
            match append.end_round(started.elapsed().as_millis() as u64) {
                RoundEnd::Placed => break,
                RoundEnd::GiveUp => {
                    return Err(failed.err().unwrap_or_else(|| {
                        JournalError::JetStream("the append's budget is spent".into())
                    }))
                }
                RoundEnd::Again { after_ms } => {
                    metrics::counter!("pwsync_relay_jetstream_append_retries_total").increment(1);
                    if after_ms > 0 {
                        if let Err(e) = &failed {
                            tracing::debug!(error = %e, rounds = append.rounds(), "append failed; trying again");
                        }
                        tokio::time::sleep(Duration::from_millis(after_ms)).await;
                    }
                }
            }
        }
        let mut out = Applied {
            intake: append.intake().to_vec(),
            ..Applied::default()
        };
        tracing::trace!(
            rounds = append.rounds(),
            "append: published; raising registers"
        );
        let end = append.end().map_or(0, |o| o.0);
        self.next_offset.fetch_max(end + 1, Ordering::Relaxed);
        tracing::trace!("append: telling the other relays");
        if end > 0 {
            // Core NATS has no timeout of its own: never wait long for a hint.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                self.client.publish(
                    self.subjects.appended(),
                    Bytes::copy_from_slice(&end.to_be_bytes()),
                ),
            )
            .await;
        }
        // The registers live in the other stream, which may be the one whose leader was just
        // lost: tried again for as long as an attempt still ends within the apply's deadline
        // (the records are in; failing now only makes the agents send them again).
        let raising = started + APPLY_DEADLINE - ATTEMPT * 2;
        let raised =
            futures::future::join_all(append.registers().into_iter().map(|(register, seq)| {
                let subject = self.subjects.register(&register);
                async move { retried(raising, || self.raise(&subject, seq)).await }
            }))
            .await;
        for r in raised {
            r?;
        }
        out.ack = append.acks();
        let limit = self.next_offset().0;
        for (group, offset) in commits {
            if offset.0 < limit {
                let subject = self.subjects.cursor(group);
                let now = retried(raising, || self.raise(&subject, offset.0)).await?;
                out.advanced.insert(group.clone(), Offset(now));
            }
        }
        Ok(out)
    }

    /// One round of an append ([`super::chain`]): reads the stream's end and the batch's
    /// agents' last seqs, publishes the chain the node makes of them, and gives it the
    /// answers in order. Returns the round's first error, if any (the node knows the rest).
    /// Reads and sends are given up after `attempt`, and so is each publish's answer when
    /// `attempt` is the short one of a round after a failure.
    async fn append_round(
        &self,
        append: &mut ChainAppend,
        incoming: &[Incoming],
        attempt: Duration,
    ) -> Result<(), JournalError> {
        tracing::trace!(
            envelopes = incoming.len(),
            "append: reading the stream's end"
        );
        let agents = append.reading();
        // Reads are idempotent: one that does not answer soon is given up and tried again, so
        // the round after a new leader is elected is not held up by a request sent before.
        let read = tokio::time::timeout(attempt, async {
            let base = self.stream_info().await?.state.last_sequence;
            let reads = futures::future::join_all(agents.iter().map(|a| self.agent_last(a))).await;
            let seqs = reads.into_iter().collect::<Result<Vec<u64>, _>>()?;
            Ok::<_, JournalError>((base, seqs))
        })
        .await
        .unwrap_or_else(|_| {
            Err(JournalError::JetStream(format!(
                "reading the stream's end took more than {attempt:?}"
            )))
        });
        let (base, seqs) = match read {
            Ok(read) => read,
            Err(e) => {
                append.on_read_failed();
                return Err(e);
            }
        };
        let links = append.on_read(base, &seqs, || {
            format!(
                "{}.{}",
                self.id_prefix,
                self.next_id.fetch_add(1, Ordering::Relaxed)
            )
        });
        let now = wall_ms();
        let mut acks = Vec::new();
        let mut not_sent = None;
        for link in &links {
            let inc = &incoming[link.index];
            let publish = jetstream::message::PublishMessage::build()
                .payload(Bytes::from(inc.encode_record(now)))
                .message_id(&link.msg_id);
            let publish = match &link.expect {
                Expect::LastSequence(s) => publish.expected_last_sequence(*s),
                Expect::LastMsgId(id) => publish.expected_last_message_id(id),
            };
            // Sending waits while the client reconnects: bounded, like the reads. A publish
            // given up here that goes out later is refused by the chain's expectations, or
            // lands and is found by the next round's reads.
            let sent = tokio::time::timeout(
                attempt,
                self.js
                    .send_publish(self.subjects.record(&inc.agent), publish),
            )
            .await;
            match sent {
                Ok(Ok(ack)) => acks.push(ack),
                Ok(Err(e)) => {
                    not_sent = Some(js_err("appending", e));
                    break;
                }
                Err(_) => {
                    not_sent = Some(JournalError::JetStream(format!(
                        "appending: not sent within {attempt:?}"
                    )));
                    break;
                }
            }
        }
        // Answers in publish order, until the first failure: the server refuses every later
        // link (each expected the one before it as the stream's last), so they are not waited
        // for (a leader without a quorum answers none, and waiting for each in turn would
        // take the client's timeout as many times as the chain is long).
        for ack in acks {
            let answer = if attempt < ATTEMPT {
                tokio::time::timeout(attempt, ack).await.ok()
            } else {
                Some(ack.await)
            };
            let (answer, error) = match answer {
                None => (
                    Answer::Failed,
                    Some(JournalError::JetStream(format!(
                        "appending: no answer within {attempt:?}"
                    ))),
                ),
                Some(Ok(a)) => (
                    Answer::Stored {
                        sequence: a.sequence,
                    },
                    None,
                ),
                Some(Err(e)) => {
                    let refused = matches!(
                        e.kind(),
                        PublishErrorKind::WrongLastSequence | PublishErrorKind::WrongLastMessageId
                    );
                    let answer = if refused {
                        Answer::WrongLast
                    } else {
                        Answer::Failed
                    };
                    (answer, Some(js_err("appending", e)))
                }
            };
            if !append.on_answer(answer) {
                return Err(not_sent
                    .or(error)
                    .unwrap_or_else(|| JournalError::JetStream("appending failed".into())));
            }
        }
        match not_sent {
            Some(e) => {
                append.on_answer(Answer::Failed);
                Err(e)
            }
            None => Ok(()),
        }
    }

    pub async fn cursor(&self, group: &GroupName) -> Result<Offset, JournalError> {
        Ok(Offset(self.register(&self.subjects.cursor(group)).await?.0))
    }

    /// Up to `limit` records from `from` on (from the stream's first if `from` was pruned).
    pub async fn read_from(
        &self,
        from: Offset,
        limit: usize,
    ) -> Result<Vec<JournalEntry>, JournalError> {
        // After a failed read (no leader), a small one bounded by RECOVERY_ATTEMPT: the relay
        // asks again at its next turn, and the first read after the election is not held up
        // by a request the old leader will never answer.
        let failing = self.reads_failing.load(Ordering::Relaxed);
        let (deadline, limit) = if failing {
            (RECOVERY_ATTEMPT, limit.min(READ_AHEAD))
        } else {
            (READ_DEADLINE, limit)
        };
        let read = tokio::time::timeout(deadline, self.read_now(from, limit))
            .await
            .unwrap_or_else(|_| {
                Err(JournalError::JetStream(format!(
                    "reading records took more than {deadline:?}"
                )))
            });
        self.reads_failing.store(read.is_err(), Ordering::Relaxed);
        read
    }

    async fn read_now(
        &self,
        from: Offset,
        limit: usize,
    ) -> Result<Vec<JournalEntry>, JournalError> {
        let start = from.0.max(self.first_offset.load(Ordering::Relaxed)).max(1);
        let end = self.next_offset().0.min(start.saturating_add(limit as u64));
        let mut reads = futures::stream::iter(start..end)
            .map(|seq| async move { (seq, self.records.get_raw_message(seq).await) })
            .buffered(READ_AHEAD);
        let mut out = Vec::new();
        while let Some((seq, read)) = reads.next().await {
            match read {
                Ok(m) => out.push((Offset(seq), record_of(&m))),
                // Pruned (or removed by hand): not a record any more.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) if out.is_empty() => {
                    return Err(js_err(&format!("reading offset {seq}"), e));
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// The stream's first sequence as last read (every second or so): no record below it is
    /// held; the true first may be higher still.
    pub fn first_offset_known(&self) -> Offset {
        Offset(self.first_offset.load(Ordering::Relaxed).max(1))
    }

    pub async fn stats(&self) -> Result<JournalStats, JournalError> {
        let info = self.stream_info().await?;
        Ok(JournalStats {
            records: info.state.messages,
            bytes: info.state.bytes,
            first_offset: (info.state.messages > 0).then_some(info.state.first_sequence),
            next_offset: info.state.last_sequence + 1,
        })
    }

    pub async fn agents(&self) -> Result<BTreeMap<String, u64>, JournalError> {
        let state = self.state.clone();
        let subjects = subjects_of(
            state,
            format!("{}>", self.subjects.agent_prefix()),
            "listing agents",
        )
        .await?;
        let mut out = BTreeMap::new();
        for subject in subjects {
            let Some(name) = subject
                .strip_prefix(&self.subjects.agent_prefix())
                .and_then(unhex)
            else {
                continue;
            };
            let Ok(agent) = AgentId::new(name) else {
                continue;
            };
            out.insert(agent.to_string(), self.agent_last(&agent).await?);
        }
        Ok(out)
    }

    /// Returns when another relay has appended (never on its own: see [`Subjects::appended`]).
    pub async fn appended_elsewhere(&self) {
        self.appended_elsewhere.notified().await
    }

    /// The cursors and policies as last read, if read again since `generation`.
    pub fn shared(&self, generation: u64) -> Option<Shared> {
        let v = self.view();
        (v.generation != generation).then(|| Shared {
            generation: v.generation,
            cursors: v.cursors.clone(),
            policies: v.policies.clone(),
        })
    }

    /// Keeps a group's signed policy in the state stream, now, and (while the stream cannot
    /// take it: no leader after a restart or an election) again at every [`SLOW_REFRESH`]
    /// until it has; a newer one for the group replaces one still waiting.
    pub fn share_policy(self: &Arc<Self>, group: &GroupName, signed: &[u8]) {
        self.unshared_policies()
            .insert(group.clone(), signed.to_vec());
        let j = self.clone();
        tokio::spawn(async move { j.keep_policies().await });
    }

    fn unshared_policies(&self) -> std::sync::MutexGuard<'_, BTreeMap<GroupName, Vec<u8>>> {
        self.unshared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the policies waiting to be kept, one at a time and in order (so an older
    /// one never lands after a newer); failures are logged once per streak, with a count.
    async fn keep_policies(&self) {
        let _turn = self.keeping.lock().await;
        let waiting: Vec<(GroupName, Vec<u8>)> = self
            .unshared_policies()
            .iter()
            .map(|(g, b)| (g.clone(), b.clone()))
            .collect();
        for (group, bytes) in waiting {
            let subject = self.subjects.policy(&group);
            let sent = tokio::time::timeout(ATTEMPT, async {
                let ack = self
                    .js
                    .publish(subject, Bytes::from(bytes.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map(|_| ()).map_err(|e| match e.kind() {
                    PublishErrorKind::StreamNotFound => {
                        "no answer from the state stream (it has no leader now, or is not there yet)"
                            .to_string()
                    }
                    _ => e.to_string(),
                })
            })
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT:?}")));
            let mut log = self.policy_errors.lock().unwrap_or_else(|p| p.into_inner());
            match sent {
                Ok(()) => {
                    log.worked();
                    let mut unshared = self.unshared_policies();
                    if unshared.get(&group) == Some(&bytes) {
                        unshared.remove(&group);
                    }
                }
                Err(e) => {
                    log.failed(&e);
                    return;
                }
            }
        }
    }

    /// Reads the stream's state, the cursors (and, when `deep`, the policies, and prunes).
    async fn refresh(&self, declared: &[GroupName], retention_ms: u64, deep: bool) {
        let read = tokio::time::timeout(READ_DEADLINE, async {
            let info = self.stream_info().await?;
            let mut cursors = BTreeMap::new();
            for g in declared {
                cursors.insert(g.clone(), self.cursor(g).await?);
            }
            let mut policies = None;
            if deep {
                let mut found = Vec::new();
                for g in declared {
                    match self
                        .state
                        .get_last_raw_message_by_subject(&self.subjects.policy(g))
                        .await
                    {
                        Ok(m) => found.push((g.clone(), m.payload.to_vec())),
                        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                        Err(e) => return Err(js_err("reading a kept policy", e)),
                    }
                }
                policies = Some(found);
                self.prune(&info, &cursors, declared, retention_ms).await?;
            }
            Ok::<_, JournalError>((info, cursors, policies))
        })
        .await
        .unwrap_or_else(|_| {
            Err(JournalError::JetStream(format!(
                "reading the shared view took more than {READ_DEADLINE:?}"
            )))
        });
        let mut v = self.view();
        match read {
            Ok((info, cursors, policies)) => {
                v.generation += 1;
                v.read_at = Some(Instant::now());
                v.error = None;
                v.records = info.state.messages;
                v.bytes = info.state.bytes;
                let cluster = info.cluster.unwrap_or_default();
                v.leader = cluster.leader.clone();
                v.replicas = Replicas::of(&cluster);
                v.cursors = cursors;
                if let Some(p) = policies {
                    v.policies = p;
                }
            }
            Err(e) => v.error = Some(e.to_string()),
        }
    }

    /// Purges what every declared group has committed and is past retention.
    async fn prune(
        &self,
        info: &stream::Info,
        cursors: &BTreeMap<GroupName, Offset>,
        declared: &[GroupName],
        retention_ms: u64,
    ) -> Result<(), JournalError> {
        if declared.is_empty() || info.state.messages == 0 {
            return Ok(());
        }
        let Some(floor) = rules::prune_floor(
            declared
                .iter()
                .map(|g| cursors.get(g).map(|o| o.0).unwrap_or(0)),
        )
        .map(|f| f.min(info.state.last_sequence)) else {
            return Ok(());
        };
        let first = info.state.first_sequence;
        if floor < first {
            return Ok(());
        }
        let upto = if retention_ms == 0 {
            floor
        } else {
            // The newest record at or below the floor past retention (records are in time
            // order, so a binary search over the offsets finds it).
            let now = wall_ms();
            let (mut lo, mut hi, mut found) = (first, floor, None);
            let mut steps = 0;
            while lo <= hi && steps < 64 {
                steps += 1;
                let mid = lo + (hi - lo) / 2;
                let old = match self.records.get_raw_message(mid).await {
                    Ok(m) => record_of(&m)
                        .map(|r| rules::past_retention(r.received_ms, now, retention_ms))
                        .unwrap_or(true),
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => true,
                    Err(e) => return Err(js_err("reading for pruning", e)),
                };
                if old {
                    found = Some(mid);
                    lo = mid + 1;
                } else if mid == 0 {
                    break;
                } else {
                    hi = mid - 1;
                }
            }
            match found {
                Some(f) => f,
                None => return Ok(()),
            }
        };
        // No agent's highest journaled seq may go with its records: an append that stored
        // records and never raised their registers (its relay stopped in between) is covered
        // here, or the agent's resend of those seqs would be journaled again.
        let lasts = self.last_records().await?;
        for (register, seq) in chain::registers_before_purge(lasts, upto) {
            self.raise(&self.subjects.register(&register), seq).await?;
        }
        let purged = self
            .records
            .purge()
            .sequence(upto + 1)
            .await
            .map_err(|e| js_err("pruning", e))?;
        if purged.purged > 0 {
            metrics::counter!("pwsync_relay_journal_pruned_total").increment(purged.purged);
            tracing::debug!(records = purged.purged, through = upto, "journal pruned");
        }
        Ok(())
    }

    /// Per agent with a record held, its last record: (agent, offset, seq). One listing of
    /// the record subjects and one read per agent.
    async fn last_records(&self) -> Result<Vec<(AgentId, u64, u64)>, JournalError> {
        let prefix = self.subjects.record_prefix();
        let subjects = subjects_of(
            self.records.clone(),
            format!("{prefix}>"),
            "listing the agents with records",
        )
        .await?;
        let mut out = Vec::with_capacity(subjects.len());
        for subject in subjects {
            let Some(agent) = subject
                .strip_prefix(&prefix)
                .and_then(unhex)
                .and_then(|name| AgentId::new(name).ok())
            else {
                continue;
            };
            match self.records.get_last_raw_message_by_subject(&subject).await {
                Ok(m) => {
                    let seq = JournalRecord::decode(&m.payload)
                        .map(|r| r.seq.0)
                        .map_err(|e| js_err(&format!("the record at offset {}", m.sequence), e))?;
                    out.push((agent, m.sequence, seq));
                }
                // Purged since the listing.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(js_err(&format!("reading agent {agent}'s last record"), e)),
            }
        }
        Ok(out)
    }

    /// `/healthz`: the connection, a recent reading of the stream, and its quorum.
    pub fn checks(&self) -> Vec<Check> {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        let v = self.view();
        let fresh = v.read_at.is_some_and(|t| t.elapsed() < STALE_AFTER);
        let detail = match (&v.error, fresh) {
            (_, true) => format!(
                "stream {}: {} records, leader {}",
                self.subjects.stream,
                v.records,
                v.leader.as_deref().unwrap_or("-")
            ),
            (Some(e), false) => e.clone(),
            (None, false) => "no reading of the stream yet".into(),
        };
        let quorum = fresh && v.replicas.quorum();
        vec![
            Check::new(
                "jetstream",
                connected && fresh,
                if connected {
                    detail
                } else {
                    format!("not connected to NATS ({})", self.servers)
                },
            ),
            Check::new(
                "quorum",
                quorum,
                format!(
                    "{} of {} replicas current (configured {})",
                    v.replicas.current, v.replicas.peers, self.replicas
                ),
            ),
        ]
    }
}

/// Runs `step` until it succeeds, each attempt bounded by [`ATTEMPT`] (after a failure
/// [`RECOVERY_ATTEMPT`]) and followed after a
/// failure by [`RETRY_PAUSE`], as long as another attempt can start before `until`; then its
/// last error. For steps that may be repeated (reads, compare-and-set writes).
async fn retried<T, F, Fut>(until: Instant, mut step: F) -> Result<T, JournalError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, JournalError>>,
{
    let mut attempt = ATTEMPT;
    loop {
        let e = match tokio::time::timeout(attempt, step()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => JournalError::JetStream(format!("no answer within {attempt:?}")),
        };
        attempt = RECOVERY_ATTEMPT;
        if Instant::now() + RETRY_PAUSE >= until {
            return Err(e);
        }
        metrics::counter!("pwsync_relay_jetstream_append_retries_total").increment(1);
        tracing::debug!(error = %e, "journal step failed; trying again");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// The subjects of `stream` that match `filter` and hold a message now.
async fn subjects_of(
    stream: stream::Stream,
    filter: String,
    what: &str,
) -> Result<Vec<String>, JournalError> {
    stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| js_err(what, e))?
        .map(|s| s.map(|(subject, _)| subject))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| js_err(what, e))
}

fn context(client: &async_nats::Client, cfg: &JetStreamConfig) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(cfg.timeout_secs.max(1)))
        .max_ack_inflight(8192)
        .backpressure_on_inflight(true)
        .build(client.clone())
}

/// A record as read back, with the stream's own time of appending it as its journal time: the
/// time the stream leader stamped, so every relay delivers the same time for it and one relay's
/// clock running behind cannot make its records look captured earlier than they were (the
/// consumer bounds capture times by the journal time).
fn record_of(
    m: &jetstream::message::StreamMessage,
) -> Result<JournalRecord, pwsync_proto::DecodeError> {
    let mut rec = JournalRecord::decode(&m.payload)?;
    let ms = m.time.unix_timestamp_nanos() / 1_000_000;
    if let Ok(ms) = u64::try_from(ms) {
        rec.received_ms = ms;
    }
    Ok(rec)
}

fn random_prefix() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    let _ = aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!(
        "{}{nanos:x}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_hex_tokens_and_round_trip() {
        let s = Subjects {
            stream: "PWSYNC".into(),
        };
        let a = AgentId::new("host1.example.org").unwrap();
        assert_eq!(s.record(&a), "PWSYNC.r.686f7374312e6578616d706c652e6f7267");
        let tail = s.agent_seq(&a);
        let name = tail.strip_prefix(&s.agent_prefix()).and_then(unhex);
        assert_eq!(name.as_deref(), Some("host1.example.org"));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("6"), None);
    }
}
