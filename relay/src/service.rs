//! The relay's main loop: intake of envelopes, signed acks to agents, signed deliveries to
//! consumer groups, and their commits.
//!
//! The relay is an ordinary MQTT client of the broker (embedded or external). Each turn of the
//! loop takes every message waiting, checks each one (topic, decoding, each envelope of an
//! agent's batch on its own with the agent's signature, the group's signature), writes all of
//! them to the journal in one transaction, and only then acks the agents and the broker. A
//! message or envelope that fails a check is counted by reason, logged, and dropped; the loop
//! goes on.
//!
//! What to do with each message (a commit or a hello, whom to ack, when a group is sent
//! everything again, what to deliver) is decided by [`crate::node::RelayNode`], without I/O;
//! this loop moves bytes between the broker, the journal and the node, and signs.

use crate::config::RelayConfig;
use crate::journal::{Applied, DeclaredGroups, Incoming, Intake, Journal, JournalError};
use crate::liveness::Liveness;
use crate::node::{CommitKind, RelayNode};
use pwsync_proto::agents::{AgentKeys, Refusal};
use pwsync_proto::hlc::{wall_ms, Hlc, MAX_FORWARD_DRIFT_MS};
use pwsync_proto::signed::{self, Ack, Commit};
use pwsync_proto::topics::{self, Topic};
use pwsync_proto::{
    AgentId, Envelope, GroupName, HybridClock, Offset, Seq, SigningKey, Untrusted, VerifyingKey,
};
use pwsync_runtime::repeated::Repeated;
use pwsync_runtime::{monotonic_ms, poll_broker, BrokerEvent};
use rumqttc::{AsyncClient, Publish, QoS};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Why a message was dropped. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    WrongTopic,
    Malformed,
    Oversized,
    UnknownVersion,
    AgentMismatch,
    UnknownAgent,
    BadSignature,
    OutOfOrder,
    UndeclaredGroup,
    BadCommit,
    BadCertificate,
    Revoked,
}

impl Rejection {
    pub const ALL: [Rejection; 12] = [
        Rejection::BadCertificate,
        Rejection::Revoked,
        Rejection::WrongTopic,
        Rejection::Malformed,
        Rejection::Oversized,
        Rejection::UnknownVersion,
        Rejection::AgentMismatch,
        Rejection::UnknownAgent,
        Rejection::BadSignature,
        Rejection::OutOfOrder,
        Rejection::UndeclaredGroup,
        Rejection::BadCommit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::WrongTopic => "wrong_topic",
            Rejection::Malformed => "malformed",
            Rejection::Oversized => "oversized",
            Rejection::UnknownVersion => "unknown_version",
            Rejection::AgentMismatch => "agent_mismatch",
            Rejection::UnknownAgent => "unknown_agent",
            Rejection::BadSignature => "bad_signature",
            Rejection::OutOfOrder => "out_of_order",
            Rejection::UndeclaredGroup => "undeclared_group",
            Rejection::BadCommit => "bad_commit",
            Rejection::BadCertificate => "bad_certificate",
            Rejection::Revoked => "revoked",
        }
    }
}

/// Counters the relay keeps (and logs at shutdown).
#[derive(Debug, Default)]
pub struct Counters {
    /// The relay's own client is connected to the broker.
    pub broker_connected: std::sync::atomic::AtomicBool,
    pub journaled: AtomicU64,
    pub duplicates: AtomicU64,
    pub acks_sent: AtomicU64,
    pub delivered: AtomicU64,
    pub redelivery_rounds: AtomicU64,
    /// Batches the journal did not take (their agents send them again).
    pub journal_errors: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
}

impl Counters {
    pub fn reject(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why as usize].load(Ordering::Relaxed)
    }
}

/// One consumer group as the shell holds it: how to reach it and check its commits (its
/// delivery window is in [`RelayNode`]).
struct Group {
    key: VerifyingKey,
    topic: String,
    window: u16,
    redelivery_ms: u64,
}

/// A group as the config declares it, its key loaded: what [`Relay::new`] starts with and a
/// reload ([`GroupsChange`]) replaces.
pub struct GroupSettings {
    pub name: GroupName,
    pub key: VerifyingKey,
    pub window: u16,
    pub redelivery_ms: u64,
}

impl GroupSettings {
    /// Every group of `cfg`, each with its public key loaded.
    pub fn load_all(cfg: &RelayConfig) -> anyhow::Result<Vec<GroupSettings>> {
        cfg.groups
            .iter()
            .map(|(name, g)| {
                Ok(GroupSettings {
                    name: name.clone(),
                    key: VerifyingKey::load(&g.public_key)
                        .map_err(|e| anyhow::anyhow!("group {name}: {e}"))?,
                    window: g.window,
                    redelivery_ms: g.redelivery_secs.max(1).saturating_mul(1000),
                })
            })
            .collect()
    }
}

/// A reload's new groups, for the running relay's loop to take between two turns; `done` hears
/// what changed, or why nothing did.
pub struct GroupsChange {
    pub groups: Vec<GroupSettings>,
    pub done: tokio::sync::oneshot::Sender<Result<String, String>>,
}

impl Group {
    /// The shell's part of `settings`; the node is told to deliver from after `committed`.
    fn declare(settings: GroupSettings, committed: Offset, node: &mut RelayNode) -> Group {
        node.declare(
            settings.name.clone(),
            committed,
            settings.window,
            settings.redelivery_ms,
            monotonic_ms(),
        );
        Group {
            topic: topics::down(&settings.name),
            key: settings.key,
            window: settings.window,
            redelivery_ms: settings.redelivery_ms,
        }
    }
}

pub struct Relay {
    journal: Arc<Journal>,
    agents: Arc<AgentKeys>,
    signing: Arc<SigningKey>,
    clock: HybridClock,
    groups: BTreeMap<GroupName, Group>,
    /// The decisions: delivery windows, commits, whom to ack ([`crate::node`]).
    node: RelayNode,
    /// The same names as `groups`, shared with the journal, the tools and /metrics.
    declared: DeclaredGroups,
    retention_ms: u64,
    pub counters: Arc<Counters>,
    liveness: Arc<Liveness>,
    clocks: AgentClocks,
    /// The groups' password policies, kept and published again ([`crate::policies`]).
    policies: crate::policies::Policies,
    /// Batches the journal did not take, and reads of it that failed: each logged once per
    /// streak with a count ([`Repeated`]), not at every attempt.
    apply_errors: Repeated,
    read_errors: Repeated,
    /// The policies last read from a shared journal, as offered to `policies`.
    shared_policies: BTreeMap<GroupName, Vec<u8>>,
    shared_generation: u64,
}

/// How long a reload waits for an added group's cursor.
const CURSOR_READ_ON_RELOAD: Duration = Duration::from_secs(2);

/// Most messages taken into one journal transaction.
const MAX_BATCH: usize = 4096;

impl Relay {
    pub async fn new(
        cfg: &RelayConfig,
        journal: Arc<Journal>,
        declared: DeclaredGroups,
        signing: SigningKey,
        liveness: Arc<Liveness>,
    ) -> anyhow::Result<Relay> {
        let mut groups = BTreeMap::new();
        let mut node = RelayNode::new();
        for settings in GroupSettings::load_all(cfg)? {
            // A shared journal has just read every cursor (and waited for the cluster to answer).
            let name = settings.name.clone();
            let committed = match journal
                .shared(0)
                .and_then(|s| s.cursors.get(&name).copied())
            {
                Some(c) => c,
                None => journal.cursor(&name).await?,
            };
            groups.insert(name, Group::declare(settings, committed, &mut node));
        }
        declared.replace(groups.keys().cloned().collect());
        let policies = crate::policies::Policies::open(
            &cfg.journal.dir,
            groups.iter().map(|(name, g)| (name, &g.key)),
        );
        Ok(Relay {
            policies,
            journal,
            agents: Arc::new(cfg.agent_keys()?),
            signing: Arc::new(signing),
            clock: HybridClock::default(),
            declared,
            groups,
            node,
            retention_ms: cfg.journal.retention_secs.saturating_mul(1000),
            counters: Arc::new(Counters::default()),
            liveness,
            clocks: AgentClocks::default(),
            apply_errors: Repeated::new(
                "the journal did not take a batch; its agents are told to send it again",
                tracing::Level::ERROR,
            ),
            read_errors: Repeated::new("cannot read the journal", tracing::Level::ERROR),
            shared_policies: BTreeMap::new(),
            shared_generation: 0,
        })
    }

    /// Runs until `shutdown` turns true, as a client of the broker `options` lead to.
    ///
    /// Intake is a two-stage pipeline: while one batch is being written to the journal (on a
    /// blocking thread, fsync included), the next is received and its signatures checked. Only
    /// one journal transaction is in flight at a time, so batches are journaled in the order they
    /// arrived, and nothing is acked before the transaction holding it has committed.
    pub async fn run(
        mut self,
        options: rumqttc::MqttOptions,
        mut changes: mpsc::UnboundedReceiver<GroupsChange>,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        let (host, port) = options.broker_address();
        let options_for_log = options.clone();
        let (client, eventloop) = pwsync_runtime::mqtt_client(options, 8192);
        let (tx, mut events) = mpsc::unbounded_channel();
        let poller = tokio::spawn(poll_broker(
            eventloop,
            tx,
            Duration::from_secs(5),
            pwsync_runtime::failover::Failover::new(vec![options_for_log]),
            Arc::new(tokio::sync::Notify::new()),
        ));
        let mut connected = false;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut disconnect_logged = false;
        let mut ready = Checked::default();
        let mut journaling: Option<Journaling> = None;
        let mut republished = Instant::now() - crate::policies::REPUBLISH;
        let journal = self.journal.clone();
        loop {
            let mut batch = Vec::new();
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
                Some(change) = changes.recv() => {
                    let outcome = self.change_groups(change.groups).await;
                    let _ = change.done.send(outcome);
                }
                // Records another relay appended: delivered now, not at the next tick.
                _ = journal.appended_elsewhere() => {}
                applied = journaled(&mut journaling) => {
                    if let Some(done) = journaling.take() {
                        match applied {
                            Ok(applied) => {
                                self.apply_errors.worked();
                                self.finish_journaling(&client, done.checked, applied).await
                            }
                            Err(e) => self.journaling_failed(&client, done.checked, e).await,
                        }
                    }
                }
                ev = events.recv() => match ev {
                    None => break,
                    Some(BrokerEvent::Connected { .. }) => {
                        connected = true;
                        disconnect_logged = false;
                        if let Err(e) = client.subscribe_many([topics::ALL_UP, topics::ALL_COMMIT, topics::ALL_POLICY].map(|t| rumqttc::SubscribeFilter::new(t.into(), QoS::AtLeastOnce))).await {
                            tracing::error!(error = %e, "cannot subscribe");
                        }
                        self.node.on_connected(monotonic_ms());
                    }
                    Some(BrokerEvent::Subscribed) => {
                        // The embedded broker's end of this connection (see broker.rs).
                        crate::broker::set_nodelay_everywhere();
                        tracing::info!(broker = %format!("{host}:{port}"), "relay subscribed at the broker; taking envelopes and commits");
                    }
                    Some(BrokerEvent::Disconnected(e)) => {
                        if !disconnect_logged {
                            tracing::warn!(error = %e, "broker connection lost; reconnecting");
                            disconnect_logged = true;
                        }
                        connected = false;
                    }
                    Some(BrokerEvent::Message(p)) => {
                        batch.push(p);
                        while batch.len() < MAX_BATCH {
                            match events.try_recv() {
                                Ok(BrokerEvent::Message(p)) => batch.push(p),
                                Ok(BrokerEvent::Connected { .. }) | Ok(BrokerEvent::Subscribed) => { connected = true; }
                                Ok(BrokerEvent::Disconnected(_)) => { connected = false; }
                                Err(_) => break,
                            }
                        }
                    }
                }
            }
            self.counters
                .broker_connected
                .store(connected, Ordering::Relaxed);
            if !batch.is_empty() {
                let checked = self.check(batch).await;
                ready.append(checked);
            }
            if journaling.is_none() && !ready.is_empty() {
                journaling = self
                    .start_journaling(&client, std::mem::take(&mut ready))
                    .await;
            }
            self.take_shared();
            if connected {
                self.redeliver_overdue();
                self.deliver(&client).await;
                if republished.elapsed() >= crate::policies::REPUBLISH {
                    republished = Instant::now();
                    for (topic, bytes) in self.policies.all() {
                        let _ = client.try_publish(topic, QoS::AtLeastOnce, false, bytes);
                    }
                }
            }
        }
        if let Some(last) = journaling.take() {
            // Let the transaction in flight finish, so what it holds is acked now rather than
            // sent again after the restart.
            match last.task.await {
                Ok(Ok(applied)) => self.finish_journaling(&client, last.checked, applied).await,
                Ok(Err(e)) => self.journaling_failed(&client, last.checked, e).await,
                Err(e) => {
                    tracing::error!(error = %e, "the last journal transaction did not finish")
                }
            }
        }
        let _ = client.try_disconnect();
        poller.abort();
        Ok(())
    }

    /// Sorts a batch of broker messages and checks each: envelopes (decoding, the agent's
    /// certificate or key, the signature; on blocking threads, split across them) and commits
    /// (the group's signature). What fails a check is counted, logged and left out; its broker
    /// message is still acked, since sending it again would not make it pass.
    async fn check(&mut self, batch: Vec<Publish>) -> Checked {
        let received = Instant::now();
        let mut checked = Checked::default();
        let mut envelopes = Vec::new();
        for p in &batch {
            match topics::parse(&p.topic) {
                Some(Topic::Up(agent)) => match pwsync_proto::batch::envelopes_in(&p.payload) {
                    Ok(list) => envelopes.extend(
                        list.into_iter()
                            .map(|e| (agent.clone(), p.payload.slice_ref(e))),
                    ),
                    Err(e) => {
                        let why = rejection_for(&e);
                        self.counters.reject(why);
                        tracing::warn!(%agent, reason = why.as_str(), detail = %Untrusted(&e.to_string()), "rejected a batch of envelopes");
                    }
                },
                Some(Topic::Commit(group)) => {
                    let Some(g) = self.groups.get(&group) else {
                        self.counters.reject(Rejection::UndeclaredGroup);
                        tracing::warn!(%group, "commit from a group not declared in the config; ignored");
                        continue;
                    };
                    match signed::verify::<Commit>(&p.payload, &g.key) {
                        Ok(c) if c.group == group => {
                            match self.node.commit_kind(&group, c.offset) {
                                Some(CommitKind::Advance) => {
                                    checked.commits.push((group, c.offset))
                                }
                                Some(CommitKind::Hello) => checked.hellos.push(group),
                                None => {}
                            }
                        }
                        Ok(c) => {
                            self.counters.reject(Rejection::BadCommit);
                            tracing::warn!(%group, says = %c.group, "commit names another group; ignored");
                        }
                        Err(e) => {
                            self.counters.reject(Rejection::BadCommit);
                            tracing::warn!(%group, error = %Untrusted(&e.to_string()), "commit does not verify with the group's key; ignored");
                        }
                    }
                }
                Some(Topic::Policy(group)) => match self.groups.get(&group) {
                    Some(g) => {
                        if self.policies.offer(&group, &g.key, &p.payload) {
                            tracing::debug!(%group, "kept the group's password policy");
                            self.journal.share_policy(&group, &p.payload);
                        }
                    }
                    None => {
                        tracing::warn!(%group, "a password policy from a group not declared in the config; ignored");
                    }
                },
                _ => {
                    self.counters.reject(Rejection::WrongTopic);
                    tracing::warn!(topic = ?Untrusted(&p.topic), "message on a topic the relay does not take; ignored");
                }
            }
        }
        for (agent, result) in check_envelopes(&self.agents, envelopes).await {
            match result {
                Ok(inc) => checked.incoming.push(inc),
                Err((why, detail)) => {
                    self.counters.reject(why);
                    tracing::warn!(%agent, reason = why.as_str(), detail = %Untrusted(&detail), "rejected an envelope");
                }
            }
        }
        checked.publishes = batch;
        checked.received = Some(received);
        checked
    }

    /// Starts the journal transaction for `checked` on a blocking thread. A batch with nothing
    /// to journal (only hellos, or only rejected messages) is settled at once.
    async fn start_journaling(
        &mut self,
        client: &AsyncClient,
        checked: Checked,
    ) -> Option<Journaling> {
        if checked.incoming.is_empty() && checked.commits.is_empty() {
            self.finish_journaling(client, checked, Applied::default())
                .await;
            return None;
        }
        let journal = self.journal.clone();
        let declared = self.declared.get();
        let retention = self.retention_ms;
        let incoming = checked.incoming.clone();
        let commits = checked.commits.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let applied = journal.apply(incoming, commits, declared, retention).await;
            metrics::histogram!("pwsync_relay_journal_commit_seconds")
                .record(started.elapsed().as_secs_f64());
            applied
        });
        Some(Journaling { checked, task })
    }

    /// After the journal transaction for `checked` committed: counts, signed acks to the agents,
    /// cursors, hellos, and the broker's acks for every message of the batch.
    async fn finish_journaling(
        &mut self,
        client: &AsyncClient,
        checked: Checked,
        applied: Applied,
    ) {
        for (inc, intake) in checked.incoming.iter().zip(&applied.intake) {
            match intake {
                Intake::Appended(_) => {
                    self.counters.journaled.fetch_add(1, Ordering::Relaxed);
                    self.clocks.note(&inc.agent, inc.hlc, &self.liveness);
                }
                Intake::Duplicate => {
                    self.counters.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                Intake::OutOfOrder { expected } => {
                    self.counters.reject(Rejection::OutOfOrder);
                    tracing::debug!(agent = %inc.agent, seq = %inc.seq, %expected, "out-of-order envelope dropped");
                }
            }
        }
        let end = self.journal.next_offset();
        for (agent, seq) in self
            .node
            .on_journaled(&applied, &checked.hellos, end, monotonic_ms())
        {
            self.send_ack(client, &agent, seq);
        }
        if applied.pruned > 0 {
            tracing::debug!(records = applied.pruned, "journal pruned");
        }
        if let (Some(received), false) = (checked.received, checked.incoming.is_empty()) {
            metrics::histogram!("pwsync_relay_intake_to_ack_seconds")
                .record(received.elapsed().as_secs_f64());
        }
        for p in &checked.publishes {
            let _ = client.ack(p).await;
        }
    }

    /// Signs and queues an ack: `agent`'s envelopes through `seq` are in the journal.
    fn send_ack(&mut self, client: &AsyncClient, agent: &AgentId, seq: Seq) {
        let ack = Ack {
            agent: agent.clone(),
            seq,
            relay_hlc: self.clock.now(),
        };
        match signed::sign(&ack, &self.signing) {
            Ok(bytes) => {
                match client.try_publish(topics::ack(agent), QoS::AtLeastOnce, false, bytes) {
                    Ok(()) => {
                        self.counters.acks_sent.fetch_add(1, Ordering::Relaxed);
                        tracing::trace!(%agent, %seq, "ack queued");
                    }
                    Err(e) => {
                        tracing::debug!(%agent, error = %e, "ack not queued; the agent will send again")
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot sign an ack"),
        }
    }

    /// A batch the journal could not take: nothing of it is acked, and commits are taken again
    /// at the group's next one. Each agent of the batch this relay has acked before is told
    /// again where it stands (the seq it was last acked, which is durable): an ack that does
    /// not move its window makes it send everything outstanding again at once
    /// ([`pwsync_proto::window::AckEffect::Resend`]), rather than after its ack timeout. An
    /// agent this relay never acked sends again after its timeout. The broker's messages are
    /// still acked, since the agents' own copies are what counts.
    async fn journaling_failed(&mut self, client: &AsyncClient, checked: Checked, e: JournalError) {
        self.counters.journal_errors.fetch_add(1, Ordering::Relaxed);
        self.apply_errors.failed(&e);
        let told = self
            .node
            .on_journal_failed(checked.incoming.iter().map(|inc| &inc.agent));
        for (agent, seq) in told {
            self.send_ack(client, &agent, seq);
        }
        for p in &checked.publishes {
            let _ = client.ack(p).await;
        }
    }

    /// Cursors moved and policies kept by other relays sharing the journal.
    fn take_shared(&mut self) {
        let Some(shared) = self.journal.shared(self.shared_generation) else {
            return;
        };
        self.shared_generation = shared.generation;
        self.node
            .on_shared_cursors(&shared.cursors, self.journal.next_offset(), monotonic_ms());
        for (group, bytes) in shared.policies {
            // Each kept copy is looked at once (a bad one would otherwise be warned about at
            // every turn).
            if self.shared_policies.get(&group) == Some(&bytes) {
                continue;
            }
            if let Some(g) = self.groups.get(&group) {
                self.policies.offer(&group, &g.key, &bytes);
            }
            self.shared_policies.insert(group, bytes);
        }
    }

    /// Takes a reload's groups. An added group is delivered from its committed cursor (from
    /// the journal's first record if it never committed; a prune already under way when it was
    /// added may still delete what no other group held); a removed one gets nothing more and no
    /// longer holds records (its cursor stays in the journal, for when it is declared again); a
    /// kept one whose key, window or redelivery time changed takes them and is sent what is
    /// outstanding again. Every cursor is read before anything changes, so a journal that does
    /// not answer leaves the running groups as they were. Says what changed.
    async fn change_groups(&mut self, new: Vec<GroupSettings>) -> Result<String, String> {
        let mut committed = BTreeMap::new();
        for g in &new {
            let at = match self.node.committed(&g.name) {
                Some(running) => running,
                // Bounded: the loop takes nothing else meanwhile (a cluster without a leader
                // would hold it for the journal's whole timeout).
                None => tokio::time::timeout(CURSOR_READ_ON_RELOAD, self.journal.cursor(&g.name))
                    .await
                    .unwrap_or_else(|_| {
                        Err(JournalError::JetStream(format!(
                            "no answer within {CURSOR_READ_ON_RELOAD:?}"
                        )))
                    })
                    .map_err(|e| {
                        format!(
                            "cannot read group {}'s cursor from the journal ({e}); the running groups stay",
                            g.name
                        )
                    })?,
            };
            committed.insert(g.name.clone(), at);
        }
        let (mut added, mut changed) = (Vec::new(), Vec::new());
        let mut groups = BTreeMap::new();
        for settings in new {
            let name = settings.name.clone();
            let group = match self.groups.remove(&name) {
                Some(running)
                    if running.key == settings.key
                        && running.window == settings.window
                        && running.redelivery_ms == settings.redelivery_ms =>
                {
                    running
                }
                Some(_) => {
                    changed.push(name.to_string());
                    let at = committed.get(&name).copied().unwrap_or(Offset(0));
                    Group::declare(settings, at, &mut self.node)
                }
                None => {
                    added.push(name.to_string());
                    let at = committed.get(&name).copied().unwrap_or(Offset(0));
                    Group::declare(settings, at, &mut self.node)
                }
            };
            groups.insert(name, group);
        }
        let removed: Vec<String> = self.groups.keys().map(|g| g.to_string()).collect();
        for g in self.groups.keys() {
            self.node.forget(g);
        }
        self.groups = groups;
        self.declared.replace(self.groups.keys().cloned().collect());
        self.policies
            .regroup(self.groups.iter().map(|(name, g)| (name, &g.key)));
        // Policies other relays kept for an added or re-keyed group are offered at the next turn.
        self.shared_policies
            .retain(|g, _| !added.iter().chain(&changed).any(|a| a == g.as_str()));
        self.shared_generation = 0;
        for g in &removed {
            tracing::warn!(group = %g, "group removed by a reload: it gets nothing more, and records it has not committed are no longer kept for it");
        }
        Ok(format!(
            "groups added {added:?}, removed {removed:?}, changed {changed:?}, {} in all",
            self.groups.len()
        ))
    }

    fn redeliver_overdue(&mut self) {
        for (group, from, outstanding) in self.node.redeliver_overdue(monotonic_ms()) {
            tracing::info!(%group, %from, outstanding, "no commit in time; delivering again");
            self.counters
                .redelivery_rounds
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends each group what the node plans from the journal, until its window is full, it has
    /// everything, or the client's queue is full.
    async fn deliver(&mut self, client: &AsyncClient) {
        let end = self.journal.next_offset();
        for (name, g) in &self.groups {
            while let Some((from, want)) = self.node.wants(name, end) {
                let records = match self.journal.read_from(from, want).await {
                    Ok(r) => {
                        self.read_errors.worked();
                        r
                    }
                    Err(e) => {
                        self.read_errors.failed(&e);
                        return;
                    }
                };
                let journal = &self.journal;
                let step = self
                    .node
                    .plan(name, from, records, || journal.held_from().ok().flatten());
                if let Some(next) = step.pruned {
                    let notice = signed::Pruned {
                        group: name.clone(),
                        next,
                    };
                    if !publish_signed(client, &self.signing, &g.topic, &notice) {
                        return;
                    }
                }
                for delivery in step.deliveries {
                    if !publish_signed(client, &self.signing, &g.topic, &delivery) {
                        return;
                    }
                    self.counters
                        .delivered
                        .fetch_add(delivery.records.len() as u64, Ordering::Relaxed);
                    self.node.sent(&delivery, monotonic_ms());
                }
                if step.stop {
                    break;
                }
            }
        }
    }
}

/// Signs `message` with the relay's key and queues it on `topic`. False if it could not be
/// queued (the client's queue is full, or signing failed): the rest waits for a later turn.
fn publish_signed<T: signed::SignedMessage>(
    client: &AsyncClient,
    signing: &SigningKey,
    topic: &str,
    message: &T,
) -> bool {
    match signed::sign(message, signing) {
        Ok(bytes) => client
            .try_publish(topic, QoS::AtLeastOnce, false, bytes)
            .is_ok(),
        Err(e) => {
            tracing::error!(error = %e, "cannot sign a message to a group");
            false
        }
    }
}

/// Messages of one or more broker batches, checked and waiting for the journal.
#[derive(Default)]
struct Checked {
    incoming: Vec<Incoming>,
    commits: Vec<(GroupName, Offset)>,
    hellos: Vec<GroupName>,
    /// The broker's messages, acked (PUBACK) once the journal holds what they carried.
    publishes: Vec<Publish>,
    /// When the oldest of them was taken from the broker.
    received: Option<Instant>,
}

impl Checked {
    fn append(&mut self, mut more: Checked) {
        self.received = self.received.or(more.received);
        self.incoming.append(&mut more.incoming);
        self.commits.append(&mut more.commits);
        self.hellos.append(&mut more.hellos);
        self.publishes.append(&mut more.publishes);
    }

    fn is_empty(&self) -> bool {
        self.publishes.is_empty()
    }
}

/// The journal transaction in flight and what it was started for.
struct Journaling {
    checked: Checked,
    task: tokio::task::JoinHandle<Result<Applied, JournalError>>,
}

/// The outcome of the journal transaction in flight; never ready when there is none.
async fn journaled(slot: &mut Option<Journaling>) -> Result<Applied, JournalError> {
    match slot {
        Some(j) => (&mut j.task)
            .await
            .map_err(|e| JournalError::Task(e.to_string()))?,
        None => std::future::pending().await,
    }
}

/// How often the relay logs, per agent, that the agent's clock runs ahead.
const CLOCK_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What the relay knows of its agents' clocks: each journaled envelope's HLC against the
/// relay's own time. A host whose clock runs ahead by more than [`MAX_FORWARD_DRIFT_MS`] is
/// shown by `pwsync-relay agents`, counted (`pwsync_relay_clock_ahead_total{agent}`) and logged
/// (at most once a minute per agent). Its changes are still journaled: consumers order them by
/// the relay's journal time instead (see [`signed::Delivery`]).
#[derive(Default)]
struct AgentClocks {
    warned: BTreeMap<AgentId, Instant>,
}

impl AgentClocks {
    fn note(&mut self, agent: &AgentId, hlc: Hlc, liveness: &Liveness) {
        let ahead_ms = hlc.physical_ms().saturating_sub(wall_ms());
        liveness.clock(agent, ahead_ms);
        if ahead_ms <= MAX_FORWARD_DRIFT_MS {
            return;
        }
        metrics::counter!("pwsync_relay_clock_ahead_total", "agent" => agent.to_string())
            .increment(1);
        let due = self
            .warned
            .get(agent)
            .is_none_or(|t| t.elapsed() >= CLOCK_WARNING_EVERY);
        if due {
            self.warned.insert(agent.clone(), Instant::now());
            let ahead_s = ahead_ms / 1000;
            tracing::warn!(%agent, ahead_s, "this agent's clock runs ahead of the relay's; its changes are ordered by the relay's time (fix the host's clock)");
        }
    }
}

/// Fewest envelopes worth a second thread for their signature checks.
const PARALLEL_CHECK_FROM: usize = 32;

/// Checks envelopes on blocking threads (two halves in parallel when there are many), in order.
async fn check_envelopes(
    agents: &Arc<AgentKeys>,
    mut envelopes: Vec<(AgentId, bytes::Bytes)>,
) -> Vec<(AgentId, Result<Incoming, (Rejection, String)>)> {
    let check_all = |agents: Arc<AgentKeys>, part: Vec<(AgentId, bytes::Bytes)>| {
        tokio::task::spawn_blocking(move || {
            part.into_iter()
                .map(|(agent, payload)| {
                    let r = check_envelope(&agents, &agent, &payload);
                    (agent, r)
                })
                .collect::<Vec<_>>()
        })
    };
    let second = (envelopes.len() >= PARALLEL_CHECK_FROM)
        .then(|| check_all(agents.clone(), envelopes.split_off(envelopes.len() / 2)));
    let mut out = check_all(agents.clone(), envelopes)
        .await
        .unwrap_or_default();
    if let Some(second) = second {
        out.extend(second.await.unwrap_or_default());
    }
    out
}

/// One envelope from `agent`'s topic: it decodes, names that agent, comes from an agent whose
/// certificate or key file is good and not revoked, and its signature verifies.
fn check_envelope(
    agents: &AgentKeys,
    agent: &AgentId,
    payload: &[u8],
) -> Result<Incoming, (Rejection, String)> {
    let env = Envelope::decode(payload).map_err(|e| (rejection_for(&e), e.to_string()))?;
    if env.agent() != agent {
        return Err((
            Rejection::AgentMismatch,
            format!("envelope says agent {}, topic says {agent}", env.agent()),
        ));
    }
    let key = agents
        .speaker(&env)
        .map_err(|e| {
            let why = match e.refusal() {
                Refusal::Revoked => Rejection::Revoked,
                Refusal::BadCertificate => Rejection::BadCertificate,
                Refusal::UnknownAgent => Rejection::UnknownAgent,
            };
            (why, e.to_string())
        })?
        .key;
    if !env.verify(&key) {
        return Err((
            Rejection::BadSignature,
            format!(
                "envelope seq {} does not verify with agent {agent}'s key",
                env.seq()
            ),
        ));
    }
    Ok(Incoming {
        agent: agent.clone(),
        seq: env.seq(),
        hlc: env.header().hlc,
        envelope: payload.to_vec(),
    })
}

/// The counter for input that does not decode.
fn rejection_for(e: &pwsync_proto::DecodeError) -> Rejection {
    match e {
        pwsync_proto::DecodeError::TooLarge { .. } => Rejection::Oversized,
        pwsync_proto::DecodeError::UnknownVersion { .. } => Rejection::UnknownVersion,
        _ => Rejection::Malformed,
    }
}
