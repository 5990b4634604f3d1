//! Transport security at the relay's MQTT listener (issue: security): TLS, logins, per-client
//! topic rules, client certificates, and key rotation without losing queued changes.

use pwsync_agent::api::Response;
use pwsync_proto::keys::RsaBits;
use pwsync_proto::{topics, AgentId, DecryptionKey, GroupName, Op};
use pwsync_runtime::transport::TransportConfig;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::probe::{try_session, Session};
use pwsync_tests::{htpasswd_verifies, wait_until, Cluster, HT_TARGET};
use std::path::Path;
use std::time::Duration;

fn session(c: &Cluster, transport: &TransportConfig, subscribe: &[&str]) -> Session {
    try_session(
        &c.rt,
        c.relay_port,
        "test-session",
        transport,
        subscribe,
        &[],
        Duration::from_secs(4),
    )
}

fn password_file(c: &Cluster, name: &str, contents: &str) -> std::path::PathBuf {
    let path = c.path().join(name);
    pwsync_relay::pki::write_private(&path, contents).expect("pw file");
    path
}

fn ok(r: Response) {
    assert!(
        matches!(r, Response::Accepted { durable: true, .. }),
        "{r:?}"
    );
}

#[test]
fn without_a_valid_login_or_the_relays_tls_a_client_cannot_connect() {
    let mut c = Cluster::new(&["g1"], "");
    c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    let good = c.login("agent:host-a");
    assert!(
        session(&c, &good, &[]).connected,
        "the enrolled login must work"
    );

    let wrong_token = TransportConfig {
        password_file: Some(password_file(&c, "wrong.pw", "Not-The-Token-1234")),
        ..good.clone()
    };
    let unknown_user = TransportConfig {
        username: Some("agent:nobody".into()),
        ..wrong_token.clone()
    };
    let no_login = TransportConfig {
        username: None,
        password_file: None,
        ..good.clone()
    };
    for (what, t) in [
        ("a wrong token", &wrong_token),
        ("an unknown user", &unknown_user),
        ("no login", &no_login),
    ] {
        let s = session(&c, t, &[]);
        assert!(!s.connected, "{what} was let in");
        let why = s.ended.unwrap_or_default();
        assert!(why.contains("BadUserNamePassword"), "{what}: {why}");
    }

    // Plain TCP to the TLS listener, and TLS trusting a CA that did not sign the relay.
    let plaintext = TransportConfig {
        insecure_plaintext: true,
        ..good.clone()
    };
    assert!(!session(&c, &plaintext, &[]).connected);
    let stranger_ca = c.path().join("stranger-ca.pem");
    std::fs::write(
        &stranger_ca,
        pwsync_relay::pki::Ca::generate("stranger")
            .expect("CA")
            .cert_pem,
    )
    .expect("write");
    let wrong_ca = TransportConfig {
        ca_file: Some(stranger_ca),
        ..good.clone()
    };
    let s = session(&c, &wrong_ca, &[]);
    assert!(
        !s.connected,
        "a relay certificate from another CA was trusted"
    );
    assert!(
        s.ended
            .unwrap_or_default()
            .to_lowercase()
            .contains("certificate"),
        "the failure names the certificate"
    );

    c.relay().stop();
    let log = c.relay().log_text();
    assert!(
        log.contains("login refused") && log.contains("client_id=\"test-session\""),
        "{log}"
    );
    assert!(log.contains("refused_login=3"), "{log}");
    assert!(log.contains("refused_tls=2"), "{log}");
    assert!(!log.contains("Not-The-Token-1234"));
    let token = std::fs::read_to_string(good.password_file.expect("pw")).expect("token");
    assert!(!log.contains(token.trim()), "a token reached the log");
}

#[test]
fn a_client_cannot_subscribe_or_publish_outside_its_own_topics_and_receives_nothing() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let b = c.add_agent("host-b", AgentOptions::default());
    c.start_relay();
    c.start_agent(b);
    // Two changes journaled for g1; nobody commits them, so the relay delivers them again every
    // 2 s: there is traffic on down/g1 for an eavesdropper to catch.
    ok(c.submit(b, "bob", Op::Replace, Some("Sec-Bob-1")));
    ok(c.submit(b, "carol", Op::Replace, Some("Sec-Carol-1")));
    wait_until(
        Duration::from_secs(20),
        "host-b's changes journaled",
        || c.status(b).spool_records == 0,
    );

    // The control: the group's own login receives the deliveries.
    let g1 = c.login("consumer:g1");
    let down_g1 = topics::down(&GroupName::new("g1").expect("group"));
    let control = session(&c, &g1, &[&down_g1]);
    let records: usize = control
        .received
        .iter()
        .filter_map(|(_, payload)| {
            pwsync_proto::signed::verify::<pwsync_proto::Delivery>(
                payload,
                &c.relay_key.verifying_key(),
            )
            .ok()
        })
        .map(|d| d.records.len())
        .sum();
    assert!(
        control.ended.is_none() && records >= 2,
        "the group's own subscription got {records} records in {} messages ({:?})",
        control.received.len(),
        control.ended
    );

    let agent_a = c.login("agent:host-a");
    let ack_b = topics::ack(&AgentId::new("host-b").expect("id"));
    for (who, login, filter) in [
        ("agent host-a", &agent_a, "pwsync/v1/down/#"),
        ("agent host-a", &agent_a, down_g1.as_str()),
        ("agent host-a", &agent_a, ack_b.as_str()),
        ("agent host-a", &agent_a, "#"),
        ("group g1", &g1, ack_b.as_str()),
        ("group g1", &g1, "pwsync/v1/down/+"),
    ] {
        let s = session(&c, login, &[filter]);
        assert!(s.connected, "{who} could not even connect");
        assert!(s.received.is_empty(), "{who} read {filter}");
        assert!(
            s.ended.is_some(),
            "{who} stayed connected after subscribing to {filter}"
        );
    }
    // Publishing as another agent, or as the relay, ends the connection; nothing is journaled.
    let up_b = topics::up(&AgentId::new("host-b").expect("id"));
    for topic in [up_b.as_str(), ack_b.as_str(), down_g1.as_str()] {
        let s = try_session(
            &c.rt,
            c.relay_port,
            "test-publisher",
            &agent_a,
            &[],
            &[(topic, b"forged".to_vec())],
            Duration::from_secs(3),
        );
        assert!(s.ended.is_some(), "publishing on {topic} was allowed");
    }
    let _ = a;

    // The relay and the real agent go on.
    ok(c.submit(b, "bob", Op::Replace, Some("Sec-Bob-2")));
    wait_until(Duration::from_secs(20), "host-b's third change", || {
        c.status(b).spool_records == 0
    });
    c.relay().stop();
    let log = c.relay().log_text();
    assert!(
        log.contains("SUBSCRIBE to pwsync/v1/down/# is not allowed to this client")
            && log.contains("identity=agent:host-a"),
        "{log}"
    );
    assert!(log.contains("refused_subscribe=6"), "{log}");
    assert!(log.contains("refused_publish=3"), "{log}");
    let journal = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &c.relay_config.display().to_string(),
            "journal",
            "stats",
        ],
    );
    let stats = String::from_utf8_lossy(&journal.stdout).to_string();
    assert!(
        stats
            .lines()
            .any(|l| l.starts_with("records:") && l.trim_end().ends_with(" 3")),
        "only host-b's three changes are journaled: {stats}"
    );
    assert!(!c.all_logs().contains("Sec-Bob"));
}

#[test]
fn with_client_ca_set_a_client_needs_a_certificate_from_that_ca() {
    let mut c = Cluster::new(&["g1"], "client_ca = \"tls/ca.pem\"");
    c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    let login = c.login("agent:host-a");
    assert!(
        !session(&c, &login, &[]).connected,
        "a client without a certificate was let in"
    );
    let ca = pwsync_relay::pki::Ca::load(
        &c.relay_dir.join("tls/ca.pem"),
        &c.relay_dir.join("tls/ca.key"),
    )
    .expect("the cluster's CA");
    let cert = ca.issue_client("host-a").expect("client certificate");
    let (cert_file, key_file) = (c.path().join("client.pem"), c.path().join("client.key"));
    std::fs::write(&cert_file, &cert.cert_pem).expect("write");
    pwsync_relay::pki::write_private(&key_file, &cert.key_pem).expect("write");
    let with_cert = TransportConfig {
        cert_file: Some(cert_file),
        key_file: Some(key_file),
        ..login
    };
    assert!(session(&c, &with_cert, &[]).connected);
}

fn rewrite(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).expect("read");
    assert!(text.contains(from), "{} has no {from}", file.display());
    std::fs::write(file, text.replace(from, to)).expect("write");
}

#[test]
fn rotating_the_consumer_key_loses_no_change_spooled_under_the_old_one() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    // Before the rotation, with the relay down: ten changes sealed for the old key wait in the
    // agent's spool.
    c.start_agent(a);
    for i in 0..10 {
        ok(c.submit(
            a,
            &format!("old{i}"),
            Op::Replace,
            Some(&format!("Rot-Old-{i}")),
        ));
    }
    assert_eq!(c.status(a).spool_records, 10);

    // The rotation, as KEYS.md describes it: a new key pair; consumers hold old and new; the
    // agent reloads (restarts) with the new public key.
    let new = DecryptionKey::generate_bits(RsaBits::Rsa2048).expect("rsa");
    new.save(&c.path().join("keys/consumer-2.key"))
        .expect("save");
    new.encryption_key()
        .save(&c.path().join("keys/consumer-2.pub"))
        .expect("save");
    rewrite(
        &c.consumers[k].config,
        "decryption_keys = [\"../keys/consumer.key\"]",
        "decryption_keys = [\"../keys/consumer.key\", \"../keys/consumer-2.key\"]",
    );
    rewrite(
        &c.agents[a].config,
        "consumer_public_key = \"../keys/consumer.pub\"",
        "consumer_public_key = \"../keys/consumer-2.pub\"",
    );
    c.agent(a).stop();
    c.start_agent(a);
    for i in 0..10 {
        ok(c.submit(
            a,
            &format!("new{i}"),
            Op::Replace,
            Some(&format!("Rot-New-{i}")),
        ));
    }
    c.start_relay();
    c.start_consumer(k);
    let ht = c.consumers[k].dir.join("htpasswd");
    let verifies = |user: &str, pw: &str| htpasswd_verifies(&ht, user, pw);
    wait_until(
        Duration::from_secs(30),
        "all twenty changes applied",
        || {
            (0..10).all(|i| {
                verifies(&format!("old{i}"), &format!("Rot-Old-{i}"))
                    && verifies(&format!("new{i}"), &format!("Rot-New-{i}"))
            })
        },
    );
    assert_eq!(
        c.consumer_status(k)["targets"]["web"]["dead_lettered"].as_u64(),
        Some(0)
    );
}

#[test]
fn the_daemons_can_write_no_core_file() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let pids = [
        ("relay", c.relay().pid()),
        ("agent", c.agent(a).pid()),
        ("consumer", c.consumer(k).pid()),
    ];
    for (name, pid) in pids {
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", pid.expect("pid"))).expect("limits");
        let core: Vec<&str> = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .expect("core line")
            .split_whitespace()
            .collect();
        assert_eq!(&core[4..6], ["0", "0"], "{name}: {core:?}");
    }
}

/// Gives the relay an enrolment key and a revocation list (`revoked.txt`), and consumer `k`
/// the enrolment public key and a list of its own (`revoked.txt` in its folder).
fn with_enrolment(c: &mut Cluster, k: usize) {
    let keygen = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &c.relay_config.display().to_string(),
            "keygen",
            "--enrolment",
            "--out",
            &c.relay_dir.join("enrolment").display().to_string(),
        ],
    );
    assert!(keygen.status.success());
    rewrite(
        &c.relay_config,
        "agents_dir = \"agents\"",
        "agents_dir = \"agents\"\nenrolment_key = \"enrolment/enrolment.key\"\nrevocation_list = \"revoked.txt\"",
    );
    rewrite(
        &c.consumers[k].config,
        "agents_dir = \"../relay/agents\"",
        "agents_dir = \"../relay/agents\"\nenrolment_public_key = \"../relay/enrolment/enrolment.pub\"\nrevocation_list = \"revoked.txt\"",
    );
}

/// Certifies agent `i` with `key` and `scope` (`enroll agent --scope`, which also renews its
/// login), points its config at the certificate and that key, and removes its key file from
/// agents_dir (shared by the relay and the consumers here): no key file for it exists anywhere.
fn certify(c: &Cluster, i: usize, key: &pwsync_proto::SigningKey, scope: &str) {
    let dir = c.agents[i].dir.clone();
    let n = std::fs::read_dir(&dir).expect("dir").count();
    let (private, public) = (
        dir.join(format!("key-{n}.key")),
        dir.join(format!("key-{n}.pub")),
    );
    key.save(&private).expect("key");
    key.verifying_key().save(&public).expect("pub");
    let _ = std::fs::remove_file(c.relay_dir.join(format!("agents/{}.pub", c.agents[i].id)));
    let enroll = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &c.relay_config.display().to_string(),
            "enroll",
            "agent",
            &c.agents[i].id,
            "--public-key",
            &public.display().to_string(),
            "--scope",
            scope,
            "--out",
            &dir.display().to_string(),
        ],
    );
    let said = String::from_utf8_lossy(&enroll.stdout).to_string();
    assert!(
        enroll.status.success() && said.contains("certified"),
        "{said}"
    );
    let config = std::fs::read_to_string(&c.agents[i].config).expect("config");
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("certificate = ") && !l.starts_with("signing_key = "))
        .map(|l| match l {
            "[keys]" => format!(
                "[keys]\nsigning_key = \"{}\"\ncertificate = \"agent.cert\"",
                private.display()
            ),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&c.agents[i].config, config + "\n").expect("config");
}

#[test]
fn a_certified_agent_needs_no_key_file_anywhere_keeps_to_its_scope_and_one_line_revokes_it() {
    let mut c = Cluster::new(&["g1"], "");
    let x = c.add_agent("host-x", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    with_enrolment(&mut c, k);
    let key = pwsync_proto::SigningKey::load(&c.agents[x].dir.join("agent.key")).expect("key");
    certify(&c, x, &key, "emp-*,svc-*");
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(x);
    let relay_config = c.relay_config.display().to_string();

    ok(c.submit(x, "emp-1", Op::Replace, Some("Cert-Emp-1")));
    wait_until(Duration::from_secs(20), "emp-1 applied", || {
        htpasswd_verifies(&c.consumers[k].dir.join("htpasswd"), "emp-1", "Cert-Emp-1")
    });
    // Outside the certified scope: refused by the consumer, counted.
    ok(c.submit(x, "boss", Op::Replace, Some("Cert-Boss")));
    wait_until(Duration::from_secs(20), "boss refused", || {
        c.consumer_counter(k, "out_of_scope") == 1
    });
    // One line in the consumer's revocation list withdraws the agent.
    std::fs::write(c.consumers[k].dir.join("revoked.txt"), "host-x\n").expect("revoke");
    ok(c.submit(x, "emp-2", Op::Replace, Some("Cert-Emp-2")));
    wait_until(Duration::from_secs(20), "emp-2 refused as revoked", || {
        c.consumer_counter(k, "revoked") == 1
    });
    assert!(!htpasswd_verifies(
        &c.consumers[k].dir.join("htpasswd"),
        "emp-2",
        "Cert-Emp-2"
    ));
    assert!(!htpasswd_verifies(
        &c.consumers[k].dir.join("htpasswd"),
        "boss",
        "Cert-Boss"
    ));

    // The relay's own list: `pwsync-relay revoke` appends the entry.
    let revoke = c.tool(
        "pwsync-relay",
        &["--config", &relay_config, "revoke", "host-x"],
    );
    assert!(revoke.status.success());
    assert_eq!(
        std::fs::read_to_string(c.relay_dir.join("revoked.txt")).expect("list"),
        "host-x\n"
    );
    ok(c.submit(x, "emp-3", Op::Replace, Some("Cert-Emp-3")));
    wait_until(Duration::from_secs(20), "the relay refusing host-x", || {
        c.relay().log_text().contains("agent host-x (certificate")
    });
    c.relay().stop();
    assert!(c.relay().log_text().contains("revoked="));
    assert_eq!(
        c.status(x).spool_records,
        1,
        "a refused change stays in the spool"
    );
}

#[test]
fn rotating_a_certified_agents_key_keeps_the_changes_spooled_under_the_old_one() {
    let mut c = Cluster::new(&["g1"], "");
    let x = c.add_agent("host-x", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    with_enrolment(&mut c, k);
    let old = pwsync_proto::SigningKey::load(&c.agents[x].dir.join("agent.key")).expect("key");
    certify(&c, x, &old, "*");
    // With the relay down, five changes wait in the spool, signed with the old key and carrying
    // the old certificate.
    c.start_agent(x);
    for i in 0..5 {
        ok(c.submit(
            x,
            &format!("u{i}"),
            Op::Replace,
            Some(&format!("Key-Old-{i}")),
        ));
    }
    // The rotation: a new key, certified; the agent restarts with it.
    c.agent(x).stop();
    let new = pwsync_proto::SigningKey::generate().expect("key");
    certify(&c, x, &new, "*");
    c.start_agent(x);
    for i in 0..5 {
        ok(c.submit(
            x,
            &format!("v{i}"),
            Op::Replace,
            Some(&format!("Key-New-{i}")),
        ));
    }
    c.start_relay();
    c.start_consumer(k);
    wait_until(Duration::from_secs(30), "all ten changes applied", || {
        (0..5).all(|i| {
            htpasswd_verifies(
                &c.consumers[k].dir.join("htpasswd"),
                &format!("u{i}"),
                &format!("Key-Old-{i}"),
            ) && htpasswd_verifies(
                &c.consumers[k].dir.join("htpasswd"),
                &format!("v{i}"),
                &format!("Key-New-{i}"),
            )
        })
    });
}

/// The lines of `log` that hold `marker`, checked to be one, escaped, and not a line of its own.
fn one_escaped_line(log: &str, marker: &str) -> String {
    let holding: Vec<&str> = log.lines().filter(|l| l.contains(marker)).collect();
    assert_eq!(
        holding.len(),
        1,
        "{marker}: expected exactly one log line, got {holding:#?}"
    );
    assert!(
        !log.lines().any(|l| l.trim_start().starts_with(marker)),
        "{marker} started a log line of its own:\n{log}"
    );
    assert!(
        holding[0].contains(&format!("\\n{marker}")),
        "{marker}: the newline before it is not shown escaped: {}",
        holding[0]
    );
    holding[0].to_string()
}

#[test]
fn a_newline_in_a_topic_a_filter_a_login_or_a_user_name_is_logged_escaped_on_one_line() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    c.start_agent(a);
    let good = c.login("agent:host-a");
    let forged = "2026-01-01T00:00:00.000000Z  INFO relay ready";

    // A publish and a subscribe on topics with a newline (each ends its session), and a login
    // name with one (refused).
    let topic = format!("pwsync/v1/up/host-a\nFORGED-PUB {forged}");
    let s = try_session(
        &c.rt,
        c.relay_port,
        "evil-publisher",
        &good,
        &[],
        &[(topic.as_str(), b"x".to_vec())],
        Duration::from_secs(3),
    );
    assert!(s.ended.is_some(), "the forged publish was allowed");
    let filter = format!("pwsync/v1/ack/host-a\nFORGED-SUB {forged}");
    let s = session(&c, &good, &[filter.as_str()]);
    assert!(s.ended.is_some(), "the forged subscribe was allowed");
    let bad_name = TransportConfig {
        username: Some(format!("agent:host-a\nFORGED-LOGIN {forged}")),
        ..good.clone()
    };
    assert!(!session(&c, &bad_name, &[]).connected);
    // A 60 KB topic is shown cut, with its length.
    let huge = format!("pwsync/v1/up/{}", "h".repeat(60 * 1024));
    let s = try_session(
        &c.rt,
        c.relay_port,
        "huge-publisher",
        &good,
        &[],
        &[(huge.as_str(), b"x".to_vec())],
        Duration::from_secs(3),
    );
    assert!(s.ended.is_some(), "the huge topic was allowed");

    // At the agent: a submit for a user name with a newline.
    let r = c.submit(
        a,
        &format!("mallory\nFORGED-USER {forged}"),
        Op::Replace,
        Some("Sec-Forge-1"),
    );
    assert!(
        matches!(r, Response::Rejected { .. } | Response::Ignored { .. }),
        "{r:?}"
    );

    let relay_log = c.relay().log_text();
    let line = one_escaped_line(&relay_log, "FORGED-PUB");
    assert!(
        line.contains("PUBLISH on pwsync/v1/up/host-a\\nFORGED-PUB"),
        "{line}"
    );
    let line = one_escaped_line(&relay_log, "FORGED-SUB");
    assert!(
        line.contains("SUBSCRIBE to pwsync/v1/ack/host-a\\nFORGED-SUB"),
        "{line}"
    );
    let line = one_escaped_line(&relay_log, "FORGED-LOGIN");
    assert!(line.contains("login refused"), "{line}");
    let huge_line: Vec<&str> = relay_log
        .lines()
        .filter(|l| l.contains("pwsync/v1/up/hhhh"))
        .collect();
    assert_eq!(huge_line.len(), 1, "{huge_line:?}");
    assert!(
        huge_line[0].len() < 1024 && huge_line[0].contains(&format!("…({} bytes)", huge.len())),
        "the 60 KB topic was logged in full or without its length: {} bytes",
        huge_line[0].len()
    );
    let agent_log = c.agent(a).log_text();
    let line = one_escaped_line(&agent_log, "FORGED-USER");
    assert!(line.contains("mallory\\nFORGED-USER"), "{line}");
    assert!(!c.all_logs().contains("Sec-Forge-1"));
}

/// An MQTT session through the relay's gateway, held open (not polled) until dropped.
fn hold(c: &Cluster, login: &TransportConfig, client_id: &str) -> rumqttc::EventLoop {
    let mut opts = pwsync_runtime::mqtt_options(client_id, "127.0.0.1", c.relay_port, 16);
    login.apply(&mut opts).expect("transport");
    let (_client, mut el) = pwsync_runtime::mqtt_client(opts, 16);
    c.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return,
                    Ok(_) => {}
                    Err(e) => panic!("{client_id} could not connect: {e}"),
                }
            }
        })
        .await
        .expect("connected within 10 s")
    });
    el
}

/// Polls `el` until its connection fails, at most `within`; returns the error, if one came.
fn ended_within(c: &Cluster, el: &mut rumqttc::EventLoop, within: Duration) -> Option<String> {
    c.rt.block_on(async {
        tokio::time::timeout(within, async {
            loop {
                if let Err(e) = el.poll().await {
                    return e.to_string();
                }
            }
        })
        .await
        .ok()
    })
}

#[test]
fn after_unenroll_a_logins_open_session_is_closed_within_the_reload_period() {
    let mut c = Cluster::new(&["g1"], "");
    c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    let agent = c.login("agent:host-a");
    let group = c.login("consumer:g1");
    let mut agent_session = hold(&c, &agent, "held-agent");
    let mut group_session = hold(&c, &group, "held-group");

    let out = c.tool(
        "pwsync-relay",
        &[
            "--config",
            &c.relay_config.display().to_string(),
            "unenroll",
            "agent",
            "host-a",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let unenrolled = std::time::Instant::now();
    // The reload period, and as much again for scheduling on a busy machine.
    let bound = pwsync_relay::gateway::CREDENTIALS_RELOAD * 2 + Duration::from_secs(1);
    let ended = ended_within(&c, &mut agent_session, bound);
    assert!(
        ended.is_some(),
        "the unenrolled agent's session was still open {bound:?} after unenroll"
    );
    eprintln!(
        "closed {:?} after unenroll: {ended:?}",
        unenrolled.elapsed()
    );
    // The group's session, still enrolled, stays (nothing but the withdrawn login is closed),
    // and the agent cannot come back.
    assert_eq!(
        ended_within(&c, &mut group_session, Duration::from_secs(1)),
        None,
        "the enrolled group's session was closed too"
    );
    let again = session(&c, &agent, &[]);
    assert!(!again.connected, "the unenrolled login reconnected");
    c.relay().stop();
    let log = c.relay().log_text();
    assert!(
        log.contains("login withdrawn from the credentials file")
            && log.contains("identity=agent:host-a"),
        "{log}"
    );
    assert!(log.contains("withdrawn=1"), "{log}");
}

#[test]
fn a_login_past_max_sessions_per_login_is_refused_logged_and_counted() {
    let mut c = Cluster::new(&["g1"], "max_sessions_per_login = 2");
    c.add_agent("host-a", AgentOptions::default());
    c.start_relay();
    let group = c.login("consumer:g1");
    let first = hold(&c, &group, "g1-one");
    let _second = hold(&c, &group, "g1-two");
    let third = session(&c, &group, &[]);
    assert!(
        !third.connected,
        "a third session of consumer:g1 was let in"
    );
    let why = third.ended.unwrap_or_default();
    assert!(why.contains("NotAuthorized"), "{why}");
    // Another login is not held back by g1's sessions.
    assert!(session(&c, &c.login("agent:host-a"), &[]).connected);
    // Once one of g1's sessions ends, the next one is let in.
    drop(first);
    wait_until(
        Duration::from_secs(10),
        "a session of g1 after one of two ended",
        || session(&c, &group, &[]).connected,
    );
    c.relay().stop();
    let log = c.relay().log_text();
    assert!(
        log.contains("login refused: it has max_sessions_per_login sessions open already")
            && log.contains("identity=consumer:g1"),
        "{log}"
    );
    // One refusal at least (a retry above may have come before the gateway saw the close).
    let refused = log
        .split("refused_session_limit=")
        .nth(1)
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{log}");
}
