//! The forwarder: publishes spooled envelopes to the relay and deletes them only on the relay's
//! signed, durable ack. What to send, what an ack lets go and when to send again are decided by
//! [`crate::sender::Sender`], without I/O; this is its shell (spool, MQTT, signatures, clock).
//!
//! Protocol, per agent (a go-back-N window over MQTT QoS1):
//! - Envelopes `acked+1 ..` are published in seq order on `pwsync/v1/up/{agent}`, gathered into
//!   batches ([`pwsync_proto::batch`]: one MQTT message for up to 256), at most `window` beyond
//!   the last ack.
//! - The relay journals them in order, fsyncs, and publishes on `pwsync/v1/ack/{agent}` an
//!   [`Ack`] signed by its key, carrying the highest contiguous seq it holds. Only an ack whose
//!   signature verifies with the configured relay key, for this agent, deletes anything, and
//!   only up to its seq. The broker's PUBACK deletes nothing. The window moves on the ack; the
//!   deletion itself runs beside the forwarder ([`delete_acked`]), and one left undone by a crash
//!   only means those envelopes are sent again and acked as duplicates.
//! - If no ack moves forward within the ack timeout while envelopes are outstanding (the broker
//!   may have dropped them, the relay may have restarted), everything from `acked+1` is sent
//!   again, even on a healthy connection. After a reconnect or a restart, too. The relay drops
//!   duplicates by `(agent, seq)` and acks them again.
//! - The relay's clock in each ack is merged into the agent's hybrid logical clock.
//! - A spool record that can no longer be read is quarantined and replaced by a sealed
//!   [`pwsync_proto::Op::Lost`] placeholder under the same seq, so it never blocks the stream.

use crate::sender::{AfterAck, AfterTimeout, Sender, Timing};
use crate::server::Counters;
use crate::spool::Spool;
use crate::writer::{Outcome, WriterHandle};
use pwsync_proto::batch::Batch;
use pwsync_proto::signed::{self, Ack};
use pwsync_proto::{topics, AgentId, HybridClock, Seq, Untrusted, VerifyingKey};
use pwsync_runtime::failover::Failover;
use pwsync_runtime::{monotonic_ms, poll_broker, BrokerEvent};
use rumqttc::{AsyncClient, QoS};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};

/// The shortest time between two resends triggered by acks that do not move forward, in ms.
const FAST_RESEND_AFTER_MS: u64 = 500;

pub struct Forwarder {
    pub spool: Arc<Spool>,
    pub writer: WriterHandle,
    pub agent: AgentId,
    pub relay_key: VerifyingKey,
    pub clock: Arc<Mutex<HybridClock>>,
    pub counters: Arc<Counters>,
    pub appended: Arc<Notify>,
    pub window: u16,
    pub ack_timeout: Duration,
    pub reconnect_max: Duration,
    /// The relay or relays to send to, in order ([`pwsync_runtime::failover`]).
    pub relays: Failover,
    /// The password policies to take from the relay (`[policy]`), if any.
    pub policies: Option<Arc<crate::policy::Policies>>,
    /// Notified when a reload changed the policy groups: their topics are subscribed to now.
    pub resubscribe: Arc<Notify>,
}

impl Forwarder {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let (client, eventloop) = pwsync_runtime::mqtt_client(
            self.relays.current().clone(),
            usize::from(self.window) * 2 + 16,
        );
        let (tx, mut events) = mpsc::unbounded_channel();
        let leave = Arc::new(tokio::sync::Notify::new());
        let poller = tokio::spawn(poll_broker(
            eventloop,
            tx,
            self.reconnect_max,
            self.relays.clone(),
            leave.clone(),
        ));
        let up = topics::up(&self.agent);
        let ack_topic = topics::ack(&self.agent);
        let acked = self.spool.acked_seq();
        let (deletions, acked_through) = watch::channel(acked);
        let deleter = tokio::spawn(delete_acked(self.spool.clone(), acked_through));
        let timing = Timing {
            ack_timeout_ms: self.ack_timeout.as_millis() as u64,
            fast_resend_ms: FAST_RESEND_AFTER_MS,
        };
        let mut w = Sender::new(
            acked,
            self.window,
            timing,
            self.relays.len(),
            monotonic_ms(),
        );
        let mut disconnect_logged = false;
        loop {
            self.fill_window(&client, &up, &mut w).await;
            let timeout = w.poll_timeout();
            let deadline = Instant::now()
                + Duration::from_millis(timeout.unwrap_or(0).saturating_sub(monotonic_ms()));
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.appended.notified() => {}
                _ = self.resubscribe.notified() => {
                    if w.is_connected() {
                        for topic in self.policies.iter().flat_map(|p| p.topics()) {
                            if let Err(e) = client.try_subscribe(&topic, QoS::AtLeastOnce) {
                                tracing::warn!(error = %e, "cannot subscribe to a password policy");
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()), if timeout.is_some() => {
                    let (from_seq, outstanding) = (w.acked().next(), w.outstanding());
                    match w.on_timeout(monotonic_ms()) {
                        Some(AfterTimeout::NextRelay) => {
                            // Sent again to the next relay once connected there.
                            tracing::warn!(
                                %from_seq, outstanding,
                                "no ack from the relay within {:?}; trying the next relay", self.ack_timeout
                            );
                            self.counters.connected.store(false, Ordering::Relaxed);
                            leave.notify_one();
                        }
                        Some(AfterTimeout::Resend { resent }) => {
                            tracing::warn!(
                                %from_seq, outstanding,
                                "no ack from the relay within {:?}; sending again", self.ack_timeout
                            );
                            self.note_attempts(resent).await;
                        }
                        None => {}
                    }
                }
                event = events.recv() => match event {
                    None => break,
                    Some(BrokerEvent::Connected { .. }) => {
                        tracing::info!(outstanding = w.outstanding(), "connected to the relay");
                        disconnect_logged = false;
                        self.counters.connected.store(true, Ordering::Relaxed);
                        if let Err(e) = client.try_subscribe(&ack_topic, QoS::AtLeastOnce) {
                            tracing::warn!(error = %e, "cannot subscribe to acks");
                        }
                        for topic in self.policies.iter().flat_map(|p| p.topics()) {
                            if let Err(e) = client.try_subscribe(&topic, QoS::AtLeastOnce) {
                                tracing::warn!(error = %e, "cannot subscribe to a password policy");
                            }
                        }
                        let resent = w.on_connected(monotonic_ms());
                        self.note_attempts(resent).await;
                    }
                    Some(BrokerEvent::Subscribed) => {}
                    Some(BrokerEvent::Disconnected(e)) => {
                        if !disconnect_logged {
                            tracing::warn!(error = %e, "relay unreachable; changes stay in the spool");
                            disconnect_logged = true;
                        }
                        w.on_disconnected();
                        self.counters.connected.store(false, Ordering::Relaxed);
                    }
                    Some(BrokerEvent::Message(p)) => {
                        if p.topic == ack_topic {
                            self.on_ack(&p.payload, &mut w, &deletions).await;
                        } else if let (Some(policies), Some(topics::Topic::Policy(group))) =
                            (&self.policies, topics::parse(&p.topic))
                        {
                            policies.offer(&group, &p.payload);
                        } else {
                            tracing::warn!(topic = ?Untrusted(&p.topic), "ignored a message on an unexpected topic");
                        }
                        let _ = client.ack(&p).await;
                    }
                }
            }
        }
        let _ = client.try_disconnect();
        poller.abort();
        drop(deletions);
        let _ = deleter.await;
    }

    /// The seqs sent again are counted as attempts in the spool.
    async fn note_attempts(&self, resent: std::ops::Range<u64>) {
        if !resent.is_empty() {
            let seqs: Vec<Seq> = resent.map(Seq).collect();
            let spool = self.spool.clone();
            let _ = tokio::task::spawn_blocking(move || spool.note_attempts(&seqs)).await;
        }
    }

    async fn fill_window(&self, client: &AsyncClient, up: &str, w: &mut Sender) {
        while let Some((from, want)) = w.wants() {
            let spool = self.spool.clone();
            let entries =
                match tokio::task::spawn_blocking(move || spool.read_from(from, want)).await {
                    Ok(Ok(e)) => e,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot read the spool");
                        return;
                    }
                    Err(_) => return,
                };
            if entries.is_empty() {
                return;
            }
            let mut batch = Batch::default();
            let mut batch_next = from;
            let mut gap = false;
            for (seq, record) in entries {
                if seq != batch_next {
                    tracing::error!(expected = %batch_next, found = %seq, "spool sequence gap; waiting");
                    gap = true;
                    break;
                }
                let record = match record {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(%seq, error = %e, "spool record unreadable: quarantining it and sending a lost-change placeholder");
                        if let Outcome::Failed(reason) = self.writer.replace_lost(seq).await {
                            tracing::error!(%seq, %reason, "cannot replace the unreadable record");
                            return;
                        }
                        break; // read again from the same seq
                    }
                };
                if !batch.has_room_for(record.envelope.len())
                    && !self.publish_batch(client, up, &mut batch, batch_next, w)
                {
                    return;
                }
                batch.push(record.envelope);
                batch_next = seq.next();
            }
            if !self.publish_batch(client, up, &mut batch, batch_next, w) || gap {
                return;
            }
        }
    }

    /// Publishes the envelopes gathered in `batch` (those before `next`) as one message and moves
    /// the window past them. False if the MQTT client's queue is full; they are sent later.
    fn publish_batch(
        &self,
        client: &AsyncClient,
        up: &str,
        batch: &mut Batch,
        next: Seq,
        w: &mut Sender,
    ) -> bool {
        if batch.is_empty() {
            return true;
        }
        if let Err(e) = client.try_publish(up, QoS::AtLeastOnce, false, batch.take_encoded()) {
            tracing::debug!(error = %e, "MQTT request queue full; will continue");
            return false;
        }
        w.sent(next, monotonic_ms());
        true
    }

    async fn on_ack(&self, payload: &[u8], w: &mut Sender, deletions: &watch::Sender<Seq>) {
        tracing::trace!(bytes = payload.len(), "ack received");
        let ack = match signed::verify::<Ack>(payload, &self.relay_key) {
            Ok(ack) if ack.agent == self.agent => ack,
            Ok(ack) => {
                tracing::warn!(for_agent = %ack.agent, "ignored a relay ack addressed to another agent");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignored an ack that does not verify with the relay key");
                return;
            }
        };
        if let Err(e) = self
            .clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(ack.relay_hlc)
        {
            tracing::warn!(error = %e, "relay clock not merged");
        }
        self.counters
            .last_ack_ms
            .store(pwsync_proto::hlc::wall_ms(), Ordering::Relaxed);
        let spool_next = self.spool.next_seq();
        match w.on_ack(ack.seq, spool_next, monotonic_ms()) {
            AfterAck::Nothing => {}
            AfterAck::Resend { resent } => {
                // The relay answered without moving forward: it dropped something out of order
                // (the broker lost an envelope in between). Sent again now rather than at the
                // ack timeout, but not more than twice a second.
                tracing::debug!(from_seq = %w.acked().next(), "relay is missing envelopes; sending again");
                self.note_attempts(resent).await;
            }
            AfterAck::Beyond => {
                tracing::error!(
                    relay_has = %ack.seq, spool_reached = %Seq(spool_next.0 - 1),
                    "the relay holds seqs this spool never reached: the spool was reset or replaced. \
                     Nothing is deleted; new changes would be taken as duplicates. Restore the spool \
                     or enrol this host under a new agent id."
                );
            }
            AfterAck::Delete { through, waited_ms } => {
                // The window moved on the verified ack; the records go from the spool in the
                // background.
                let _ = deletions.send(through);
                for ms in waited_ms {
                    metrics::histogram!("pwsync_agent_publish_to_ack_seconds")
                        .record(ms as f64 / 1000.0);
                }
            }
        }
    }
}

/// Deletes what the relay acked from the spool, off the forwarder's path: acks that arrive while
/// one deletion is being fsynced are folded into the next. A deletion that fails leaves the
/// records in place; the next one (or, after a restart, the relay's duplicate acks) takes them.
async fn delete_acked(spool: Arc<Spool>, mut acked: watch::Receiver<Seq>) {
    loop {
        let closed = acked.changed().await.is_err();
        let through = *acked.borrow_and_update();
        let spool = spool.clone();
        match tokio::task::spawn_blocking(move || spool.remove_through(through)).await {
            Ok(Ok(n)) => tracing::debug!(%through, removed = n, "acked records deleted"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot delete acked records; the next ack tries again")
            }
            Err(_) => return,
        }
        if closed {
            return;
        }
    }
}
