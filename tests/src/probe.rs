//! A plain MQTT client for tests that speak to the broker directly: publishing hostile or
//! duplicate messages, and listening on topics.

use pwsync_runtime::mqtt_options;
use pwsync_runtime::transport::TransportConfig;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Messages received: (topic, payload).
type Inbox = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

pub struct Probe {
    client: AsyncClient,
    messages: Inbox,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    /// Connects as `client_id` with `transport` (TLS, login) and subscribes to `topics`;
    /// returns once subscribed.
    pub fn connect(
        rt: &tokio::runtime::Runtime,
        port: u16,
        client_id: &str,
        transport: &TransportConfig,
        topics: &[&str],
    ) -> Probe {
        let mut opts = mqtt_options(client_id, "127.0.0.1", port, 64);
        transport.apply(&mut opts).expect("transport");
        opts.set_clean_session(true).set_manual_acks(false);
        let (client, mut el) = pwsync_runtime::mqtt_client(opts, 256);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sink = messages.clone();
        let subs: Vec<String> = topics.iter().map(|s| s.to_string()).collect();
        let sub_client = client.clone();
        let task = rt.spawn(async move {
            let mut pending = subs.len();
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        for t in &subs {
                            let _ = sub_client.subscribe(t.as_str(), QoS::AtLeastOnce).await;
                        }
                        if subs.is_empty() {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        pending = pending.saturating_sub(1);
                        if pending == 0 {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        sink.lock()
                            .expect("lock")
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("probe connected and subscribed");
        Probe {
            client,
            messages,
            task,
        }
    }

    pub fn publish(&self, rt: &tokio::runtime::Runtime, topic: &str, payload: Vec<u8>) {
        rt.block_on(self.client.publish(topic, QoS::AtLeastOnce, false, payload))
            .expect("publish");
    }

    pub fn messages(&self) -> Vec<(String, Vec<u8>)> {
        self.messages.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one MQTT session attempt came to: see [`try_session`].
#[derive(Debug, Default)]
pub struct Session {
    /// The broker accepted the CONNECT.
    pub connected: bool,
    /// Why the session ended before `listen_for` ran out (a refused CONNECT, a closed
    /// connection, a TLS failure), if it did.
    pub ended: Option<String>,
    /// Messages received: (topic, payload).
    pub received: Vec<(String, Vec<u8>)>,
}

/// Connects once (no reconnect), subscribes to `subscribe` and publishes `publish` once
/// connected, and listens for `listen_for`.
pub fn try_session(
    rt: &tokio::runtime::Runtime,
    port: u16,
    client_id: &str,
    transport: &TransportConfig,
    subscribe: &[&str],
    publish: &[(&str, Vec<u8>)],
    listen_for: Duration,
) -> Session {
    let mut opts = mqtt_options(client_id, "127.0.0.1", port, 64);
    opts.set_manual_acks(false);
    transport.apply(&mut opts).expect("transport");
    let (client, mut el) = pwsync_runtime::mqtt_client(opts, 256);
    let subscribe: Vec<String> = subscribe.iter().map(|s| s.to_string()).collect();
    let publish: Vec<(String, Vec<u8>)> = publish
        .iter()
        .map(|(t, p)| (t.to_string(), p.clone()))
        .collect();
    rt.block_on(async move {
        let mut s = Session::default();
        let deadline = tokio::time::Instant::now() + listen_for;
        loop {
            let event = match tokio::time::timeout_at(deadline, el.poll()).await {
                Err(_) => break,
                Ok(e) => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    s.connected = true;
                    for t in &subscribe {
                        let _ = client.subscribe(t.as_str(), QoS::AtLeastOnce).await;
                    }
                    for (t, p) in &publish {
                        let _ = client
                            .publish(t.as_str(), QoS::AtLeastOnce, false, p.clone())
                            .await;
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    s.received.push((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(e) => {
                    s.ended = Some(e.to_string());
                    break;
                }
            }
        }
        s
    })
}
