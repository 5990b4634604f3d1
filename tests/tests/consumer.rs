//! The consumer against real deliveries (issue: consumer). Some tests play the relay
//! themselves, publishing deliveries signed with the relay's key straight to the group's topic,
//! to put envelopes in front of the consumer that a relay would not pass (the consumer must not
//! trust the relay to have checked them).

use pwsync_agent::api::Response;
use pwsync_proto::signed::{self, Delivery};
use pwsync_proto::{
    topics, AgentId, Change, EncryptionKey, GroupName, Hlc, Offset, Op, Sealer, Secret, Seq,
    SigningKey,
};
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::probe::Probe;
use pwsync_tests::{htpasswd_verifies, wait_until, Cluster, HT_TARGET};
use std::path::Path;
use std::time::Duration;

fn consumer_pub(c: &Cluster) -> EncryptionKey {
    EncryptionKey::load(&c.path().join("keys/consumer.pub")).expect("consumer pub")
}

fn sealer(c: &Cluster, agent: &str, key: SigningKey) -> Sealer {
    Sealer::new(AgentId::new(agent).expect("id"), key, consumer_pub(c))
}

fn agent_key(c: &Cluster, i: usize) -> SigningKey {
    SigningKey::load(&c.agents[i].dir.join("agent.key")).expect("agent key")
}

fn replace(user: &str, origin: &str, pw: &str) -> Change {
    Change::new(user, origin, Op::Replace, vec![Secret::from(pw)])
}

/// Publishes `envelope` as the relay's delivery at `offset` for `group`.
fn deliver(c: &Cluster, probe: &Probe, group: &str, offset: u64, envelope: Vec<u8>) {
    deliver_batch(c, probe, group, offset, vec![envelope]);
}

/// Publishes `envelopes` as one relay delivery batch at `first`, `first + 1`, … for `group`,
/// journaled now (as the relay would stamp them).
fn deliver_batch(c: &Cluster, probe: &Probe, group: &str, first: u64, envelopes: Vec<Vec<u8>>) {
    let g = GroupName::new(group).expect("group");
    let mut d = Delivery {
        group: g.clone(),
        first: Offset(first),
        records: Vec::new(),
    };
    for e in envelopes {
        d.push(pwsync_proto::hlc::wall_ms(), e);
    }
    probe.publish(
        &c.rt,
        &topics::down(&g),
        signed::sign(&d, &c.relay_key).expect("sign"),
    );
}

#[test]
fn a_batch_applies_only_its_records_past_the_cursor_and_one_past_a_gap_waits() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let mut s = sealer(&c, "host-a", agent_key(&c, a));
    let mut env = |seq: u64, user: &str, pw: &str| {
        s.seal(
            Seq(seq),
            Hlc::new(100 + seq, 0),
            &replace(user, "host-a", pw),
        )
        .expect("seal")
        .encode()
    };
    let (alice, bob, bob2, carol, dave, erin) = (
        env(1, "alice", "alice-pw"),
        env(2, "bob", "bob-pw"),
        env(3, "bob", "bob-pw-2"),
        env(4, "carol", "carol-pw"),
        env(5, "dave", "dave-pw"),
        env(6, "erin", "erin-pw"),
    );
    let committed = |c: &Cluster| c.consumer_status(k)["committed"].as_u64();
    deliver_batch(&c, &probe, "g1", 1, vec![alice, bob]);
    wait_until(Duration::from_secs(20), "the first batch", || {
        committed(&c) == Some(2)
    });
    // Offsets 2 and 3: 2 is done already, whatever this batch claims is there; only 3 is new.
    deliver_batch(&c, &probe, "g1", 2, vec![bob2, carol]);
    wait_until(Duration::from_secs(20), "the overlapping batch", || {
        committed(&c) == Some(3)
    });
    let ht = c.consumers[k].dir.join("htpasswd");
    assert!(htpasswd_verifies(&ht, "bob", "bob-pw"));
    assert!(htpasswd_verifies(&ht, "carol", "carol-pw"));
    // A batch from 5 while 4 is missing is not taken: the cursor stays, nothing of it applies.
    deliver_batch(&c, &probe, "g1", 5, vec![erin.clone()]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(committed(&c), Some(3));
    assert!(!std::fs::read_to_string(&ht)
        .expect("htpasswd")
        .contains("erin"));
    deliver_batch(&c, &probe, "g1", 4, vec![dave, erin]);
    wait_until(Duration::from_secs(20), "the batch after the gap", || {
        committed(&c) == Some(5)
    });
    assert!(htpasswd_verifies(&ht, "dave", "dave-pw"));
    assert!(htpasswd_verifies(&ht, "erin", "erin-pw"));
    assert!(htpasswd_verifies(&ht, "alice", "alice-pw"));
}

#[test]
fn forged_foreign_out_of_scope_and_replayed_envelopes_are_not_applied_and_the_stream_goes_on() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("[agent_scope]\n\"host-a\" = [\"alice\", \"bob\"]\n\n{HT_TARGET}"),
    );
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let mut genuine = sealer(&c, "host-a", agent_key(&c, a));
    let alice = genuine
        .seal(
            Seq(1),
            Hlc::new(100, 0),
            &replace("alice", "host-a", "alice-pw-1"),
        )
        .expect("seal");
    let mut ghost = sealer(&c, "ghost", SigningKey::generate().expect("key"));
    let mut impostor = sealer(&c, "host-a", SigningKey::generate().expect("key"));
    deliver(&c, &probe, "g1", 1, alice.encode());
    deliver(
        &c,
        &probe,
        "g1",
        2,
        ghost
            .seal(Seq(1), Hlc::new(101, 0), &replace("alice", "x", "ghost-pw"))
            .expect("seal")
            .encode(),
    );
    deliver(
        &c,
        &probe,
        "g1",
        3,
        impostor
            .seal(
                Seq(2),
                Hlc::new(102, 0),
                &replace("alice", "host-a", "impostor-pw"),
            )
            .expect("seal")
            .encode(),
    );
    deliver(
        &c,
        &probe,
        "g1",
        4,
        genuine
            .seal(
                Seq(2),
                Hlc::new(103, 0),
                &replace("mallory", "host-a", "mallory-pw"),
            )
            .expect("seal")
            .encode(),
    );
    deliver(&c, &probe, "g1", 5, alice.encode());
    deliver(
        &c,
        &probe,
        "g1",
        6,
        genuine
            .seal(
                Seq(3),
                Hlc::new(104, 0),
                &replace("bob", "host-a", "bob-pw"),
            )
            .expect("seal")
            .encode(),
    );
    // A delivery not signed by the relay is ignored outright.
    let forged = signed::sign(
        &Delivery::single(
            GroupName::new("g1").expect("g"),
            Offset(7),
            pwsync_proto::hlc::wall_ms(),
            alice.encode(),
        ),
        &SigningKey::generate().expect("key"),
    )
    .expect("sign");
    probe.publish(
        &c.rt,
        &topics::down(&GroupName::new("g1").expect("g")),
        forged,
    );

    wait_until(Duration::from_secs(20), "six records processed", || {
        c.consumer_status(k)["committed"].as_u64() == Some(6)
    });
    wait_until(
        Duration::from_secs(5),
        "the forged delivery counted",
        || c.consumer_counter(k, "forged_delivery") == 1,
    );
    let ht = c.consumers[k].dir.join("htpasswd");
    assert!(htpasswd_verifies(&ht, "alice", "alice-pw-1"));
    assert!(htpasswd_verifies(&ht, "bob", "bob-pw"));
    let file = std::fs::read_to_string(&ht).expect("htpasswd");
    assert!(!file.contains("mallory"), "{file}");
    for (reason, n) in [
        ("unknown_agent", 1),
        ("bad_signature", 1),
        ("out_of_scope", 1),
        ("replayed", 1),
    ] {
        assert_eq!(
            c.consumer_counter(k, reason),
            n,
            "{reason}: {}",
            c.consumer_status(k)
        );
    }
    let logs = c.all_logs();
    for pw in [
        "alice-pw-1",
        "ghost-pw",
        "impostor-pw",
        "mallory-pw",
        "bob-pw",
    ] {
        assert!(!logs.contains(pw), "{pw} in a log");
    }
}

#[test]
fn an_older_replace_arriving_after_a_newer_one_does_not_win() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let b = c.add_agent("host-b", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let newer = sealer(&c, "host-b", agent_key(&c, b))
        .seal(
            Seq(1),
            Hlc::new(2_000, 0),
            &replace("alice", "host-b", "newer"),
        )
        .expect("seal");
    let older = sealer(&c, "host-a", agent_key(&c, a))
        .seal(
            Seq(1),
            Hlc::new(1_000, 0),
            &replace("alice", "host-a", "older"),
        )
        .expect("seal");
    deliver(&c, &probe, "g1", 1, newer.encode());
    deliver(&c, &probe, "g1", 2, older.encode());
    wait_until(Duration::from_secs(20), "both processed", || {
        c.consumer_status(k)["committed"].as_u64() == Some(2)
    });
    let ht = c.consumers[k].dir.join("htpasswd");
    assert!(htpasswd_verifies(&ht, "alice", "newer"));
    assert!(!htpasswd_verifies(&ht, "alice", "older"));
    assert_eq!(c.consumer_counter(k, "stale"), 1);
}

/// A change made on a target's own system is applied there too when pwsync wrote an older
/// change of that user there after it was made (a retry or a backlog that landed late): else
/// that system would keep the older password while every other has the newer one. Found by
/// the simulator (`sim.rs`).
#[test]
fn a_systems_own_change_overwritten_by_an_older_one_is_set_there_again() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let mut seal = sealer(&c, "host-a", agent_key(&c, a));
    let ht = c.consumers[k].dir.join("htpasswd");
    // Alice set "Own-newer-2" on the web server itself at `made`; before that change reached
    // pwsync, pwsync applied an older change from elsewhere there.
    let made = pwsync_proto::hlc::wall_ms();
    let older = seal
        .seal(
            Seq(1),
            Hlc::new(made - 60_000, 0),
            &replace("alice", "host-a", "Older-1"),
        )
        .expect("seal");
    deliver(&c, &probe, "g1", 1, older.encode());
    wait_until(Duration::from_secs(20), "the older change", || {
        htpasswd_verifies(&ht, "alice", "Older-1")
    });
    let own = seal
        .seal(
            Seq(2),
            Hlc::new(made, 0),
            &replace("alice", "web", "Own-newer-2"),
        )
        .expect("seal");
    deliver(&c, &probe, "g1", 2, own.encode());
    wait_until(
        Duration::from_secs(20),
        "the web server's own change",
        || c.consumer_status(k)["committed"].as_u64() == Some(2),
    );
    assert!(
        htpasswd_verifies(&ht, "alice", "Own-newer-2"),
        "the web server keeps the older password"
    );
    assert_eq!(c.consumer_counter(k, "origin_restored"), 1);
}

#[test]
fn a_change_is_never_written_back_to_its_origin_and_echoes_do_not_bounce() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("sys-a", AgentOptions::default());
    let b = c.add_agent("sys-b", AgentOptions::default());
    let targets = "[targets.a]\ntype = \"htpasswd\"\nsystem = \"sys-a\"\npath = \"a.htpasswd\"\ncost = 4\n\n[targets.b]\ntype = \"htpasswd\"\nsystem = \"sys-b\"\npath = \"b.htpasswd\"\ncost = 4\n";
    let k = c.add_consumer("k", "g1", targets);
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    c.start_agent(b);
    // Alice changes her password on sys-a; its agent reports it.
    assert!(matches!(
        c.submit(a, "alice", Op::Replace, Some("from-a")),
        Response::Accepted { .. }
    ));
    let dir = c.consumers[k].dir.clone();
    wait_until(Duration::from_secs(20), "sys-b to get it", || {
        dir.join("b.htpasswd").exists()
            && htpasswd_verifies(&dir.join("b.htpasswd"), "alice", "from-a")
    });
    // pwsync set it on sys-b, whose own agent reports the same value back: an echo.
    assert!(matches!(
        c.submit(b, "alice", Op::Replace, Some("from-a")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(20), "the echo to be seen", || {
        c.consumer_counter(k, "echo") == 1
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !dir.join("a.htpasswd").exists(),
        "written back to its origin"
    );
    let status = c.consumer_status(k);
    assert_eq!(
        status["targets"]["b"]["applied"].as_u64(),
        Some(1),
        "{status}"
    );
    assert_eq!(
        status["targets"]["a"]["applied"].as_u64(),
        Some(0),
        "{status}"
    );
    // A real new change on sys-b does reach sys-a.
    assert!(matches!(
        c.submit(b, "alice", Op::Replace, Some("from-b")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(20), "sys-a to get the new one", || {
        dir.join("a.htpasswd").exists()
            && htpasswd_verifies(&dir.join("a.htpasswd"), "alice", "from-b")
    });
}

fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
}

#[test]
fn exec_retries_on_75_applies_once_and_dead_letters_on_1_until_retried() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer(
        "k",
        "g1",
        "[retry]\nbase_ms = 100\nmax_secs = 1\n\n[targets.app]\ntype = \"exec\"\nsystem = \"app\"\ncommand = [\"./hook.sh\"]\n",
    );
    let dir = c.consumers[k].dir.clone();
    // Exit 75 for the first three calls, then record the change; exit 1 for user "broken"
    // unless the fix file exists.
    script(
        &dir.join("hook.sh"),
        "cd \"$(dirname \"$0\")\"\ndoc=$(cat)\ncase \"$doc\" in *'\"user\":\"broken\"'*) [ -e fixed ] || { echo 'target refused' >&2; exit 1; };; esac\nn=$(cat calls 2>/dev/null || echo 0); echo $((n+1)) > calls\n[ \"$n\" -lt 3 ] && exit 75\necho \"$doc\" >> applied\nexit 0",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    assert!(matches!(
        c.submit(a, "alice", Op::Replace, Some("exec-pw")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(30),
        "the change applied after three 75s",
        || dir.join("applied").exists(),
    );
    std::thread::sleep(Duration::from_millis(800));
    let applied = std::fs::read_to_string(dir.join("applied")).expect("applied");
    assert_eq!(applied.lines().count(), 1, "{applied}");
    assert!(applied.contains("\"op\":\"replace\"") && applied.contains("exec-pw"));
    assert_eq!(
        std::fs::read_to_string(dir.join("calls"))
            .expect("calls")
            .trim(),
        "4"
    );

    assert!(matches!(
        c.submit(a, "broken", Op::Replace, Some("broken-pw")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "a dead letter", || {
        c.consumer_status(k)["targets"]["app"]["dead_lettered"].as_u64() == Some(1)
    });
    c.consumer(k).stop();
    let cfg = c.consumers[k].config.display().to_string();
    let ls = c.tool("pwsync-consumer", &["--config", &cfg, "deadletter", "ls"]);
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    assert!(
        ls.contains("app\tbroken\treplace") && ls.contains("target refused"),
        "{ls}"
    );
    assert!(!ls.contains("broken-pw"), "a password in deadletter ls");
    std::fs::write(dir.join("fixed"), "").expect("fix");
    let retry = c.tool(
        "pwsync-consumer",
        &["--config", &cfg, "deadletter", "retry"],
    );
    assert!(
        retry.status.success(),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    c.start_consumer(k);
    wait_until(
        Duration::from_secs(30),
        "the retried dead letter applied",
        || {
            std::fs::read_to_string(dir.join("applied"))
                .map(|t| t.contains("broken-pw"))
                .unwrap_or(false)
        },
    );
    c.consumer(k).stop();
    let ls = c.tool("pwsync-consumer", &["--config", &cfg, "deadletter", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).trim().is_empty());
}

#[test]
fn a_failing_target_does_not_hold_back_another() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("[retry]\nbase_ms = 200\nmax_secs = 2\n\n[targets.down]\ntype = \"exec\"\nsystem = \"down\"\ncommand = [\"./down.sh\"]\n\n{HT_TARGET}"),
    );
    let dir = c.consumers[k].dir.clone();
    script(&dir.join("down.sh"), "cat > /dev/null\nexit 75");
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    for i in 0..5 {
        assert!(matches!(
            c.submit(a, &format!("u{i}"), Op::Replace, Some(&format!("pw{i}"))),
            Response::Accepted { .. }
        ));
    }
    wait_until(
        Duration::from_secs(20),
        "the healthy target to have all five",
        || {
            (0..5).all(|i| {
                dir.join("htpasswd").exists()
                    && htpasswd_verifies(&dir.join("htpasswd"), &format!("u{i}"), &format!("pw{i}"))
            })
        },
    );
    // The status file is written once a second.
    wait_until(
        Duration::from_secs(5),
        "the status to show all five",
        || c.consumer_status(k)["committed"].as_u64() == Some(5),
    );
    let s = c.consumer_status(k);
    assert_eq!(s["targets"]["down"]["applied"].as_u64(), Some(0), "{s}");
    assert_eq!(s["targets"]["down"]["retry_depth"].as_u64(), Some(5), "{s}");
    assert_eq!(
        s["committed"].as_u64(),
        Some(5),
        "the journal offset waits for no retry"
    );
}

#[test]
fn through_the_whole_path_the_htpasswd_file_holds_every_users_last_password() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let changes: Vec<(String, String)> = (0..3)
        .flat_map(|round| {
            (0..20).map(move |u| (format!("user{u}"), format!("round{round}-user{u}")))
        })
        .collect();
    // Sequentially per round so "last" is well defined.
    for round in changes.chunks(20) {
        assert!(c
            .submit_many(a, round.to_vec(), 20)
            .iter()
            .all(|r| matches!(r, Response::Accepted { .. })));
    }
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(Duration::from_secs(30), "all 60 changes applied", || {
        c.consumer_status(k)["committed"].as_u64() == Some(60)
    });
    for u in 0..20 {
        assert!(
            htpasswd_verifies(&ht, &format!("user{u}"), &format!("round2-user{u}")),
            "user{u}"
        );
    }
    assert!(!c.all_logs().contains("round2-user"));
    let st = c.tool(
        "pwsync-consumer",
        &[
            "--config",
            &c.consumers[k].config.display().to_string(),
            "status",
            "--user",
            "user3",
        ],
    );
    assert!(
        String::from_utf8_lossy(&st.stdout).contains("web\tapplied replace"),
        "{}",
        String::from_utf8_lossy(&st.stdout)
    );
}

#[test]
fn a_dry_run_logs_what_it_would_apply_and_applies_and_commits_nothing() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_agent(a);
    assert!(matches!(
        c.submit(a, "alice", Op::Replace, Some("dry-pw")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(20),
        "the change to be journaled",
        || c.status(a).spool_records == 0,
    );
    let log = c.consumers[k].dir.join("dry-run.log");
    let config = c.consumers[k].config.display().to_string();
    let mut dry = pwsync_tests::Daemon::start(
        "dry-run",
        pwsync_tests::bin("pwsync-consumer"),
        &["--config", &config, "run", "--dry-run"],
        log,
    );
    wait_until(
        Duration::from_secs(20),
        "the dry run to see the change",
        || dry.log_text().contains("dry run: would apply"),
    );
    dry.stop();
    let text = dry.log_text();
    assert!(
        text.contains("user=alice") && !text.contains("dry-pw"),
        "{text}"
    );
    assert!(
        !c.consumers[k].dir.join("htpasswd").exists(),
        "a dry run wrote the target"
    );
    // Nothing was committed: a real run afterwards still gets the change.
    c.start_consumer(k);
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(Duration::from_secs(30), "the real run to apply it", || {
        ht.exists() && htpasswd_verifies(&ht, "alice", "dry-pw")
    });
}

#[test]
fn a_change_from_an_agent_the_consumer_does_not_know_yet_is_kept_and_applied_after_enrolment() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    // This consumer reads its own, still empty, agents folder: host-a is enrolled at the relay only.
    let dir = c.consumers[k].dir.clone();
    std::fs::create_dir_all(dir.join("agents")).expect("mkdir");
    let cfg = std::fs::read_to_string(&c.consumers[k].config).expect("config");
    std::fs::write(
        &c.consumers[k].config,
        cfg.replace(
            "agents_dir = \"../relay/agents\"",
            "agents_dir = \"agents\"",
        ),
    )
    .expect("config");
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    assert!(matches!(
        c.submit(a, "erin", Op::Replace, Some("enrol-later")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(20), "the record processed", || {
        c.consumer_status(k)["committed"].as_u64() == Some(1)
    });
    assert_eq!(c.consumer_counter(k, "unknown_agent"), 1);
    c.consumer(k).stop();
    let config = c.consumers[k].config.display().to_string();
    let ls = c.tool(
        "pwsync-consumer",
        &["--config", &config, "deadletter", "ls"],
    );
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    assert!(
        ls.contains("\t*\t?\t(not opened)\thost-a seq 1\tunknown_agent"),
        "{ls}"
    );
    // The operator enrols host-a here too and retries.
    std::fs::copy(
        c.relay_dir.join("agents/host-a.pub"),
        dir.join("agents/host-a.pub"),
    )
    .expect("enrol");
    let retry = c.tool(
        "pwsync-consumer",
        &["--config", &config, "deadletter", "retry"],
    );
    assert!(
        retry.status.success(),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    c.start_consumer(k);
    let ht = dir.join("htpasswd");
    wait_until(Duration::from_secs(20), "the kept change applied", || {
        ht.exists() && htpasswd_verifies(&ht, "erin", "enrol-later")
    });
}

/// The operations table of the README, on every kind of target at once (htpasswd, LDAP, a
/// PostgreSQL role, an exec program's store), each proven by the system's own login: replace, delete and replace of the
/// same value (the last replace is no echo), a revoke that holds through a replace until resume,
/// an older revoke arriving after a newer resume (changes nothing), and remove (final).
#[test]
fn every_operation_means_the_same_on_every_target_and_in_capture_order() {
    use pwsync_tests::pg::{Pg, SUPERUSER_PW};
    use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW};
    let Some(slapd) = Slapd::start() else { return };
    let Some(pg) = Pg::start() else { return };
    slapd.add_user("alice", "Initial-pw-0");
    pg.sql("CREATE ROLE alice LOGIN PASSWORD 'Initial-pw-0'");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let secret = |name: &str, text: &str| {
        let p = c.path().join(name);
        std::fs::write(&p, text).expect("secret");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        p.display().to_string()
    };
    let (ldap_pw, pg_pw) = (secret("ldap.pw", ADMIN_PW), secret("pg.pw", SUPERUSER_PW));
    let store = c.path().join("store.json");
    assert!(pwsync_tests::exec_store(
        "create",
        &store,
        "alice",
        b"Initial-pw-0"
    ));
    let targets = format!(
        "{HT_TARGET}\n[targets.app]\ntype = \"exec\"\nsystem = \"app\"\ncommand = [{:?}, \"apply\", {store:?}]\n\n[targets.dir]\ntype = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"{ldap_pw}\"\npassword_mode = \"ssha\"\ndn_template = \"uid={{user}},ou=people,dc=example,dc=org\"\n\n\
         [targets.db]\ntype = \"postgres\"\nsystem = \"pg\"\nmode = \"role\"\nconnect = \"host=127.0.0.1 port={} user=postgres dbname=postgres\"\npassword_file = \"{pg_pw}\"\n",
        pwsync_tests::bin("pwsync-exec-store"),
        slapd.url(),
        pg.port
    );
    let k = c.add_consumer("k", "g1", &targets);
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let mut seal = sealer(&c, "host-a", agent_key(&c, a));
    let ht = c.consumers[k].dir.join("htpasswd");
    let logs_in = |pw: &str| {
        [
            htpasswd_verifies(&ht, "alice", pw),
            slapd.binds("alice", pw),
            pg.logs_in("alice", pw),
            pwsync_tests::exec_store("login", &store, "alice", pw.as_bytes()),
        ]
    };
    let mut offset = 0;
    let mut send = |op: Op, pw: Option<&str>, hlc: u64| {
        offset += 1;
        let change = Change::new(
            "alice",
            "host-a",
            op,
            pw.map(Secret::from).into_iter().collect(),
        );
        let env = seal
            .seal(Seq(offset), Hlc::new(hlc, 0), &change)
            .expect("seal");
        deliver(&c, &probe, "g1", offset, env.encode());
        let want = offset;
        wait_until(
            Duration::from_secs(20),
            "the change to be processed",
            || c.consumer_status(k)["committed"].as_u64() == Some(want),
        );
    };
    send(Op::Replace, Some("Same-pw-1"), 1_000);
    assert_eq!(logs_in("Same-pw-1"), [true; 4]);
    send(Op::Delete, Some("Same-pw-1"), 2_000);
    assert_eq!(
        logs_in("Same-pw-1"),
        [false; 4],
        "delete of the current password"
    );
    send(Op::Replace, Some("Same-pw-1"), 3_000);
    assert_eq!(
        logs_in("Same-pw-1"),
        [true; 4],
        "the last replace is not an echo: {}\n{}",
        c.consumer_status(k),
        c.consumers[k]
            .daemon
            .as_ref()
            .map(|d| d.log_text())
            .unwrap_or_default()
    );
    send(Op::Revoke, None, 4_000);
    assert_eq!(logs_in("Same-pw-1"), [false; 4], "revoked");
    send(Op::Replace, Some("While-locked-2"), 5_000);
    assert_eq!(
        logs_in("While-locked-2"),
        [false; 4],
        "a replace does not undo a revoke"
    );
    send(Op::Resume, None, 6_000);
    assert_eq!(
        logs_in("While-locked-2"),
        [true; 4],
        "resumed with the newest password"
    );
    // A revoke captured before that resume (a host that was offline) arrives now.
    send(Op::Revoke, None, 5_500);
    assert_eq!(
        logs_in("While-locked-2"),
        [true; 4],
        "an older revoke changes nothing"
    );
    send(Op::Remove, None, 7_000);
    assert_eq!(logs_in("While-locked-2"), [false; 4], "removed");
    send(Op::Replace, Some("After-remove-3"), 8_000);
    send(Op::Resume, None, 9_000);
    assert_eq!(logs_in("After-remove-3"), [false; 4], "remove is final");
    assert_eq!(logs_in("While-locked-2"), [false; 4], "remove is final");
    assert_eq!(c.consumer_counter(k, "stale"), 1);
    assert_eq!(c.consumer_counter(k, "after_remove"), 2);
    assert_eq!(c.consumer_counter(k, "echo"), 0);
}

/// Value adds and deletes fold in capture order as whole values: one that arrives late, after
/// later ones, takes its place (applied, then the later ones again), unless a newer replace
/// set the whole value after it. On LDAP, where `userPassword` holds several passwords, proven
/// by binds: the passwords the capture order leaves bind, every other does not.
#[test]
fn value_adds_and_deletes_arriving_late_take_their_place_in_capture_order() {
    use pwsync_tests::slapd::Slapd;
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("alice", "Initial-pw-0");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let targets = slapd.target_section("dir", &c.path().join("ldap.pw"));
    let k = c.add_consumer("k", "g1", &targets);
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let mut seal = sealer(&c, "host-a", agent_key(&c, a));
    let mut offset = 0;
    let mut send = |op: Op, pw: &str, hlc: u64| {
        offset += 1;
        let change = Change::new("alice", "host-a", op, vec![Secret::from(pw)]);
        let env = seal
            .seal(Seq(offset), Hlc::new(hlc, 0), &change)
            .expect("seal");
        deliver(&c, &probe, "g1", offset, env.encode());
        let want = offset;
        wait_until(
            Duration::from_secs(20),
            "the change to be processed",
            || c.consumer_status(k)["committed"].as_u64() == Some(want),
        );
    };
    // In capture order: Old-pw-6 added (900); Base-pw-1 replaces all (1000); Base-pw-1
    // deleted (1500); Early-pw-3 added (2000); Late-pw-4 added (2500); Added-pw-2 added (3000);
    // Early-pw-3 deleted (4000). In journal order:
    send(Op::Replace, "Base-pw-1", 1_000);
    send(Op::Add, "Added-pw-2", 3_000);
    send(Op::Delete, "Early-pw-3", 4_000); // nothing to delete yet
    send(Op::Add, "Early-pw-3", 2_000); // late: the delete after it is applied again
    send(Op::Add, "Late-pw-4", 2_500); // late: kept, the later ops are applied again
    send(Op::Delete, "Base-pw-1", 1_500); // late, after the replace: it goes
    send(Op::Add, "Old-pw-6", 900); // before the replace: superseded
    let binds: Vec<bool> = [
        "Base-pw-1",
        "Added-pw-2",
        "Early-pw-3",
        "Late-pw-4",
        "Old-pw-6",
        "Initial-pw-0",
    ]
    .iter()
    .map(|pw| slapd.binds("alice", pw))
    .collect();
    assert_eq!(
        binds,
        [false, true, false, true, false, false],
        "the passwords capture order leaves: {}",
        c.consumer_status(k)
    );
    assert_eq!(c.consumer_counter(k, "stale"), 1);
    assert!(c.consumer_counter(k, "value_ops_reapplied") >= 3);
}

/// Two source users one target takes for one account never overwrite each other: here a `map`
/// sends `Alice` to the LDAP entry `alice` while `alice` is a source user too (no static check
/// sees that). The first whose change applied holds the entry; the other's change there is a
/// dead letter naming both and shown by `status`, while a target that tells them apart
/// (htpasswd) keeps both. The holder's later changes still apply.
#[test]
fn two_source_users_one_target_takes_for_one_account_do_not_overwrite_each_other() {
    use pwsync_tests::slapd::Slapd;
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("alice", "Initial-pw-0");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let targets = format!(
        "{HT_TARGET}\n{}map = {{ \"Alice\" = \"alice\" }}\n",
        slapd.target_section("dir", &c.path().join("ldap.pw"))
    );
    let k = c.add_consumer("k", "g1", &targets);
    c.start_relay();
    c.start_consumer(k);
    let probe = c.probe_as_relay("probe-as-relay", &[]);
    let mut seal = sealer(&c, "host-a", agent_key(&c, a));
    let mut offset = 0;
    let mut send = |user: &str, pw: &str| {
        offset += 1;
        let env = seal
            .seal(
                Seq(offset),
                Hlc::new(1_000 * offset, 0),
                &replace(user, "host-a", pw),
            )
            .expect("seal");
        deliver(&c, &probe, "g1", offset, env.encode());
        let want = offset;
        wait_until(Duration::from_secs(20), "the change", || {
            c.consumer_status(k)["committed"].as_u64() == Some(want)
        });
    };
    let ht = c.consumers[k].dir.join("htpasswd");
    send("alice", "Alice-own-1");
    assert!(slapd.binds("alice", "Alice-own-1"));
    send("Alice", "Other-user-2");
    assert!(
        slapd.binds("alice", "Alice-own-1"),
        "the other user's change overwrote the entry"
    );
    assert!(!slapd.binds("alice", "Other-user-2"));
    assert!(htpasswd_verifies(&ht, "alice", "Alice-own-1"));
    assert!(htpasswd_verifies(&ht, "Alice", "Other-user-2"));
    assert_eq!(c.consumer_counter(k, "account_collision"), 1);
    let status = c.consumer_status(k);
    let note = status["users"]["Alice"]["dir"].as_str().unwrap_or_default();
    assert!(
        note.contains("dead letter") && note.contains("held by source user \"alice\""),
        "{status}"
    );
    send("alice", "Alice-later-3");
    assert!(slapd.binds("alice", "Alice-later-3"));
}

/// A host whose clock runs 400 days ahead (the real agent under libfaketime) does not silence
/// the user's later changes made on other hosts, nor its own: the consumer orders each change by
/// the relay's journal time where the host's clock is ahead of it. The host is reported by the
/// relay (`pwsync-relay agents`, log) and the consumer (counter, log).
#[test]
fn a_host_clock_far_ahead_does_not_hide_later_changes_and_is_reported() {
    let Some(faketime) = pwsync_tests::libfaketime() else {
        return;
    };
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let b = c.add_agent("host-ahead", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let preload = faketime.display().to_string();
    c.start_agent_with_env(
        b,
        &[
            ("LD_PRELOAD", &preload),
            ("FAKETIME", "+400d"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let ht = c.consumers[k].dir.join("htpasswd");
    let mut committed = 0;
    let mut change = |agent: usize, password: &str| {
        assert!(matches!(
            c.submit(agent, "alice", Op::Replace, Some(password)),
            Response::Accepted { .. }
        ));
        committed += 1;
        wait_until(Duration::from_secs(20), password, || {
            c.consumer_status(k)["committed"].as_u64() == Some(committed)
        });
        assert!(
            htpasswd_verifies(&ht, "alice", password),
            "{password} is not alice's password"
        );
        // Journal times are milliseconds: the next change is journaled later.
        std::thread::sleep(Duration::from_millis(20));
    };
    change(b, "From-the-future-1");
    change(a, "Made-later-2");
    change(b, "Ahead-again-3");
    change(a, "Made-last-4");
    assert_eq!(c.consumer_counter(k, "clock_ahead"), 2);
    assert_eq!(c.consumer_counter(k, "stale"), 0);
    let log = c.consumers[k]
        .daemon
        .as_ref()
        .map(|d| d.log_text())
        .unwrap_or_default();
    assert!(
        log.contains("clock ran ahead") && log.contains("host-ahead"),
        "{log}"
    );
    // The relay shows the host's clock, from the record it writes every 2 s.
    let config = c.relay_config.display().to_string();
    let mut table = String::new();
    let shown = pwsync_tests::process::wait_for(Duration::from_secs(10), || {
        let out = c.tool("pwsync-relay", &["--config", &config, "agents"]);
        table = String::from_utf8_lossy(&out.stdout).into_owned();
        table.contains("host-a\tyes")
    });
    assert!(shown, "{table}");
    let row = |agent: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{agent}\t")))
            .unwrap_or_default()
            .to_string()
    };
    // 400 days less the time between capture and journaling, in whole days.
    let ahead_days = row("host-ahead")
        .rsplit('\t')
        .next()
        .and_then(|c| c.strip_suffix("d AHEAD"))
        .and_then(|d| d.parse::<u64>().ok());
    assert!(matches!(ahead_days, Some(399 | 400)), "{table}");
    assert!(row("host-a").ends_with("\tok"), "{table}");
    let relay_log = c.relay.as_ref().map(|d| d.log_text()).unwrap_or_default();
    assert_eq!(
        relay_log
            .lines()
            .filter(|l| l.contains("clock runs ahead of the relay's"))
            .count(),
        1,
        "one warning a minute per agent: {relay_log}"
    );
}

/// `pwsync-consumer TOOL ARGS…` against consumer `k`'s config: (success, stdout, stderr).
fn consumer_tool(c: &Cluster, k: usize, args: &[&str]) -> (bool, String, String) {
    let cfg = c.consumers[k].config.display().to_string();
    let mut all = vec!["--config", cfg.as_str()];
    all.extend_from_slice(args);
    let out = c.tool("pwsync-consumer", &all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Issue 32: every dead-letter command works through the running consumer (its admin socket):
/// `ls` with the whole reason, `retry` applies now (proven by the store's own login), a retry
/// of a change older than what the target holds now is refused in words and kept, `drop`
/// removes it, and `status` counts them. The consumer never stops.
#[test]
fn dead_letters_are_listed_retried_in_order_and_dropped_while_the_consumer_runs() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let store = c.path().join("store.json");
    assert!(pwsync_tests::exec_store(
        "create",
        &store,
        "dora",
        b"Initial-pw-0"
    ));
    let k = c.add_consumer(
        "k",
        "g1",
        "[targets.app]\ntype = \"exec\"\nsystem = \"app\"\ncommand = [\"./hook.sh\"]\n",
    );
    let dir = c.consumers[k].dir.clone();
    // The application refuses every change until it is "fixed", then takes them into its store.
    script(
        &dir.join("hook.sh"),
        &format!(
            "cd \"$(dirname \"$0\")\"\n[ -e fixed ] || {{ cat > /dev/null; echo 'target refused: the application is in maintenance, use its admin console to end it' >&2; exit 1; }}\nexec {:?} apply {store:?}",
            pwsync_tests::bin("pwsync-exec-store")
        ),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let dead = |c: &Cluster| c.consumer_status(k)["targets"]["app"]["dead_lettered"].as_u64();
    let logs_in = |pw: &str| pwsync_tests::exec_store("login", &store, "dora", pw.as_bytes());

    assert!(matches!(
        c.submit(a, "dora", Op::Replace, Some("First-pw-1")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "a dead letter", || {
        dead(&c) == Some(1)
    });
    let (ok, ls, err) = consumer_tool(&c, k, &["deadletter", "ls"]);
    assert!(ok, "deadletter ls beside the running consumer: {err}");
    let first_id = ls.split('\t').next().unwrap_or_default().trim().to_string();
    assert!(
        ls.contains("app\tdora\treplace") && ls.contains("use its admin console to end it"),
        "the whole reason: {ls}"
    );
    assert!(!ls.contains("First-pw-1"), "a password in deadletter ls");
    // The log keeps the whole reason too, with the way out at its end.
    assert!(
        c.consumer(k)
            .log_text()
            .contains("use its admin console to end it"),
        "the dead letter's reason cut in the log"
    );
    wait_until(Duration::from_secs(5), "status to count it", || {
        consumer_tool(&c, k, &["status"])
            .1
            .contains("dead letters 1 ")
    });

    std::fs::write(dir.join("fixed"), "").expect("fix");
    let (ok, out, err) = consumer_tool(&c, k, &["deadletter", "retry"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("{first_id}: applied replace of dora at app")),
        "{out}"
    );
    assert!(
        logs_in("First-pw-1"),
        "the retried change at the store's own login"
    );
    assert!(consumer_tool(&c, k, &["deadletter", "ls"])
        .1
        .trim()
        .is_empty());

    // A change that fails, then a newer one that applies: the older one must not come back.
    std::fs::remove_file(dir.join("fixed")).expect("unfix");
    assert!(matches!(
        c.submit(a, "dora", Op::Replace, Some("Second-pw-2")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "a second dead letter", || {
        dead(&c) == Some(2)
    });
    std::fs::write(dir.join("fixed"), "").expect("fix");
    assert!(matches!(
        c.submit(a, "dora", Op::Replace, Some("Third-pw-3")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "the newest change applied", || {
        logs_in("Third-pw-3")
    });
    let ls = consumer_tool(&c, k, &["deadletter", "ls"]).1;
    let second_id = ls.split('\t').next().unwrap_or_default().trim().to_string();
    assert!(ls.contains("app\tdora\treplace"), "{ls}");
    let (ok, out, err) = consumer_tool(&c, k, &["deadletter", "retry", &second_id]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "{second_id}: refused, kept: a newer password change of dora"
        )) && out.contains("is already applied at app"),
        "{out}"
    );
    assert!(
        logs_in("Third-pw-3") && !logs_in("Second-pw-2"),
        "the newest stays"
    );
    assert!(consumer_tool(&c, k, &["deadletter", "ls"])
        .1
        .contains(&second_id));

    let (ok, out, err) = consumer_tool(&c, k, &["deadletter", "drop", &second_id]);
    assert!(ok && out.contains("dropped 1 dead letters"), "{out}{err}");
    assert!(consumer_tool(&c, k, &["deadletter", "ls"])
        .1
        .trim()
        .is_empty());
    assert!(c.consumer(k).is_running(), "the consumer ran throughout");
    let logs = c.all_logs();
    for pw in ["First-pw-1", "Second-pw-2", "Third-pw-3"] {
        assert!(!logs.contains(pw), "{pw} in a log");
    }
}

/// Issue 32: `pwsync-consumer reload` (and SIGHUP) takes a new target without a restart and
/// without losing a change in flight; a config that does not pass `check` is refused in words
/// and the running one goes on.
#[test]
fn a_reload_adds_a_target_without_losing_a_change_and_a_broken_config_is_refused() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let dir = c.consumers[k].dir.clone();
    let (web, web2) = (dir.join("htpasswd"), dir.join("htpasswd2"));
    let cfg_path = c.consumers[k].config.clone();
    let original = std::fs::read_to_string(&cfg_path).expect("config");

    // Changes flow while the config grows a second target and is reloaded.
    let users: Vec<String> = (0..40).map(|i| format!("u{i:02}")).collect();
    for u in &users[..20] {
        assert!(matches!(
            c.submit(a, u, Op::Replace, Some(&format!("pw-{u}-1"))),
            Response::Accepted { .. }
        ));
    }
    std::fs::write(
        &cfg_path,
        format!("{original}\n[targets.web2]\ntype = \"htpasswd\"\nsystem = \"web2\"\npath = \"htpasswd2\"\ncost = 4\n"),
    )
    .expect("config");
    let (ok, out, err) = consumer_tool(&c, k, &["reload"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("added [\"web2\"]"), "{out}");
    for u in &users[20..] {
        assert!(matches!(
            c.submit(a, u, Op::Replace, Some(&format!("pw-{u}-1"))),
            Response::Accepted { .. }
        ));
    }
    wait_until(Duration::from_secs(60), "every change at web", || {
        web.exists()
            && users
                .iter()
                .all(|u| htpasswd_verifies(&web, u, &format!("pw-{u}-1")))
    });
    assert!(matches!(
        c.submit(a, "newcomer", Op::Replace, Some("pw-new-1")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(30),
        "the next change at the new target",
        || web2.exists() && htpasswd_verifies(&web2, "newcomer", "pw-new-1"),
    );

    // A broken config: refused, in words; the running config goes on.
    std::fs::write(
        &cfg_path,
        format!("{original}\n[targets.bad]\ntype = \"htpasswd\"\nsystem = \"bad\"\npath = \"/nonexistent-dir/htpasswd\"\ncost = 4\n"),
    )
    .expect("config");
    let (ok, out, err) = consumer_tool(&c, k, &["reload"]);
    assert!(!ok, "a broken config reloaded: {out}");
    assert!(
        err.contains("does not pass `check`") && err.contains("the running config stays"),
        "{err}"
    );
    // A section that needs a restart: refused too.
    std::fs::write(
        &cfg_path,
        original.replace("[state]", "[metrics]\nlisten = \"127.0.0.1:1\"\n\n[state]"),
    )
    .expect("config");
    let (ok, _, err) = consumer_tool(&c, k, &["reload"]);
    assert!(!ok && err.contains("takes a restart"), "{err}");
    assert!(matches!(
        c.submit(a, "later", Op::Replace, Some("pw-later-1")),
        Response::Accepted { .. }
    ));
    wait_until(
        Duration::from_secs(30),
        "a change after the refusals, at both targets",
        || {
            htpasswd_verifies(&web, "later", "pw-later-1")
                && htpasswd_verifies(&web2, "later", "pw-later-1")
        },
    );

    // SIGHUP reloads too: back to the original config, web2 is no longer written.
    std::fs::write(&cfg_path, &original).expect("config");
    let pid = c.consumer(k).pid().expect("pid");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    wait_until(Duration::from_secs(20), "the SIGHUP reload logged", || {
        c.consumer(k).log_text().contains("removed [\"web2\"]")
    });
    assert!(matches!(
        c.submit(a, "last", Op::Replace, Some("pw-last-1")),
        Response::Accepted { .. }
    ));
    wait_until(Duration::from_secs(30), "a change after SIGHUP", || {
        htpasswd_verifies(&web, "last", "pw-last-1")
    });
    assert!(!htpasswd_verifies(&web2, "last", "pw-last-1"));
    assert!(c.consumer(k).is_running());
}
