//! What an operator sees (issue: metrics and health): `/metrics` and `/healthz` of each daemon.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::scrape::{get, sample};
use pwsync_tests::{free_port, wait_until, Cluster};
use std::io::Write;
use std::time::Duration;

fn append(path: &std::path::Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .expect("config");
    f.write_all(text.as_bytes()).expect("append");
}

#[test]
fn every_daemon_serves_metrics_and_health_and_health_fails_when_the_relay_is_gone() {
    let (relay_m, agent_m, consumer_m) = (free_port(), free_port(), free_port());
    let mut c = Cluster::new(&["g1"], "");
    append(
        &c.relay_config,
        &format!("\n[metrics]\nlisten = \"127.0.0.1:{relay_m}\"\n"),
    );
    let a = c.add_agent("host-a", AgentOptions::default());
    append(
        &c.agents[a].config,
        &format!("\n[metrics]\nlisten = \"127.0.0.1:{agent_m}\"\n"),
    );
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("[metrics]\nlisten = \"127.0.0.1:{consumer_m}\"\n\n[targets.web]\ntype = \"htpasswd\"\nsystem = \"web\"\npath = \"htpasswd\"\ncost = 4\n"),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    for i in 0..3 {
        assert!(matches!(
            c.submit(
                a,
                &format!("u{i}"),
                Op::Replace,
                Some(&format!("Obs-Secret-{i}"))
            ),
            Response::Accepted { durable: true, .. }
        ));
    }
    // One submit the agent refuses (a user name over the limit), counted by reason.
    let long_user = "x".repeat(300);
    assert!(matches!(
        c.submit(a, &long_user, Op::Replace, Some("Obs-Secret-X")),
        Response::Rejected { .. }
    ));
    wait_until(Duration::from_secs(20), "three changes applied", || {
        c.consumer_status(k)["targets"]["web"]["applied"].as_u64() == Some(3)
    });

    // The numbers refresh every 1-2 s.
    wait_until(Duration::from_secs(10), "the relay's metrics", || {
        let (_, m) = get(relay_m, "/metrics");
        sample(&m, "pwsync_relay_journaled_total") == Some(3.0)
            && sample(&m, "pwsync_relay_connected_agents") == Some(1.0)
            && sample(&m, "pwsync_relay_group_lag_records{group=\"g1\"}") == Some(0.0)
    });
    wait_until(Duration::from_secs(10), "the agent's metrics", || {
        let (_, m) = get(agent_m, "/metrics");
        sample(&m, "pwsync_agent_submits_total{result=\"accepted\"}") == Some(3.0)
            && sample(&m, "pwsync_agent_spool_records") == Some(0.0)
            && sample(&m, "pwsync_agent_publish_to_ack_seconds_count") == Some(3.0)
            && sample(&m, "pwsync_agent_rejected_total{reason=\"invalid\"}") == Some(1.0)
    });
    wait_until(Duration::from_secs(10), "the consumer's metrics", || {
        let (_, m) = get(consumer_m, "/metrics");
        sample(&m, "pwsync_consumer_applied_total{target=\"web\"}") == Some(3.0)
            && sample(&m, "pwsync_consumer_apply_seconds_count{target=\"web\"}") == Some(3.0)
    });
    // Every metric the shipped dashboard and alerts use is one the daemons export.
    let pages: String = [relay_m, agent_m, consumer_m]
        .iter()
        .map(|p| get(*p, "/metrics").1)
        .collect();
    let exported = |name: &str| {
        pages.lines().any(|l| {
            l.strip_prefix(name).is_some_and(|rest| {
                rest.starts_with(['{', ' '])
                    || rest.starts_with("_count")
                    || rest.starts_with("_sum")
            })
        })
    };
    let grafana = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana");
    let mut used = 0;
    for file in ["pwsync-dashboard.json", "alerts.yml"] {
        let text = std::fs::read_to_string(grafana.join(file)).expect("grafana file");
        for (i, _) in text.match_indices("pwsync_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            used += 1;
            assert!(
                exported(&name),
                "{file} uses {name}, which no daemon exports"
            );
        }
    }
    assert!(used > 20, "the dashboard and alerts use {used} metrics");
    for port in [relay_m, agent_m, consumer_m] {
        let (code, body) = get(port, "/healthz");
        assert_eq!(code, 200, "{body}");
        let (_, metrics) = get(port, "/metrics");
        assert!(!metrics.contains("Obs-Secret") && !body.contains("Obs-Secret"));
        assert!(!metrics.contains("u0"), "a user name in the metrics");
        assert_eq!(get(port, "/nothing").0, 404);
    }

    // Without the relay, the agent and the consumer say so (and the agent keeps accepting).
    c.relay().stop();
    wait_until(
        Duration::from_secs(20),
        "the agent's health to fail",
        || {
            let (code, body) = get(agent_m, "/healthz");
            code == 503 && body.contains("FAIL relay")
        },
    );
    wait_until(
        Duration::from_secs(20),
        "the consumer's health to fail",
        || {
            let (code, body) = get(consumer_m, "/healthz");
            code == 503 && body.contains("FAIL relay")
        },
    );
    assert_eq!(
        get(relay_m, "/healthz").0,
        0,
        "the stopped relay still answers"
    );
    assert!(!c.all_logs().contains("Obs-Secret"));
}
