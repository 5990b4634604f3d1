//! The relay against real agents and consumer groups (issue: central relay).

use pwsync_agent::api::Response;
use pwsync_proto::signed::{self, Ack, Commit};
use pwsync_proto::{
    topics, AgentId, Change, EncryptionKey, GroupName, Hlc, Offset, Op, Sealer, Secret, Seq,
    SigningKey,
};
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::{batch_of, wait_until, Cluster};
use std::collections::BTreeSet;
use std::time::Duration;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn journal(c: &Cluster, what: &str) -> String {
    let o = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &c.relay_config.display().to_string(),
            "journal",
            what,
        ],
    );
    assert!(o.status.success(), "journal {what}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn journal_records(c: &Cluster) -> u64 {
    journal(c, "stats")
        .lines()
        .find_map(|l| l.strip_prefix("records:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("records line")
}

fn sealer_for(c: &Cluster, a: usize) -> Sealer {
    let key = SigningKey::load(&c.agents[a].dir.join("agent.key")).expect("agent key");
    let consumer = EncryptionKey::load(&c.path().join("keys/consumer.pub")).expect("consumer pub");
    Sealer::new(
        AgentId::new(c.agents[a].id.clone()).expect("id"),
        key,
        consumer,
    )
}

#[test]
fn kill9_of_the_relay_while_agents_publish_and_a_group_consumes_loses_nothing() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let b = c.add_agent("host-b", AgentOptions::default());
    c.start_relay();
    c.start_agent(a);
    c.start_agent(b);
    let group = c.group_client("g1");
    let mut expected = BTreeSet::new();
    for round in 0..6 {
        for (i, agent) in [(0, a), (1, b)] {
            let changes: Vec<(String, String)> = (0..150)
                .map(|k| (format!("u{k}"), format!("r{round}-a{i}-{k}")))
                .collect();
            for (k, r) in c.submit_many(agent, changes, 16).into_iter().enumerate() {
                match r {
                    Response::Accepted { seq, durable: true } => {
                        expected.insert((
                            c.agents[agent].id.clone(),
                            seq,
                            format!("r{round}-a{i}-{k}"),
                        ));
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        if round % 2 == 0 {
            c.relay().kill9();
            std::thread::sleep(Duration::from_millis(300));
            c.start_relay();
        }
    }
    wait_until(
        Duration::from_secs(120),
        "every change at the group",
        || group.count() >= expected.len(),
    );
    std::thread::sleep(Duration::from_secs(1));
    let got = group.received();
    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(
        offsets,
        (1..=expected.len() as u64).collect::<Vec<_>>(),
        "offsets gap-free and once each"
    );
    let delivered: BTreeSet<(String, u64, String)> = got
        .iter()
        .map(|r| (r.agent.clone(), r.seq, r.value.clone().expect("value")))
        .collect();
    assert_eq!(delivered.len(), got.len(), "a change journaled twice");
    assert_eq!(delivered, expected);
    for agent in [a, b] {
        wait_until(Duration::from_secs(30), "agent spools to drain", || {
            c.status(agent).spool_records == 0
        });
    }
}

#[test]
fn a_duplicate_publish_is_journaled_once_and_acked_twice() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    let agent = AgentId::new("host-a").expect("id");
    let probe = c.probe_as("agent:host-a", "probe-dup", &[&topics::ack(&agent)]);
    let env = sealer_for(&c, a)
        .seal(
            Seq(1),
            Hlc::new(1, 0),
            &Change::new("alice", "host-a", Op::Replace, vec![Secret::from("pw")]),
        )
        .expect("seal");
    probe.publish(&c.rt, &topics::up(&agent), batch_of(env.encode()));
    wait_until(Duration::from_secs(10), "the first ack", || {
        probe.messages().len() == 1
    });
    // The same envelope again, bare (as one envelope alone may be published).
    probe.publish(&c.rt, &topics::up(&agent), env.encode());
    wait_until(Duration::from_secs(10), "the second ack", || {
        probe.messages().len() == 2
    });
    for (_, payload) in probe.messages() {
        let ack =
            signed::verify::<Ack>(&payload, &c.relay_verifying_key()).expect("relay-signed ack");
        assert_eq!((ack.agent.clone(), ack.seq), (agent.clone(), Seq(1)));
    }
    c.relay().stop();
    assert_eq!(journal_records(&c), 1);
}

#[test]
fn a_group_stopped_for_the_whole_run_gets_everything_and_the_journal_shrinks_only_after_both() {
    let mut c = Cluster::new(&["fast", "late"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    c.start_agent(a);
    let fast = c.group_client("fast");
    let changes: Vec<(String, String)> = (0..300)
        .map(|k| (format!("u{k}"), format!("pw{k}")))
        .collect();
    assert!(c
        .submit_many(a, changes, 8)
        .iter()
        .all(|r| matches!(r, Response::Accepted { .. })));
    wait_until(
        Duration::from_secs(30),
        "the fast group to have all",
        || fast.count() >= 300,
    );
    std::thread::sleep(Duration::from_millis(500));
    // The journal tools through the running relay (its admin socket) ...
    assert_eq!(
        journal_records(&c),
        300,
        "live: pruned before the late group committed"
    );
    assert!(journal(&c, "groups").contains("late\tcommitted 0\tlag 300 records"));
    assert_eq!(journal(&c, "ls").lines().count(), 300);
    assert!(c.relay().is_running());
    // ... and on its journal once it is stopped.
    c.relay().stop();
    assert_eq!(
        journal_records(&c),
        300,
        "pruned before the late group committed"
    );
    let groups = journal(&c, "groups");
    assert!(
        groups.contains("late\tcommitted 0\tlag 300 records"),
        "{groups}"
    );
    assert!(
        groups.contains("fast\tcommitted 300\tlag 0 records"),
        "{groups}"
    );

    c.start_relay();
    let late = c.group_client("late");
    wait_until(
        Duration::from_secs(30),
        "the late group to have all",
        || late.count() >= 300,
    );
    let got = late.received();
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, r)| r.offset == i as u64 + 1));
    let users: BTreeSet<String> = got.iter().map(|r| r.user.clone()).collect();
    assert_eq!(users.len(), 300);
    std::thread::sleep(Duration::from_millis(500));
    c.relay().stop();
    assert_eq!(
        journal_records(&c),
        0,
        "not pruned after both groups committed"
    );
}

/// Connects to the relay's listener and sends bytes that are not MQTT, in clear or inside TLS.
fn garbage_to(c: &Cluster, tls: bool) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", c.relay_port)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let garbage = b"\xde\xad\xbe\xef GET / HTTP/1.1\r\n\r\n\x00\xff\x10\x80";
    let mut answer = Vec::new();
    if tls {
        let config =
            pwsync_runtime::tls::client_config(Some(&c.relay_dir.join("tls/ca.pem")), None)
                .expect("tls");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(config, name).expect("tls client");
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(garbage).expect("garbage over TLS");
        let _ = s.read_to_end(&mut answer);
    } else {
        tcp.write_all(garbage).expect("garbage");
        let _ = tcp.read_to_end(&mut answer);
    }
    assert!(answer.len() < 64, "the relay answered garbage at length");
}

#[test]
fn hostile_messages_are_rejected_counted_and_the_relay_keeps_going() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let b = c.add_agent("host-b", AgentOptions::default());
    // host-c has keys and a config but was never enrolled at the relay.
    let unenrolled = c.add_agent("host-c", AgentOptions::default());
    std::fs::remove_file(c.relay_dir.join("agents/host-c.pub")).expect("unenrol");
    c.start_relay();
    // Each hostile message comes from a client with a login that may publish there (what the
    // gateway refuses outright is tested in security.rs); the rest come from the relay's own
    // side of the broker, where only the relay's checks stand.
    let as_a = c.probe_as("agent:host-a", "hostile-a", &[]);
    let as_b = c.probe_as("agent:host-b", "hostile-b", &[]);
    let as_stranger = c.probe_as("agent:stranger", "hostile-stranger", &[]);
    let as_g1 = c.probe_as("consumer:g1", "hostile-g1", &[]);
    let internal = c.probe_as_relay("hostile-internal", &[]);
    let agent_a = AgentId::new("host-a").expect("id");
    let agent_b = AgentId::new("host-b").expect("id");
    let change = Change::new("alice", "host-a", Op::Replace, vec![Secret::from("pw")]);
    // Malformed payload, a topic the relay does not take, an envelope of A on B's topic, an
    // envelope signed by a key that is not A's, and one from an agent nobody enrolled.
    as_a.publish(
        &c.rt,
        &topics::up(&agent_a),
        b"\x01not an envelope".to_vec(),
    );
    internal.publish(&c.rt, "pwsync/v1/up/not a valid id!", b"x".to_vec());
    let env_a = sealer_for(&c, a)
        .seal(Seq(1), Hlc::new(1, 0), &change)
        .expect("seal");
    as_b.publish(&c.rt, &topics::up(&agent_b), batch_of(env_a.encode()));
    // A batch of another version.
    let mut future_batch = batch_of(env_a.encode());
    future_batch[0] = 0x7F;
    as_a.publish(&c.rt, &topics::up(&agent_a), future_batch);
    // Truncated, oversized (over the envelope limit, under the MQTT packet limit), and with a
    // version byte from the future.
    let whole = env_a.encode();
    as_a.publish(
        &c.rt,
        &topics::up(&agent_a),
        batch_of(whole[..whole.len() / 2].to_vec()),
    );
    let mut big = whole.clone();
    big.resize(pwsync_proto::limits::MAX_ENVELOPE_BYTES + 100, 0);
    as_a.publish(&c.rt, &topics::up(&agent_a), batch_of(big));
    let mut future = whole.clone();
    future[0] = 0xEE;
    as_a.publish(&c.rt, &topics::up(&agent_a), batch_of(future));
    // Bytes that are not MQTT at all: in clear to the TLS listener, and inside TLS.
    garbage_to(&c, false);
    garbage_to(&c, true);
    let mut impostor = Sealer::new(
        agent_a.clone(),
        SigningKey::generate().expect("key"),
        EncryptionKey::load(&c.path().join("keys/consumer.pub")).expect("pub"),
    );
    as_a.publish(
        &c.rt,
        &topics::up(&agent_a),
        batch_of(
            impostor
                .seal(Seq(1), Hlc::new(1, 0), &change)
                .expect("seal")
                .encode(),
        ),
    );
    let stranger = AgentId::new("stranger").expect("id");
    let mut stranger_sealer = Sealer::new(
        stranger.clone(),
        SigningKey::generate().expect("key"),
        EncryptionKey::load(&c.path().join("keys/consumer.pub")).expect("pub"),
    );
    as_stranger.publish(
        &c.rt,
        &topics::up(&stranger),
        batch_of(
            stranger_sealer
                .seal(Seq(1), Hlc::new(1, 0), &change)
                .expect("seal")
                .encode(),
        ),
    );

    // Real traffic still flows: host-b's change is journaled and acked.
    c.start_agent(b);
    assert!(matches!(
        c.submit(b, "bob", Op::Replace, Some("real")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(20),
        "host-b's change to be acked",
        || c.status(b).spool_records == 0,
    );

    // A forged commit (signed by a key that is not the group's) does not move the cursor.
    let forged = signed::sign(
        &Commit {
            group: GroupName::new("g1").expect("name"),
            offset: Offset(1),
        },
        &SigningKey::generate().expect("key"),
    )
    .expect("sign");
    as_g1.publish(
        &c.rt,
        &topics::commit(&GroupName::new("g1").expect("name")),
        forged,
    );
    internal.publish(
        &c.rt,
        &topics::commit(&GroupName::new("nosuch").expect("name")),
        b"x".to_vec(),
    );

    // A forged ack on an agent's ack topic does not make it delete: host-c is connected but,
    // not being enrolled, gets no real ack, so only the forgery says "acked".
    c.start_agent(unenrolled);
    assert!(matches!(
        c.submit(unenrolled, "carol", Op::Replace, Some("pw-c")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(10), "host-c connected", || {
        c.status(unenrolled).connected
    });
    let agent_c = AgentId::new("host-c").expect("id");
    let forged_ack = signed::sign(
        &Ack {
            agent: agent_c.clone(),
            seq: Seq(1),
            relay_hlc: Hlc::new(1, 0),
        },
        &SigningKey::generate().expect("key"),
    )
    .expect("sign");
    internal.publish(&c.rt, &topics::ack(&agent_c), forged_ack);
    wait_until(
        Duration::from_secs(10),
        "host-c to log the forged ack",
        || {
            c.agent(unenrolled)
                .log_text()
                .contains("does not verify with the relay key")
        },
    );
    assert_eq!(
        c.status(unenrolled).spool_records,
        1,
        "a forged ack deleted a spooled change"
    );
    let _ = a;

    assert!(c.relay().is_running());
    c.relay().stop();
    let log = c.relay().log_text();
    for reason in [
        "oversized",
        "unknown_version",
        "malformed",
        "agent_mismatch",
        "bad_signature",
        "unknown_agent",
        "wrong_topic",
        "bad_commit",
        "undeclared_group",
    ] {
        assert!(
            log.contains(&format!("{reason}=")),
            "no {reason} count in the relay's log:\n{log}"
        );
    }
    assert!(
        log.contains("refused_tls=1") && log.contains("malformed=1"),
        "the gateway did not count the garbage: {log}"
    );
    // No group has consumed anything: the forged commit moved no cursor, and the journal holds
    // host-b's change and nothing from the hostile publishes.
    let groups = journal(&c, "groups");
    assert!(
        groups.contains("g1\tcommitted 0\tlag 1 records"),
        "{groups}"
    );
    assert_eq!(journal_records(&c), 1);
}

#[test]
fn with_tiny_broker_segments_an_offline_group_still_gets_every_record() {
    // 128 KiB segments, two per topic: the broker can hold a few hundred deliveries at most.
    let mut c = Cluster::new(&["g1"], "max_segment_size = 131072\nmax_segment_count = 2");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    c.start_agent(a);
    // The group connects and subscribes once, then goes offline while the records pass.
    let mut group = c.group_client("g1");
    std::thread::sleep(Duration::from_millis(500));
    group.stop(&c.rt);
    let changes: Vec<(String, String)> = (0..2000)
        .map(|k| (format!("u{k}"), format!("pw{k}")))
        .collect();
    assert!(c
        .submit_many(a, changes, 16)
        .iter()
        .all(|r| matches!(r, Response::Accepted { .. })));
    wait_until(Duration::from_secs(60), "the spool to drain", || {
        c.status(a).spool_records == 0
    });
    let group = c.group_client("g1");
    wait_until(
        Duration::from_secs(120),
        "2,000 records at the late group",
        || group.count() >= 2000,
    );
    assert!(group
        .received()
        .iter()
        .enumerate()
        .all(|(i, r)| r.offset == i as u64 + 1));
}

#[test]
fn a_dead_hosts_spool_export_is_imported_into_the_journal_and_delivered_once() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    // The relay runs once so its journal exists, then stops; the host's changes never reach it.
    c.start_relay();
    c.relay().stop();
    c.start_agent(a);
    let changes: Vec<(String, String)> = (0..25)
        .map(|k| (format!("u{k}"), format!("pw{k}")))
        .collect();
    assert!(c
        .submit_many(a, changes, 4)
        .iter()
        .all(|r| matches!(r, Response::Accepted { .. })));
    c.agent(a).kill9();
    let export = c.path().join("host-a.pwx");
    let spool = c.agents[a].spool.display().to_string();
    let out = c.tool(
        "pwsync-agent",
        &[
            "spool",
            "export",
            "--spool",
            &spool,
            &export.display().to_string(),
        ],
    );
    assert!(text(&out).contains("exported 25 records"), "{}", text(&out));
    let relay_cfg = c.relay_config.display().to_string();
    let import = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &relay_cfg,
            "journal",
            "import",
            &export.display().to_string(),
        ],
    );
    assert!(import.status.success(), "{}", text(&import));
    assert!(
        text(&import).contains("imported 25 records (0 already journaled, 0 refused)"),
        "{}",
        text(&import)
    );
    let again = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &relay_cfg,
            "journal",
            "import",
            &export.display().to_string(),
        ],
    );
    assert!(
        text(&again).contains("imported 0 records (25 already journaled, 0 refused)"),
        "{}",
        text(&again)
    );
    assert!(
        !text(&again).contains("importing"),
        "a progress bar without a terminal"
    );
    // On a terminal (script(1) gives it one) the import shows a progress bar.
    let on_tty = std::process::Command::new("script")
        .args([
            "-qec",
            &format!(
                "{} --config {relay_cfg} journal import {}",
                pwsync_tests::bin("pwsync-relay").display(),
                export.display()
            ),
            "/dev/null",
        ])
        .output()
        .expect("script(1) from util-linux");
    let shown = text(&on_tty);
    assert!(
        shown.contains("importing bytes") && shown.contains("imported 0 records"),
        "{shown}"
    );
    assert_eq!(journal_records(&c), 25);

    c.start_relay();
    let group = c.group_client("g1");
    wait_until(
        Duration::from_secs(20),
        "the imported changes at the group",
        || group.count() >= 25,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(group.count(), 25);
}

#[test]
fn pwsync_relay_agents_shows_who_is_connected_and_when_each_was_last_seen() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.add_agent("host-b", AgentOptions::default());
    let agents = |c: &Cluster| {
        let o = c.tool(
            "pwsync-relay",
            &["--config", &c.relay_config.display().to_string(), "agents"],
        );
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    assert!(agents(&c).contains("no record yet"), "{}", agents(&c));
    c.start_relay();
    c.start_agent(a);
    wait_until(
        Duration::from_secs(20),
        "host-a listed as connected",
        || agents(&c).contains("host-a\tyes\t"),
    );
    let table = agents(&c);
    assert!(table.contains("host-b\tno\tnever"), "{table}");
    c.agent(a).stop();
    wait_until(Duration::from_secs(20), "host-a listed as gone", || {
        agents(&c).contains("host-a\tno\t")
    });
    // After a restart of the relay, "last seen" is still known.
    c.relay().stop();
    assert!(agents(&c).contains("the relay is not running"));
    c.start_relay();
    wait_until(Duration::from_secs(10), "the record written again", || {
        let t = agents(&c);
        t.contains("host-a\tno\t") && t.contains(" ago") && !t.contains("not running")
    });
}

/// `pwsync-relay run` with the cluster's config: whether it exits by itself within `within`
/// (a refusal at start), and what it said. A relay still running then is stopped.
fn run_exits_within(c: &Cluster, within: Duration) -> Option<(bool, String)> {
    let mut child = std::process::Command::new(pwsync_tests::bin("pwsync-relay"))
        .args(["--config", &c.relay_config.display().to_string(), "run"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pwsync-relay run");
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().expect("output");
            return Some((status.success(), text(&out)));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn check_fails_naming_the_file_wherever_run_would_refuse_to_start() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new(&["g1"], "");
    let check = || {
        c.tool(
            "pwsync-relay",
            &["--config", &c.relay_config.display().to_string(), "check"],
        )
    };
    let out = check();
    assert!(out.status.success(), "the cluster's config: {}", text(&out));

    let tls_key = c.relay_dir.join("tls/relay.key");
    let credentials = c.relay_dir.join("credentials.toml");
    c.enroll("agent:host-a", &c.path().join("host-a"));
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    let hidden = c.relay_dir.join("tls/relay.key.away");
    for (what, break_it, mend) in [
        (
            "a TLS key of mode 0644",
            Box::new(|| mode(&tls_key, 0o644)) as Box<dyn Fn()>,
            Box::new(|| mode(&tls_key, 0o600)) as Box<dyn Fn()>,
        ),
        (
            "a missing TLS key",
            Box::new(|| std::fs::rename(&tls_key, &hidden).expect("mv")),
            Box::new(|| std::fs::rename(&hidden, &tls_key).expect("mv")),
        ),
        (
            "a credentials file of mode 0644",
            Box::new(|| mode(&credentials, 0o644)),
            Box::new(|| mode(&credentials, 0o600)),
        ),
    ] {
        break_it();
        let out = check();
        let said = text(&out);
        assert!(!out.status.success(), "check passed {what}: {said}");
        let file = if what.contains("TLS") {
            &tls_key
        } else {
            &credentials
        };
        assert!(
            said.contains(&file.display().to_string()),
            "check did not name {} for {what}: {said}",
            file.display()
        );
        // And run does refuse it, so check told the truth.
        let ran = run_exits_within(&c, Duration::from_secs(10));
        assert!(
            matches!(&ran, Some((false, _))),
            "run did not refuse {what}: {ran:?}"
        );
        mend();
    }
    let out = check();
    assert!(out.status.success(), "after mending: {}", text(&out));
}

/// Issue 32: `enroll agent NAME --keygen` makes the new host's key pair and enrols its public
/// key in one step; it is refused with words for a consumer group and beside `--public-key`.
#[test]
fn enroll_with_keygen_makes_the_key_pair_and_enrols_it() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::new(&["g1"], "");
    let relay_cfg = c.relay_config.display().to_string();
    let out = c.path().join("new-host");
    let out_s = out.display().to_string();
    let o = c.tool(
        "pwsync-relay",
        &[
            "--config", &relay_cfg, "enroll", "agent", "host-new", "--keygen", "--out", &out_s,
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let mode = std::fs::metadata(out.join("agent.key"))
        .expect("agent.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = SigningKey::load(&out.join("agent.key")).expect("a signing key");
    let installed = pwsync_proto::VerifyingKey::load(&c.relay_dir.join("agents/host-new.pub"))
        .expect("the public key installed at the relay");
    assert_eq!(installed.key_id(), key.verifying_key().key_id());
    assert!(out.join("mqtt.pw").exists());
    assert!(!text(&o).contains(&std::fs::read_to_string(out.join("mqtt.pw")).expect("token")));

    let o = c.tool(
        "pwsync-relay",
        &[
            "--config", &relay_cfg, "enroll", "consumer", "g1", "--keygen", "--out", &out_s,
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("pwsync-consumer keygen"),
        "{}",
        text(&o)
    );
    let o = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &relay_cfg,
            "enroll",
            "agent",
            "host-x",
            "--keygen",
            "--public-key",
            &out.join("agent.pub").display().to_string(),
            "--out",
            &out_s,
        ],
    );
    assert!(!o.status.success(), "{}", text(&o));
}

/// `pwsync-relay reload` (and SIGHUP) takes `[groups]` while the relay runs: a group declared
/// by a reload is delivered what the journal still holds (a record another group has not
/// committed), takes up past what was deleted before it was declared (the relay says so,
/// signed, and the consumer logs it rather than waiting for ever), and gets every change
/// after; a broken config and a change to a section only a restart changes are refused in
/// words, and the running groups go on; a group removed by SIGHUP gets nothing more.
#[test]
fn a_relay_reload_adds_and_removes_a_group_without_a_restart() {
    let mut c = Cluster::new(&["g1", "g2"], "");
    let original = std::fs::read_to_string(&c.relay_config).expect("relay config");
    let g2_section = "\n[groups.g2]\npublic_key = \"groups/g2.pub\"\nredelivery_secs = 2\n";
    assert!(original.contains(g2_section), "{original}");
    let without_g2 = original.replace(g2_section, "");
    std::fs::write(&c.relay_config, &without_g2).expect("relay config");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k1 = c.add_consumer("k1", "g1", pwsync_tests::HT_TARGET);
    let k2 = c.add_consumer("k2", "g2", pwsync_tests::HT_TARGET);
    c.start_relay();
    c.start_consumer(k1);
    c.start_consumer(k2);
    c.start_agent(a);
    let (web1, web2) = (
        c.consumers[k1].dir.join("htpasswd"),
        c.consumers[k2].dir.join("htpasswd"),
    );
    let reload = |c: &Cluster| {
        let o = c.tool(
            "pwsync-relay",
            &["--config", &c.relay_config.display().to_string(), "reload"],
        );
        (o.status.success(), text(&o))
    };

    // "before" is committed by g1, the only group declared, and so deleted (retention 0);
    // "held" stays journaled while g1's consumer is stopped.
    assert!(matches!(
        c.submit(a, "before", Op::Replace, Some("pw-before-1")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "the change at g1", || {
        pwsync_tests::htpasswd_verifies(&web1, "before", "pw-before-1")
    });
    c.consumer(k1).stop();
    assert!(matches!(
        c.submit(a, "held", Op::Replace, Some("pw-held-1")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(20), "the held change journaled", || {
        journal_records(&c) == 1
    });
    assert!(!web2.exists(), "an undeclared group was delivered to");
    assert!(!journal(&c, "groups").contains("g2"));

    // Declared by a reload: g2 gets what is still journaled and what comes after.
    std::fs::write(&c.relay_config, &original).expect("relay config");
    let (ok, out) = reload(&c);
    assert!(ok, "{out}");
    assert!(out.contains("added [\"g2\"]"), "{out}");
    assert!(journal(&c, "groups").contains("g2"));
    assert!(matches!(
        c.submit(a, "after", Op::Replace, Some("pw-after-1")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(30),
        "the held and the later change at g2",
        || {
            pwsync_tests::htpasswd_verifies(&web2, "held", "pw-held-1")
                && pwsync_tests::htpasswd_verifies(&web2, "after", "pw-after-1")
        },
    );
    assert!(!pwsync_tests::htpasswd_verifies(
        &web2,
        "before",
        "pw-before-1"
    ));
    let k2_log = c.consumer(k2).log_text();
    assert!(
        k2_log.contains("no longer holds these journal offsets") && k2_log.contains("from=1 to=1"),
        "{k2_log}"
    );
    c.start_consumer(k1);
    wait_until(Duration::from_secs(30), "g1 catches up", || {
        pwsync_tests::htpasswd_verifies(&web1, "held", "pw-held-1")
            && pwsync_tests::htpasswd_verifies(&web1, "after", "pw-after-1")
    });

    // Refused, in words, and the running groups go on.
    std::fs::write(
        &c.relay_config,
        format!("{original}\n[groups.g3]\npublic_key = \"groups/missing.pub\"\n"),
    )
    .expect("relay config");
    let (ok, out) = reload(&c);
    assert!(!ok, "a group without its key was taken: {out}");
    assert!(
        out.contains("group g3") && out.contains("the running config stays"),
        "{out}"
    );
    std::fs::write(
        &c.relay_config,
        original.replace("[journal]\n", "[journal]\nretention_secs = 60\n"),
    )
    .expect("relay config");
    let (ok, out) = reload(&c);
    assert!(
        !ok && out.contains("[journal] changed") && out.contains("takes a restart"),
        "{out}"
    );
    assert!(matches!(
        c.submit(a, "refused", Op::Replace, Some("pw-refused-1")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(30),
        "a change after the refusals, at both groups",
        || {
            pwsync_tests::htpasswd_verifies(&web1, "refused", "pw-refused-1")
                && pwsync_tests::htpasswd_verifies(&web2, "refused", "pw-refused-1")
        },
    );

    // SIGHUP: g2 removed, it gets nothing more; g1 goes on.
    std::fs::write(&c.relay_config, &without_g2).expect("relay config");
    let pid = c.relay().pid().expect("relay pid");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    wait_until(Duration::from_secs(20), "the SIGHUP reload logged", || {
        c.relay().log_text().contains("removed [\"g2\"]")
    });
    assert!(matches!(
        c.submit(a, "last", Op::Replace, Some("pw-last-1")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "the last change at g1", || {
        pwsync_tests::htpasswd_verifies(&web1, "last", "pw-last-1")
    });
    // g1 has it, so the relay has had it to deliver; give a delivery to g2 the time one to g1
    // took twice over before saying none came.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!pwsync_tests::htpasswd_verifies(&web2, "last", "pw-last-1"));
    assert!(!journal(&c, "groups").contains("g2"));
    assert!(c.relay().is_running());
}
