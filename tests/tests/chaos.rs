//! The proof of no loss (G1) with the real binaries: three agents submit 3,000 changes for 300
//! users while the test kills -9 the relay, the consumer and each agent at random moments and
//! restarts them. At the end every user's password in the consumer's htpasswd file is the last
//! one accepted for that user, nothing is in dead letters, every spool and the journal have
//! drained, and no test password appears in any log.
//!
//! The seed is printed; rerun a failing one with `PWSYNC_CHAOS_SEED=<seed> cargo test -p
//! pwsync-tests --test chaos`.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::{wait_until, Cluster};
use std::collections::BTreeMap;
use std::time::Duration;

/// splitmix64: small, seedable, good enough to pick moments and victims.
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

const CHANGES: usize = 3000;
const USERS: usize = 300;
const AGENTS: usize = 3;

#[derive(Debug, Clone, Copy)]
enum Victim {
    Relay,
    Consumer,
    Agent(usize),
}

#[test]
fn kill9_of_every_component_at_random_moments_loses_nothing() {
    let seed = std::env::var("PWSYNC_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| pwsync_proto::hlc::wall_ms() ^ u64::from(std::process::id()));
    println!("chaos seed {seed} (rerun with PWSYNC_CHAOS_SEED={seed})");
    eprintln!("chaos seed {seed} (rerun with PWSYNC_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);

    let mut c = Cluster::new(&["g1"], "");
    for i in 0..AGENTS {
        c.add_agent(&format!("host-{i}"), AgentOptions::default());
    }
    let k = c.add_consumer(
        "k",
        "g1",
        "[targets.web]\ntype = \"htpasswd\"\nsystem = \"web\"\npath = \"htpasswd\"\ncost = 4\n",
    );
    c.start_relay();
    c.start_consumer(k);
    for i in 0..AGENTS {
        c.start_agent(i);
    }

    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let mut kills = Vec::new();
    // Each victim that is down, with the number of submits until it comes back.
    let mut down: Vec<(Victim, u64)> = Vec::new();
    for i in 0..CHANGES {
        if rng.below(100) == 0 {
            let victim = match rng.below(5) {
                0 => Victim::Relay,
                1 => Victim::Consumer,
                n => Victim::Agent((n - 2) as usize),
            };
            let already = down
                .iter()
                .any(|(v, _)| format!("{v:?}") == format!("{victim:?}"));
            let agents_down = down
                .iter()
                .filter(|(v, _)| matches!(v, Victim::Agent(_)))
                .count();
            // Keep at least one agent up, so every change has somewhere to go.
            let last_agent = matches!(victim, Victim::Agent(_)) && agents_down == AGENTS - 1;
            if !already && !last_agent {
                match victim {
                    Victim::Relay => c.relay().kill9(),
                    Victim::Consumer => c.consumer(k).kill9(),
                    Victim::Agent(j) => c.agent(j).kill9(),
                }
                kills.push((i, victim));
                down.push((victim, rng.below(60)));
            }
        }
        // Bring back what has been down long enough.
        let mut still_down = Vec::new();
        for (victim, left) in std::mem::take(&mut down) {
            if left == 0 {
                match victim {
                    Victim::Relay => c.start_relay(),
                    Victim::Consumer => c.start_consumer(k),
                    Victim::Agent(j) => c.start_agent(j),
                }
            } else {
                still_down.push((victim, left - 1));
            }
        }
        down = still_down;

        let user = format!("user{:03}", i % USERS);
        let value = format!("chaos-{seed}-{i}");
        let up: Vec<usize> = (0..AGENTS)
            .filter(|j| {
                !down
                    .iter()
                    .any(|(v, _)| matches!(v, Victim::Agent(a) if a == j))
            })
            .collect();
        let first = rng.below(up.len() as u64) as usize;
        let mut accepted = false;
        for attempt in 0..up.len() {
            let j = up[(first + attempt) % up.len()];
            match c.try_submit(j, &user, Op::Replace, Some(&value)) {
                Ok(Response::Accepted { durable: true, .. }) => {
                    accepted = true;
                    break;
                }
                other => eprintln!("submit {i} to host-{j}: {other:?}; trying another agent"),
            }
        }
        assert!(accepted, "change {i} accepted by no agent");
        expected.insert(user, value);
    }
    for (victim, _) in std::mem::take(&mut down) {
        match victim {
            Victim::Relay => c.start_relay(),
            Victim::Consumer => c.start_consumer(k),
            Victim::Agent(j) => c.start_agent(j),
        }
    }
    println!("kills (at change, victim): {kills:?}");

    for j in 0..AGENTS {
        wait_until(
            Duration::from_secs(180),
            &format!("host-{j}'s spool to drain"),
            || c.status(j).spool_records == 0,
        );
    }
    let ht = c.consumers[k].dir.join("htpasswd");
    let verifies = |user: &str, pw: &str| pwsync_tests::htpasswd_verifies(&ht, user, pw);
    let mut pending: Vec<(String, String)> = expected.clone().into_iter().collect();
    wait_until(
        Duration::from_secs(180),
        "every user's last password in the htpasswd file",
        || {
            pending.retain(|(u, p)| !verifies(u, p));
            pending.is_empty()
        },
    );
    assert!(c.consumer_counter(k, "stale") <= CHANGES as u64);

    // Let the consumer's last commit reach the relay, then stop both and look inside.
    std::thread::sleep(Duration::from_secs(2));
    c.consumer(k).stop();
    c.relay().stop();
    let cfg = c.consumers[k].config.display().to_string();
    let dead = c.tool("pwsync-consumer", &["--config", &cfg, "deadletter", "ls"]);
    assert!(
        dead.status.success() && String::from_utf8_lossy(&dead.stdout).trim().is_empty(),
        "deadletter ls ({}):\n{}{}",
        dead.status,
        String::from_utf8_lossy(&dead.stdout),
        String::from_utf8_lossy(&dead.stderr)
    );
    let stats = c.journal("stats");
    assert!(
        stats.contains("records:      0"),
        "journal not drained:\n{stats}"
    );
    let logs = c.all_logs();
    assert!(
        !logs.contains(&format!("chaos-{seed}-")),
        "a test password reached a log"
    );
    println!(
        "chaos seed {seed}: {} kills, {} users verified",
        kills.len(),
        expected.len()
    );
}
