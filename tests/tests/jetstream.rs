//! The JetStream journal against a real nats-server, below the relay: several relays' journals
//! appending the same agent's envelopes at once keep its seqs gap-free, in order and journaled
//! once; cursors only move forward; pruning keeps each agent's place.

use pwsync_proto::hlc::Hlc;
use pwsync_proto::{AgentId, GroupName, Offset, Seq};
use pwsync_relay::config::JournalConfig;
use pwsync_relay::journal::{DeclaredGroups, Incoming, Intake, Journal, JournalRecord};
use pwsync_tests::nats::NatsCluster;
use std::sync::Arc;
use std::time::Duration;

fn config(nats: &NatsCluster, dir: &std::path::Path, replicas: usize) -> JournalConfig {
    toml::from_str(&format!(
        "dir = {:?}\n{}",
        dir.display().to_string(),
        nats.journal_section(replicas)
            .replace("[journal.jetstream]", "[jetstream]")
    ))
    .expect("journal config")
}

fn incoming(agent: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Incoming> {
    seqs.map(|s| Incoming {
        agent: AgentId::new(agent).expect("agent id"),
        seq: Seq(s),
        hlc: Hlc::default(),
        envelope: format!("{agent}/{s}").into_bytes(),
    })
    .collect()
}

/// Every record's (agent, seq) in offset order.
async fn journaled(j: &Journal) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut from = Offset(0);
    loop {
        let chunk = j.read_from(from, 500).await.expect("read");
        let Some((last, _)) = chunk.last() else {
            return out;
        };
        from = Offset(last.0 + 1);
        for (_, rec) in chunk {
            let rec = rec.expect("record decodes");
            out.push((rec.agent.to_string(), rec.seq.0));
        }
    }
}

#[test]
fn relays_appending_at_once_keep_each_agent_gap_free_and_once() {
    let Some(nats) = NatsCluster::start(3) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let g1 = GroupName::new("g1").expect("group");
    rt.block_on(async {
        let cfg = config(&nats, dir.path(), 3);
        let mut relays = Vec::new();
        for _ in 0..3 {
            relays.push(Arc::new(
                Journal::open(&cfg, &DeclaredGroups::new(vec![g1.clone()]))
                    .await
                    .expect("open"),
            ));
        }
        // Three relays each take overlapping windows of two agents' envelopes, as agents
        // failing over between them would send: each sends from what it saw acked last.
        let mut tasks = Vec::new();
        for (r, j) in relays.iter().enumerate() {
            let j = j.clone();
            tasks.push(tokio::spawn(async move {
                let mut acked = [0u64; 2];
                for round in 0..40u64 {
                    let mut batch = Vec::new();
                    for (a, name) in ["alpha", "beta.example.org"].iter().enumerate() {
                        let from = acked[a].saturating_sub((round + r as u64) % 3) + 1;
                        let to = (from + 2 + (round % 5)).min(150);
                        if from <= to {
                            batch.extend(incoming(name, from..=to));
                        }
                    }
                    if batch.is_empty() {
                        break;
                    }
                    let applied = j
                        .apply(batch, Vec::new(), Vec::new(), 0)
                        .await
                        .expect("apply");
                    for (a, name) in ["alpha", "beta.example.org"].iter().enumerate() {
                        if let Some(s) = applied.ack.get(&AgentId::new(*name).expect("id")) {
                            assert!(s.0 >= acked[a], "an ack went backwards");
                            acked[a] = s.0;
                        }
                    }
                }
                acked
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        // Whatever is left, from one relay.
        let j = &relays[0];
        for name in ["alpha", "beta.example.org"] {
            j.apply(incoming(name, 1..=150), Vec::new(), Vec::new(), 0)
                .await
                .expect("apply");
        }
        let records = journaled(j).await;
        for name in ["alpha", "beta.example.org"] {
            let seqs: Vec<u64> = records
                .iter()
                .filter(|(a, _)| a == name)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(
                seqs,
                (1..=150).collect::<Vec<u64>>(),
                "{name}'s seqs in the journal, in offset order"
            );
        }
        let agents = j.agents().await.expect("agents");
        assert_eq!(agents.get("alpha"), Some(&150));

        // An envelope again: a duplicate; one past a gap: out of order; the next: appended.
        let a = j
            .apply(incoming("alpha", 150..=150), Vec::new(), Vec::new(), 0)
            .await
            .expect("apply");
        assert_eq!(a.intake, vec![Intake::Duplicate]);
        let a = j
            .apply(incoming("alpha", 153..=153), Vec::new(), Vec::new(), 0)
            .await
            .expect("apply");
        assert_eq!(a.intake, vec![Intake::OutOfOrder { expected: Seq(151) }]);

        // Cursors: only forward, never past the end, whichever relay is told.
        let end = j.next_offset().0 - 1;
        relays[1]
            .apply(Vec::new(), vec![(g1.clone(), Offset(end))], Vec::new(), 0)
            .await
            .expect("commit");
        let back = relays[2]
            .apply(Vec::new(), vec![(g1.clone(), Offset(5))], Vec::new(), 0)
            .await
            .expect("commit");
        assert_eq!(back.advanced.get(&g1), Some(&Offset(end)));
        assert_eq!(relays[0].cursor(&g1).await.expect("cursor"), Offset(end));

        // Every record committed: a relay prunes them all (within a few seconds), and each
        // agent's place survives in its register.
        let mut pruned = false;
        for _ in 0..100 {
            if j.stats().await.expect("stats").records == 0 {
                pruned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(pruned, "the journal was not pruned: {:?}", j.stats().await);
        let a = relays[1]
            .apply(incoming("alpha", 150..=151), Vec::new(), Vec::new(), 0)
            .await
            .expect("apply");
        assert_eq!(a.intake[0], Intake::Duplicate);
        assert!(matches!(a.intake[1], Intake::Appended(o) if o.0 == end + 1));
        assert_eq!(a.ack[&AgentId::new("alpha").expect("id")], Seq(151));
    });
}

/// A relay that stopped between publishing its chain and raising its agents' registers leaves
/// records no register covers. Pruning must raise the register of an agent whose last record it
/// purges: else, once they are gone, the agent's resend of those seqs (never acked) would be
/// journaled a second time.
#[test]
fn pruning_keeps_the_place_of_records_no_register_covers() {
    let Some(nats) = NatsCluster::start(1) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let g1 = GroupName::new("g1").expect("group");
    rt.block_on(async {
        let cfg = config(&nats, dir.path(), 1);
        let j = Journal::open(&cfg, &DeclaredGroups::new(vec![g1.clone()]))
            .await
            .expect("open");
        // What the stopped relay's chain left: records of agent "ghost", seqs 1 to 3, published
        // as the journal publishes them, and no register raised.
        let client = async_nats::connect(nats.urls()[0].as_str())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        let subject = format!(
            "PWSYNC.r.{}",
            "ghost"
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        for seq in 1..=3u64 {
            let record = JournalRecord {
                received_ms: 0,
                agent: AgentId::new("ghost").expect("agent id"),
                seq: Seq(seq),
                envelope: format!("ghost/{seq}").into_bytes(),
            };
            js.publish(subject.clone(), record.encode().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
        let end = j.stats().await.expect("stats").next_offset - 1;
        assert_eq!(end, 3);
        j.apply(Vec::new(), vec![(g1.clone(), Offset(end))], Vec::new(), 0)
            .await
            .expect("commit");
        let mut pruned = false;
        for _ in 0..100 {
            if j.stats().await.expect("stats").records == 0 {
                pruned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(pruned, "the journal was not pruned: {:?}", j.stats().await);
        // The agent, never acked, sends them again: duplicates; the next one is appended.
        let a = j
            .apply(incoming("ghost", 1..=4), Vec::new(), Vec::new(), 0)
            .await
            .expect("apply");
        assert_eq!(
            a.intake[..3],
            [Intake::Duplicate, Intake::Duplicate, Intake::Duplicate],
            "records pruned before their register was raised were journaled again"
        );
        assert!(matches!(a.intake[3], Intake::Appended(o) if o.0 == 4));
        assert_eq!(a.ack[&AgentId::new("ghost").expect("id")], Seq(4));
    });
}

/// deploy/ha/nats-server.conf, run as a three-node cluster (TLS for clients and routes, the
/// relays' login with its permissions): the relay's journal works through it with deploy/ha's
/// `[journal.jetstream]` settings, and refuses plainly without the CA or with a wrong password.
#[test]
fn the_documented_nats_cluster_takes_the_journal_over_tls_with_a_login() {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/ha/nats-server.conf");
    let template = std::fs::read_to_string(&example).expect("deploy/ha/nats-server.conf");
    let password = "nats-test-relay-secret";
    let Some(nats) = NatsCluster::start_from(&template, 3, password) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let pw = dir.path().join("nats.pw");
    std::fs::write(&pw, format!("{password}\n")).expect("password file");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let wrong = dir.path().join("wrong.pw");
    std::fs::write(&wrong, "not-it\n").expect("password file");
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let ca = nats.dir.path().join("tls/ca.pem");
    let servers = nats
        .nodes
        .iter()
        .map(|n| format!("\"tls://127.0.0.1:{}\"", n.client_port))
        .collect::<Vec<_>>()
        .join(", ");
    let section = |extra: &str| -> JournalConfig {
        toml::from_str(&format!(
            "dir = {:?}\n[jetstream]\nservers = [{servers}]\nreplicas = 3\ntimeout_secs = 2\n{extra}",
            dir.path().display().to_string()
        ))
        .expect("journal config")
    };
    let good = section(&format!(
        "ca_file = {:?}\nuser = \"pwsync-relay\"\npassword_file = {:?}",
        ca.display().to_string(),
        pw.display().to_string()
    ));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let j = Journal::open(&good, &DeclaredGroups::default())
            .await
            .expect("open over TLS");
        let a = j
            .apply(incoming("alpha", 1..=3), Vec::new(), Vec::new(), 0)
            .await
            .expect("apply");
        assert_eq!(a.ack[&AgentId::new("alpha").expect("id")], Seq(3));
        let report = pwsync_relay::journal::JetStreamJournal::probe(
            good.jetstream.as_ref().expect("jetstream"),
        )
        .await
        .expect("probe");
        assert!(report.contains("stream PWSYNC: 3 records"), "{report}");

        let bad_password = section(&format!(
            "ca_file = {:?}\nuser = \"pwsync-relay\"\npassword_file = {:?}",
            ca.display().to_string(),
            wrong.display().to_string()
        ));
        let e = pwsync_relay::journal::JetStreamJournal::probe(
            bad_password.jetstream.as_ref().expect("jetstream"),
        )
        .await
        .expect_err("a wrong password");
        assert!(
            e.to_string().to_lowercase().contains("authoriz"),
            "wrong password: {e}"
        );
        assert!(
            !e.to_string().contains("not-it"),
            "the password in an error: {e}"
        );
        let no_ca = section(&format!(
            "user = \"pwsync-relay\"\npassword_file = {:?}",
            pw.display().to_string()
        ));
        let e = pwsync_relay::journal::JetStreamJournal::probe(
            no_ca.jetstream.as_ref().expect("jetstream"),
        )
        .await
        .expect_err("no CA");
        eprintln!("without the CA: {e}");
    });
}
