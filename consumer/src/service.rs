//! `pwsync-consumer run`: the MQTT side (async) and the pipeline thread (blocking: targets
//! write files and run programs), joined by two channels.
//!
//! The MQTT task receives deliveries on `down/{group}` and hands them, in arrival order, to the
//! unsealing thread (signatures and decryption, [`crate::unseal`]), which hands them on to the
//! pipeline thread: the CPU-heavy opening of the next deliveries overlaps with applying and
//! flushing the previous ones. The pipeline processes everything waiting, flushes its state in one
//! transaction, and only then hands back the new committed offset, which the MQTT task
//! publishes as a signed commit. On connect, and whenever the pipeline sees a gap, the consumer
//! commits the offset it stands at, which makes the relay send again from there.

use crate::pipeline::{Pipeline, Taken};
use crate::unseal::Unsealer;
use pwsync_proto::signed::{self, Commit};
use pwsync_proto::{topics, GroupName, Offset, SigningKey};
use pwsync_runtime::{mqtt_client, poll_broker, BrokerEvent};
use rumqttc::QoS;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// From the pipeline thread to the MQTT task.
#[derive(Debug)]
pub enum Report {
    /// Everything up to here is durable: commit it.
    Committed(Offset),
    /// A delivery came past a gap: tell the relay where we stand.
    Behind(Offset),
}

/// What the operator asks of the pipeline thread, answered between two deliveries.
pub enum PipelineCommand {
    /// A command from the admin socket ([`crate::admin::answer`]).
    Admin(crate::admin::AdminRequest, pwsync_runtime::admin::Reply),
    /// What the account audit needs of the state ([`crate::state::State::audit_view`]).
    AuditView(std_mpsc::Sender<Result<crate::audit::View, String>>),
    /// A reloaded configuration, checked and built off the thread: swap it in.
    Reconfigure {
        cfg: Box<crate::config::ConsumerConfig>,
        targets: Vec<crate::targets::Configured>,
        /// The config back, with whether it was taken.
        #[allow(clippy::type_complexity)]
        done:
            tokio::sync::oneshot::Sender<(Box<crate::config::ConsumerConfig>, Result<(), String>)>,
    },
}

/// What the pipeline thread knows for the account audit, asked of it between two deliveries.
pub fn audit_view(
    pipeline: &std_mpsc::Sender<PipelineCommand>,
) -> Result<crate::audit::View, String> {
    let (tx, rx) = std_mpsc::channel();
    pipeline
        .send(PipelineCommand::AuditView(tx))
        .map_err(|_| "the consumer's pipeline has stopped".to_string())?;
    rx.recv_timeout(std::time::Duration::from_secs(300))
        .map_err(|_| "the pipeline did not answer".to_string())?
}

/// Most deliveries processed before the state is flushed and the offset committed (each holds
/// up to [`pwsync_proto::limits::MAX_BATCH_RECORDS`] records).
const MAX_DELIVERIES_PER_FLUSH: usize = 64;

/// Runs the pipeline thread until the delivery channel closes.
pub fn pipeline_thread(
    mut p: Pipeline,
    unsealer: Arc<Unsealer>,
    deliveries: std_mpsc::Receiver<Vec<u8>>,
    commands: std_mpsc::Receiver<PipelineCommand>,
    reports: mpsc::UnboundedSender<Report>,
    status_path: PathBuf,
    dry_run: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (unsealed_tx, unsealed) = std_mpsc::sync_channel(MAX_DELIVERIES_PER_FLUSH);
    std::thread::Builder::new()
        .name("unseal".into())
        .spawn(move || {
            for payload in deliveries {
                if unsealed_tx.send(unsealer.unseal(&payload)).is_err() {
                    break;
                }
            }
        })?;
    std::thread::Builder::new().name("pipeline".into()).spawn(move || {
        let mut last_status = Instant::now() - Duration::from_secs(10);
        loop {
            let first = match unsealed.recv_timeout(Duration::from_millis(200)) {
                Ok(d) => Some(d),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut advanced = None;
            let mut behind = false;
            for payload in first.into_iter().chain(std::iter::from_fn(|| unsealed.try_recv().ok()).take(MAX_DELIVERIES_PER_FLUSH - 1)) {
                match p.take(payload) {
                    Taken::Advanced(o) => advanced = Some(o),
                    Taken::Gap => behind = true,
                    Taken::Ignored => {}
                }
            }
            // The operator's commands, after this turn's deliveries and in the same flush.
            for command in std::iter::from_fn(|| commands.try_recv().ok()).take(16) {
                match command {
                    PipelineCommand::Admin(request, reply) => crate::admin::answer(&mut p, request, reply),
                    PipelineCommand::AuditView(answer) => {
                        let view = p.state.flush().and_then(|()| p.state.audit_view());
                        let _ = answer.send(view.map_err(|e| e.to_string()));
                    }
                    PipelineCommand::Reconfigure { cfg, targets, done } => {
                        let result = p.reconfigure(&cfg, targets).map_err(|e| e.to_string());
                        let _ = done.send((cfg, result));
                    }
                }
            }
            if let Err(e) = p.run_retries() {
                tracing::error!(error = %e, "retry queue");
            }
            if let Err(e) = p.flush() {
                // The state could not be made durable: stop rather than commit what is not
                // recorded. A restart reprocesses from the last durable offset.
                tracing::error!(error = %e, "cannot write the consumer state; stopping");
                break;
            }
            if let Some(o) = advanced.filter(|_| !dry_run) {
                let _ = reports.send(Report::Committed(o));
            }
            if behind {
                let _ = reports.send(Report::Behind(p.state.committed()));
            }
            if last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                if let Ok(n) = p.state.dead_letter_count() {
                    p.status.dead_letters = n;
                }
                p.status.written_ms = pwsync_proto::hlc::wall_ms();
                write_status(&status_path, &p.status);
                record_metrics(&p.status);
            }
        }
        p.status.written_ms = pwsync_proto::hlc::wall_ms();
        write_status(&status_path, &p.status);
        let c: Vec<String> = p.status.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        tracing::info!(committed = p.state.committed().0, counters = %c.join(" "), "pipeline stopped");
    })
}

/// The consumer's gauges and counters, from the same report as `status.json`.
fn record_metrics(s: &crate::pipeline::StatusReport) {
    use metrics::{counter, gauge};
    gauge!("pwsync_consumer_committed_offset").set(s.committed as f64);
    for (what, n) in &s.counters {
        counter!("pwsync_consumer_records_total", "outcome" => what.to_string()).absolute(*n);
    }
    for (name, t) in &s.targets {
        let target = name.clone();
        counter!("pwsync_consumer_applied_total", "target" => target.clone()).absolute(t.applied);
        counter!("pwsync_consumer_retried_total", "target" => target.clone()).absolute(t.retried);
        counter!("pwsync_consumer_dead_lettered_total", "target" => target.clone())
            .absolute(t.dead_lettered);
        gauge!("pwsync_consumer_retry_depth", "target" => target).set(t.retry_depth as f64);
    }
}

fn write_status(path: &std::path::Path, s: &crate::pipeline::StatusReport) {
    if let Err(e) = s.write(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the status report");
    }
}

pub struct MqttSide {
    /// The relay or relays to take deliveries from, in order, each with how to connect
    /// (address, TLS, login, client id) ([`pwsync_runtime::failover`]).
    pub relays: pwsync_runtime::failover::Failover,
    pub group: GroupName,
    pub key: SigningKey,
    /// Set while the consumer is connected and subscribed (read by `/healthz`).
    pub connected: Arc<std::sync::atomic::AtomicBool>,
    /// The group's password policy, published at every connection, every
    /// [`crate::policy::REPUBLISH`] and whenever a new version comes.
    pub policy: watch::Receiver<pwsync_proto::policy::PasswordPolicy>,
    /// The state folder, where a superseding policy version is kept (`policy.last`).
    pub state_dir: std::path::PathBuf,
}

impl MqttSide {
    pub async fn run(
        self,
        deliveries: std_mpsc::Sender<Vec<u8>>,
        mut reports: mpsc::UnboundedReceiver<Report>,
        start_at: Offset,
        mut stop: watch::Receiver<bool>,
    ) {
        let (client, eventloop) = mqtt_client(self.relays.current().clone(), 4096);
        let (tx, mut events) = mpsc::unbounded_channel();
        // The consumer never leaves a relay on its own; only a lost connection moves it on.
        let never_leave = Arc::new(tokio::sync::Notify::new());
        let poller = tokio::spawn(poll_broker(
            eventloop,
            tx,
            Duration::from_secs(10),
            self.relays.clone(),
            never_leave,
        ));
        let down = topics::down(&self.group);
        let commit_topic = topics::commit(&self.group);
        let sign = |offset: Offset| {
            signed::sign(
                &Commit {
                    group: self.group.clone(),
                    offset,
                },
                &self.key,
            )
        };
        let policy_topic = topics::policy(&self.group);
        let mut versions = self.policy.clone();
        let mut policy = versions.borrow_and_update().clone();
        let publish_policy = |policy: &mut pwsync_proto::policy::PasswordPolicy| {
            policy.published_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            match signed::sign(&*policy, &self.key) {
                Ok(bytes) => {
                    let _ = client.try_publish(&policy_topic, QoS::AtLeastOnce, false, bytes);
                }
                Err(e) => tracing::error!(error = %e, "cannot sign the password policy"),
            }
        };
        let group_key = self.key.verifying_key();
        let mut last_superseded: Option<Instant> = None;
        let mut republish = tokio::time::interval(crate::policy::REPUBLISH);
        let mut standing = start_at;
        let mut disconnect_logged = false;
        let mut last_behind = Instant::now() - Duration::from_secs(10);
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                // Only while connected: publications made offline would queue up, stale.
                _ = republish.tick() => if self.connected.load(std::sync::atomic::Ordering::Relaxed) {
                    publish_policy(&mut policy);
                },
                Ok(()) = versions.changed() => {
                    let next = versions.borrow_and_update().clone();
                    if let Some(next) = self.after(next, &policy) {
                        policy = next;
                        tracing::info!(version = policy.version, "publishing a new password policy version");
                        if self.connected.load(std::sync::atomic::Ordering::Relaxed) {
                            publish_policy(&mut policy);
                        }
                    }
                },
                report = reports.recv() => match report {
                    None => break,
                    Some(Report::Committed(o)) => {
                        standing = o;
                        if let Ok(bytes) = sign(o) {
                            let _ = client.try_publish(&commit_topic, QoS::AtLeastOnce, false, bytes);
                        }
                    }
                    Some(Report::Behind(o)) => {
                        if last_behind.elapsed() >= Duration::from_millis(500) {
                            last_behind = Instant::now();
                            if let Ok(bytes) = sign(o) {
                                let _ = client.try_publish(&commit_topic, QoS::AtLeastOnce, false, bytes);
                            }
                        }
                    }
                },
                event = events.recv() => match event {
                    None => break,
                    Some(BrokerEvent::Connected { broker }) => {
                        disconnect_logged = false;
                        tracing::info!(%broker, group = %self.group, "consumer connected");
                        let _ = client.try_subscribe(&down, QoS::AtLeastOnce);
                        let _ = client.try_subscribe(&policy_topic, QoS::AtLeastOnce);
                        if let Ok(bytes) = sign(standing) {
                            let _ = client.try_publish(&commit_topic, QoS::AtLeastOnce, false, bytes);
                        }
                        publish_policy(&mut policy);
                    }
                    // Two subscriptions (deliveries, then the group's policy topic): one line.
                    Some(BrokerEvent::Subscribed) => {
                        if !self.connected.swap(true, std::sync::atomic::Ordering::Relaxed) {
                            tracing::info!(topic = %down, "consumer subscribed; receiving deliveries");
                        }
                    }
                    Some(BrokerEvent::Message(p)) => {
                        if p.topic == down {
                            if deliveries.send(p.payload.to_vec()).is_err() {
                                break;
                            }
                        } else if p.topic == policy_topic {
                            if let Some(newer) = self.answer_a_seen_policy(&p.payload, &group_key, &policy, &mut last_superseded) {
                                policy = newer;
                                publish_policy(&mut policy);
                            }
                        } else {
                            tracing::warn!(topic = ?pwsync_proto::Untrusted(&p.topic), "ignored a message on an unexpected topic");
                        }
                        let _ = client.ack(&p).await;
                    }
                    Some(BrokerEvent::Disconnected(e)) => {
                        self.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                        if !disconnect_logged {
                            tracing::warn!(error = %e, "relay unreachable; reconnecting");
                            disconnect_logged = true;
                        }
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        drop(events);
        poller.abort();
    }

    /// What to publish when the refresher sends `next` while this side holds `held`: never a
    /// lower version than one this side superseded with (agents would refuse it as a replay):
    /// `next`'s rules above `held`, or nothing when the rules are the same.
    fn after(
        &self,
        next: pwsync_proto::policy::PasswordPolicy,
        held: &pwsync_proto::policy::PasswordPolicy,
    ) -> Option<pwsync_proto::policy::PasswordPolicy> {
        if next.version > held.version {
            return Some(next);
        }
        if next.rules == held.rules {
            return None;
        }
        let now_ms = pwsync_proto::hlc::wall_ms();
        let version = held.version.saturating_add(1).max(now_ms);
        crate::policy::remake(&self.state_dir, &self.group, next.rules, version, now_ms)
            .map_err(|e| tracing::error!(error = %e, "cannot keep the new password policy version"))
            .ok()
    }

    /// A policy seen on the group's topic, answered by [`crate::policy::on_seen`]: the version
    /// to publish instead of `ours`, when agents would hold the one seen.
    fn answer_a_seen_policy(
        &self,
        bytes: &[u8],
        group_key: &pwsync_proto::VerifyingKey,
        ours: &pwsync_proto::policy::PasswordPolicy,
        last_superseded: &mut Option<Instant>,
    ) -> Option<pwsync_proto::policy::PasswordPolicy> {
        // Anything else on the topic (a forgery, another group's key) no agent takes.
        let seen = signed::verify::<pwsync_proto::policy::PasswordPolicy>(bytes, group_key).ok()?;
        // The refresher's newest rules, when it made a version this side has not taken yet.
        let latest = self.policy.borrow().clone();
        let ours = if latest.version > ours.version {
            &latest
        } else {
            ours
        };
        let now_ms = pwsync_proto::hlc::wall_ms();
        let version = match crate::policy::on_seen(&seen, ours, now_ms) {
            crate::policy::OnSeen::Nothing => return None,
            crate::policy::OnSeen::Adopt(version) => {
                tracing::info!(version, "another publisher of this group's policy made the same rules under a newer version; publishing ours as that version");
                version
            }
            crate::policy::OnSeen::Supersede(version) => {
                if last_superseded.is_some_and(|t| t.elapsed() < crate::policy::SUPERSEDE_EVERY) {
                    return None;
                }
                *last_superseded = Some(Instant::now());
                metrics::counter!("pwsync_consumer_policies_superseded_total").increment(1);
                tracing::warn!(
                    seen = seen.version,
                    version,
                    "agents would hold a password policy of this group that this consumer did not make (other rules, signed with the group key: a mistake, a consumer whose clock ran ahead, an old state folder, or another consumer of the group with another [policy]); superseding it with this consumer's rules"
                );
                version
            }
        };
        match crate::policy::remake(
            &self.state_dir,
            &self.group,
            ours.rules.clone(),
            version,
            now_ms,
        ) {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!(error = %e, "cannot keep the superseding password policy version");
                None
            }
        }
    }
}
