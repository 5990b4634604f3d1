//! The JetStream journal against a real nats-server, below the relay: several relays' journals
//! appending the same agent's envelopes at once keep its seqs gap-free, in order and journaled
//! once; cursors only move forward; pruning keeps each agent's place.

use pwsync_proto::hlc::Hlc;
use pwsync_proto::{AgentId, GroupName, Offset, Seq};
use pwsync_relay::config::JournalConfig;
use pwsync_relay::journal::{Incoming, Intake, Journal};
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
                Journal::open(&cfg, &[g1.clone()]).await.expect("open"),
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
