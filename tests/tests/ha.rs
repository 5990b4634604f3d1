//! Relays on several machines (issue 21): two relays sharing one journal on a three-node NATS
//! JetStream cluster, agents and a consumer listing both relays.
//!
//! - a stream of changes while one NATS node and one relay are SIGKILLed at seeded random
//!   moments and brought back: every user's last password verifies at the target, nothing is
//!   lost, and no `(agent, seq)` is applied twice;
//! - a relay stopped (SIGSTOP) under its connected agents and consumer: they move to the other
//!   relay and the changes arrive within the documented failover time;
//! - the cluster without quorum: agents keep accepting durably, the relays report it on
//!   `/healthz`, and everything arrives once the cluster is whole again; over 20 s without a
//!   quorum each relay writes a few warnings about it, each repeated error once with its count.
//!
//! The seed is printed; rerun with `PWSYNC_HA_SEED=<seed> cargo test -p pwsync-tests --test ha`.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::nats::NatsCluster;
use pwsync_tests::{free_port, wait_until, Cluster, HT_TARGET};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// splitmix64: small and seedable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const AGENTS: usize = 2;

/// Two JetStream relays, `AGENTS` agents and one htpasswd consumer, all started; the agents
/// and the consumer list both relays (the first relay first).
fn ha_cluster(nats: &NatsCluster) -> (Cluster, usize, u16) {
    let mut c = Cluster::new(&["g1"], "");
    let metrics = free_port();
    c.use_jetstream(&nats.journal_section(3), metrics);
    c.add_relay_replica();
    for i in 0..AGENTS {
        c.add_agent(&format!("host-{i}"), AgentOptions::default());
    }
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_relay_replica(0);
    c.start_consumer(k);
    for i in 0..AGENTS {
        c.start_agent(i);
    }
    (c, k, metrics)
}

fn submit(c: &Cluster, agent: usize, user: &str, password: &str) {
    match c.try_submit(agent, user, Op::Replace, Some(password)) {
        Ok(Response::Accepted { durable: true, .. }) => {}
        other => panic!("submit of {user} to host-{agent}: {other:?}"),
    }
}

/// Waits until every user's password verifies at the consumer's htpasswd file.
fn wait_all_verify(c: &Cluster, k: usize, expected: &BTreeMap<String, String>, within: Duration) {
    let ht = c.consumers[k].dir.join("htpasswd");
    let mut pending: Vec<(String, String)> = expected.clone().into_iter().collect();
    wait_until(within, "every user's last password at the target", || {
        pending.retain(|(u, p)| !pwsync_tests::htpasswd_verifies(&ht, u, p));
        pending.is_empty()
    });
}

/// Every `(agent, seq)` the consumer logged as applied, and how often.
fn applied_counts(log: &str) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(" applied")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(agent), Some(seq)) = (field("agent="), field("seq=")) {
            *out.entry((agent, seq)).or_insert(0) += 1;
        }
    }
    out
}

fn assert_applied_once(c: &mut Cluster, k: usize, at_least: usize) {
    let log = c.consumer(k).log_text();
    let counts = applied_counts(&log);
    assert!(
        counts.len() >= at_least,
        "only {} applied changes found in the consumer's log (expected {at_least} or more)",
        counts.len()
    );
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
}

#[test]
fn nats_node_and_relay_killed_at_random_moments_lose_nothing() {
    let Some(mut nats) = NatsCluster::start(3) else {
        return;
    };
    let seed = std::env::var("PWSYNC_HA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| pwsync_proto::hlc::wall_ms() ^ u64::from(std::process::id()));
    eprintln!("ha seed {seed} (rerun with PWSYNC_HA_SEED={seed})");
    let mut rng = Rng(seed);
    let (mut c, k, _) = ha_cluster(&nats);

    const CHANGES: usize = 600;
    const USERS: usize = 100;
    let node = rng.below(3) as usize;
    let relay = rng.below(2) as usize;
    let kill_node_at = 50 + rng.below(250) as usize;
    let node_back_at = kill_node_at + 30 + rng.below(150) as usize;
    let kill_relay_at = 50 + rng.below(250) as usize;
    let relay_back_at = kill_relay_at + 30 + rng.below(150) as usize;
    eprintln!(
        "kill NATS n{} at {kill_node_at}, back at {node_back_at}; kill relay {} at {kill_relay_at}, back at {relay_back_at}",
        node + 1,
        relay + 1
    );
    let mut expected = BTreeMap::new();
    for i in 0..CHANGES {
        if i == kill_node_at {
            nats.nodes[node].daemon.kill9();
        }
        if i == node_back_at {
            nats.nodes[node].daemon.start_again();
        }
        if i == kill_relay_at {
            match relay {
                0 => c.relay().kill9(),
                _ => c.relay_replica(0).kill9(),
            }
        }
        if i == relay_back_at {
            match relay {
                0 => c.start_relay(),
                _ => c.start_relay_replica(0),
            }
        }
        let user = format!("user{:03}", i % USERS);
        let password = format!("ha-{seed}-{i}");
        submit(&c, i % AGENTS, &user, &password);
        expected.insert(user, password);
        if i % 20 == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for j in 0..AGENTS {
        wait_until(
            Duration::from_secs(120),
            &format!("host-{j}'s spool to drain"),
            || c.status(j).spool_records == 0,
        );
    }
    wait_all_verify(&c, k, &expected, Duration::from_secs(120));
    assert_applied_once(&mut c, k, USERS);
    let dead = c.tool(
        "pwsync-consumer",
        &[
            "--config",
            &c.consumers[k].config.display().to_string(),
            "deadletter",
            "ls",
        ],
    );
    // Through the running consumer's admin socket: the command must succeed, and list none.
    assert!(
        dead.status.success() && String::from_utf8_lossy(&dead.stdout).trim().is_empty(),
        "deadletter ls beside the running consumer ({}):\n{}{}",
        dead.status,
        String::from_utf8_lossy(&dead.stdout),
        String::from_utf8_lossy(&dead.stderr)
    );
    // The journal tools read the shared journal while the relays run.
    let groups = c.journal("groups");
    assert!(
        groups.starts_with("g1\tcommitted "),
        "journal groups:\n{groups}"
    );
    let stats = c.journal("stats");
    for j in 0..AGENTS {
        assert!(
            stats.contains(&format!(
                "host-{j}\tjournaled through seq {}",
                CHANGES / AGENTS
            )),
            "journal stats:\n{stats}"
        );
    }
    let logs = c.all_logs();
    assert!(
        !logs.contains(&format!("ha-{seed}-")),
        "a test password reached a log"
    );
}

#[test]
fn a_stopped_relay_is_left_for_the_other_within_the_failover_time() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let (mut c, k, metrics) = ha_cluster(&nats);
    // Everyone starts on the first relay.
    let mut expected = BTreeMap::new();
    for i in 0..10 {
        let user = format!("before{i}");
        let password = format!("stop-before-{i}");
        submit(&c, i % AGENTS, &user, &password);
        expected.insert(user, password);
    }
    wait_all_verify(&c, k, &expected, Duration::from_secs(30));
    let (code, health) = pwsync_tests::scrape::get(metrics, "/healthz");
    assert_eq!(code, 200, "{health}");
    assert!(health.contains("quorum"), "{health}");
    let check = c.tool(
        "pwsync-relay",
        &["--config", &c.relay_config.display().to_string(), "check"],
    );
    let said = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        check.status.success(),
        "check: {said}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        said.contains("stream PWSYNC: ") && said.contains("3 of 3 current"),
        "check: {said}"
    );

    // The group's password policy, published by its consumer to the first relay, reaches the
    // second through the cluster (agents at either relay get it).
    let kept = c.relay_dir.join("journal-2/policy-g1.signed");
    wait_until(
        Duration::from_secs(30),
        "the second relay to keep the group's policy",
        || kept.exists(),
    );

    c.relay().pause();
    let paused = Instant::now();
    let mut after = BTreeMap::new();
    for i in 0..20 {
        let user = format!("after{i}");
        let password = format!("stop-after-{i}");
        submit(&c, i % AGENTS, &user, &password);
        after.insert(user, password);
    }
    // Documented (README, "Several relays"): an agent leaves a relay that acks nothing within
    // ack_timeout_secs (2 s here); a consumer leaves one that misses two 5 s keep-alives.
    wait_all_verify(&c, k, &after, Duration::from_secs(40));
    eprintln!("arrived {:?} after the relay stopped", paused.elapsed());
    for j in 0..AGENTS {
        let log = c.agent(j).log_text();
        assert!(
            log.contains("trying the next relay"),
            "host-{j} did not move to the other relay:\n{log}"
        );
    }
    c.relay().resume();
    // The first relay, back, takes nothing twice into effect.
    let mut last = BTreeMap::new();
    for i in 0..10 {
        let user = format!("after{i}");
        let password = format!("stop-last-{i}");
        submit(&c, i % AGENTS, &user, &password);
        last.insert(user, password);
    }
    wait_all_verify(&c, k, &last, Duration::from_secs(40));
    assert_applied_once(&mut c, k, 40);
}

#[test]
fn without_quorum_agents_keep_accepting_and_everything_arrives_after() {
    let Some(mut nats) = NatsCluster::start(3) else {
        return;
    };
    let (mut c, k, metrics) = ha_cluster(&nats);
    submit(&c, 0, "first", "quorum-first");
    wait_all_verify(
        &c,
        k,
        &BTreeMap::from([("first".to_string(), "quorum-first".to_string())]),
        Duration::from_secs(30),
    );
    let logged_before = [
        c.relay().log_text().len(),
        c.relay_replica(0).log_text().len(),
    ];
    nats.nodes[1].daemon.kill9();
    nats.nodes[2].daemon.kill9();
    let lost = Instant::now();
    let mut expected = BTreeMap::new();
    for i in 0..30 {
        let user = format!("nq{i}");
        let password = format!("quorum-lost-{i}");
        submit(&c, i % AGENTS, &user, &password);
        expected.insert(user, password);
    }
    // The relays say so on /healthz, and nothing is acked meanwhile: the agents hold it all.
    wait_until(
        Duration::from_secs(30),
        "the relay's /healthz to report the lost quorum",
        || pwsync_tests::scrape::get(metrics, "/healthz").0 == 503,
    );
    wait_until(
        Duration::from_secs(30),
        "pwsync-relay check to fail without a quorum",
        || {
            !c.tool(
                "pwsync-relay",
                &["--config", &c.relay_config.display().to_string(), "check"],
            )
            .status
            .success()
        },
    );
    let held: u64 = (0..AGENTS).map(|j| c.status(j).spool_records).sum();
    assert!(
        held > 0,
        "the agents hold nothing while the cluster has no quorum"
    );
    let ht = c.consumers[k].dir.join("htpasswd");
    let arrived: BTreeSet<&String> = expected
        .iter()
        .filter(|(u, p)| pwsync_tests::htpasswd_verifies(&ht, u, p))
        .map(|(u, _)| u)
        .collect();
    assert!(
        arrived.is_empty(),
        "changes arrived while the cluster had no quorum: {arrived:?}"
    );
    // 20 s without a quorum: the relays keep trying (agents send again, deliveries read again)
    // all along.
    if let Some(rest) = Duration::from_secs(20).checked_sub(lost.elapsed()) {
        std::thread::sleep(rest);
    }
    nats.nodes[1].daemon.start_again();
    nats.nodes[2].daemon.start_again();
    wait_all_verify(&c, k, &expected, Duration::from_secs(120));
    for j in 0..AGENTS {
        wait_until(
            Duration::from_secs(60),
            &format!("host-{j}'s spool to drain"),
            || c.status(j).spool_records == 0,
        );
    }
    assert_applied_once(&mut c, k, 31);
    wait_until(
        Duration::from_secs(60),
        "the relay's /healthz to be 200 again",
        || pwsync_tests::scrape::get(metrics, "/healthz").0 == 200,
    );
    // A streak's end is logged at the first success after it, which may come a moment after
    // /healthz turns: wait (bounded) for every error's recovery line before judging the logs.
    let since = |text: String, from: usize| text.get(from..).unwrap_or("").to_string();
    let mut logs = || {
        [
            since(c.relay().log_text(), logged_before[0]),
            since(c.relay_replica(0).log_text(), logged_before[1]),
        ]
    };
    pwsync_tests::process::wait_for(Duration::from_secs(30), || {
        logs().iter().all(|log| unended_streaks(log).is_empty())
    });
    for (r, log) in logs().iter().enumerate() {
        assert_quiet_outage(&format!("relay {}", r + 1), log);
    }
    let _ = &mut nats;
}

/// A log line's level ("WARN", "ERROR", …).
fn level(line: &str) -> &str {
    line.split_whitespace().nth(1).unwrap_or("")
}

/// A log line's message: what follows the level, up to its first field, without the
/// "…: again N times in the last S s" of a streak's summary.
fn message(line: &str) -> String {
    let rest = line
        .split_once(&format!(" {} ", level(line)))
        .map_or(line, |(_, r)| r);
    let rest = rest.split(" error=").next().unwrap_or(rest);
    let rest = rest.split(": again ").next().unwrap_or(rest);
    rest.trim().to_string()
}

/// The errors of `log` that no later "<message>: works again, after N failures" line (with its
/// count) ended: a streak's lines (its first error, its summaries) all come before its end.
fn unended_streaks(log: &str) -> Vec<String> {
    let lines: Vec<&str> = log.lines().collect();
    let ends_after = |m: &str, at: usize| {
        lines[at..].iter().any(|l| {
            l.contains(&format!("{m}: works again, after"))
                && l.split_whitespace().any(|w| {
                    w.strip_prefix("failures=")
                        .is_some_and(|n| n.parse::<u64>().is_ok())
                })
        })
    };
    let unended: BTreeSet<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| level(l) == "ERROR")
        .map(|(at, l)| (at, message(l)))
        .filter(|(at, m)| !ends_after(m, *at))
        .map(|(_, m)| m)
        .collect();
    unended.into_iter().collect()
}

/// What a relay wrote from a lost quorum to well after it came back: a few warnings and
/// errors, each repeated error once per streak, and every streak's end said with its count of
/// failures (however many there were: a relay that was sent one batch in the outage fails once).
fn assert_quiet_outage(relay: &str, log: &str) {
    let loud: Vec<&str> = log
        .lines()
        .filter(|l| matches!(level(l), "WARN" | "ERROR"))
        .collect();
    let mut seen = BTreeMap::new();
    for l in &loud {
        *seen.entry(message(l)).or_insert(0usize) += 1;
    }
    eprintln!(
        "{relay}: {} warnings and errors during the outage:\n{}",
        loud.len(),
        loud.join("\n")
    );
    assert!(
        loud.len() <= 8,
        "{relay} wrote {} warnings and errors over a 20 s quorum loss (at most 8 expected):\n{}",
        loud.len(),
        loud.join("\n")
    );
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 2).collect();
    assert!(
        repeated.is_empty(),
        "{relay} repeated these lines rather than counting them: {repeated:?}\n{}",
        loud.join("\n")
    );
    // The journal failed during the outage (the agents kept sending), and each streak of its
    // errors was counted and ended by one line saying how many there were.
    assert!(
        loud.iter().any(|l| level(l) == "ERROR"),
        "{relay} logged no error while the journal had no quorum:\n{log}"
    );
    let unended = unended_streaks(log);
    assert!(
        unended.is_empty(),
        "{relay} did not say how often these failed (\"<error>: works again, after N failures\"): \
         {unended:?}\n{log}"
    );
}
