//! A consumer group's side of the relay protocol, for tests that check what the relay
//! delivers: verifies each delivery with the relay's key, opens the envelope with the consumer
//! key (signature first), records it, and commits signed offsets. In-order only (go-back-N
//! receiver): a delivery past a gap is dropped and the group says where it stands.

use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::signed::{self, Commit, Delivery};
use pwsync_proto::{topics, Envelope, GroupName, Offset, Op, Opener, SigningKey, VerifyingKey};
use pwsync_runtime::mqtt_options;
use rumqttc::{Event, Packet, QoS};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One delivery, opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub offset: u64,
    pub agent: String,
    pub seq: u64,
    pub user: String,
    pub op: Op,
    /// The first password value, if any (test passwords only).
    pub value: Option<String>,
}

pub struct GroupClient {
    received: Arc<Mutex<Vec<Received>>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct GroupSetup {
    pub port: u16,
    pub transport: pwsync_runtime::transport::TransportConfig,
    pub group: GroupName,
    pub key: SigningKey,
    pub relay_key: VerifyingKey,
    pub opener: Arc<Opener>,
    pub agents: Arc<AgentDirectory>,
}

impl GroupClient {
    pub fn start(rt: &tokio::runtime::Runtime, s: GroupSetup) -> GroupClient {
        let received = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = watch::channel(false);
        let task = rt.spawn(run(s, received.clone(), stop_rx));
        GroupClient {
            received,
            stop,
            task: Some(task),
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.received.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn stop(&mut self, rt: &tokio::runtime::Runtime) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = rt.block_on(t);
        }
    }
}

async fn run(s: GroupSetup, received: Arc<Mutex<Vec<Received>>>, mut stop: watch::Receiver<bool>) {
    let mut opts = mqtt_options(
        &format!("pwsync-test-group-{}", s.group),
        "127.0.0.1",
        s.port,
        512,
    );
    s.transport.apply(&mut opts).expect("transport");
    let (client, mut el) = pwsync_runtime::mqtt_client(opts, 4096);
    let down = topics::down(&s.group);
    let commit_topic = topics::commit(&s.group);
    let mut committed = 0u64;
    let mut sent_commit = 0u64;
    let mut last_hello = Instant::now() - Duration::from_secs(10);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let base_id = format!("pwsync-test-group-{}", s.group);
    let mut reconnects = 0u64;
    let sign_commit = |offset: u64| {
        signed::sign(
            &Commit {
                group: s.group.clone(),
                offset: Offset(offset),
            },
            &s.key,
        )
        .expect("sign commit")
    };
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = tick.tick() => {
                if committed > sent_commit && client.try_publish(&commit_topic, QoS::AtLeastOnce, false, sign_commit(committed)).is_ok() {
                    sent_commit = committed;
                }
            }
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.try_subscribe(&down, QoS::AtLeastOnce);
                    let _ = client.try_publish(&commit_topic, QoS::AtLeastOnce, false, sign_commit(committed));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(d) = signed::verify::<Delivery>(&p.payload, &s.relay_key) {
                        if d.group == s.group && d.first.0 <= committed + 1 {
                            for (offset, record) in d.records() {
                                if offset.0 != committed + 1 {
                                    continue;
                                }
                                if let Some(r) = open(&s, offset, &record.envelope) {
                                    received.lock().expect("lock").push(r);
                                }
                                committed = offset.0;
                            }
                        } else if d.first.0 > committed + 1 && last_hello.elapsed() > Duration::from_millis(500) {
                            last_hello = Instant::now();
                            let _ = client.try_publish(&commit_topic, QoS::AtLeastOnce, false, sign_commit(committed));
                        }
                    }
                    let _ = client.ack(&p).await;
                }
                Ok(_) => {}
                Err(_) => {
                    reconnects += 1;
                    pwsync_runtime::forget_connection(&mut el, &base_id, reconnects);
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
            }
        }
    }
    let _ = client.disconnect().await;
}

fn open(s: &GroupSetup, offset: Offset, envelope: &[u8]) -> Option<Received> {
    let env = Envelope::decode(envelope).ok()?;
    let key = s.agents.key(env.agent()).ok()?;
    let change = s.opener.open(&env, &key).ok()?;
    Some(Received {
        offset: offset.0,
        agent: env.agent().to_string(),
        seq: env.seq().0,
        user: change.user.clone(),
        op: change.op,
        value: change
            .values
            .first()
            .map(|v| String::from_utf8_lossy(v.expose()).into_owned()),
    })
}
