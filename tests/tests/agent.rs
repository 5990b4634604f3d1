//! The edge agent against the real relay (issue: edge agent). Each test builds its own
//! installation in a temp dir and runs the real binaries.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::{wait_until, Cluster};
use std::time::Duration;

fn accepted(r: &Response) -> bool {
    matches!(r, Response::Accepted { durable: true, .. })
}

#[test]
fn submit_then_kill9_before_forwarding_is_forwarded_once() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    // The relay is down: the change can only be in the spool.
    c.start_agent(a);
    let out = c.submit_cli(a, "alice", "Tr0ub4dor&3-kill9");
    assert!(
        out.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("durable as seq 1"));
    c.agent(a).kill9();

    c.start_relay();
    let group = c.group_client("g1");
    c.start_agent(a);
    wait_until(
        Duration::from_secs(30),
        "the change to reach the group",
        || group.count() >= 1,
    );
    wait_until(Duration::from_secs(30), "the spool to drain", || {
        c.status(a).spool_records == 0
    });
    std::thread::sleep(Duration::from_millis(500));
    let got = group.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].user.as_str(), got[0].op, got[0].seq),
        ("alice", Op::Replace, 1)
    );
    assert_eq!(got[0].value.as_deref(), Some("Tr0ub4dor&3-kill9"));
    assert!(
        !c.all_logs().contains("Tr0ub4dor"),
        "a password reached a log"
    );
}

#[test]
fn ten_thousand_submits_while_relay_down_drain_in_order() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_agent(a);
    let changes: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("user{}", i % 300), format!("pw-{i}")))
        .collect();
    let responses = c.submit_many(a, changes, 32);
    assert!(responses.iter().all(accepted), "not all accepted");
    let st = c.status(a);
    assert_eq!(st.spool_records, 10_000);
    assert!(!st.connected);

    c.start_relay();
    let group = c.group_client("g1");
    wait_until(
        Duration::from_secs(120),
        "10,000 changes at the group",
        || group.count() >= 10_000,
    );
    wait_until(Duration::from_secs(30), "the spool to drain", || {
        c.status(a).spool_records == 0
    });
    let got = group.received();
    assert_eq!(got.len(), 10_000);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "out of order at {i}");
        assert_eq!(r.offset, i as u64 + 1);
    }
    // Each seq carries the change submitted with it (submitters ran concurrently, so match by value).
    let mut values: Vec<u64> = got
        .iter()
        .map(|r| {
            r.value
                .as_deref()
                .and_then(|v| v.strip_prefix("pw-"))
                .and_then(|v| v.parse().ok())
                .expect("value")
        })
        .collect();
    values.sort_unstable();
    assert_eq!(values, (0..10_000).collect::<Vec<u64>>());
    assert!(c.status(a).connected);
}

#[test]
fn full_spool_rejects_in_strict_mode_and_keeps_earlier_changes() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent(
        "host-a",
        AgentOptions {
            max_bytes: 16 * 1024,
            ..AgentOptions::default()
        },
    );
    c.start_agent(a);
    let mut accepted_n = 0u64;
    let mut rejection = None;
    for i in 0..200 {
        match c.submit(a, &format!("u{i}"), Op::Replace, Some(&format!("pw{i}"))) {
            Response::Accepted { durable: true, .. } => accepted_n += 1,
            Response::Rejected { reason } => {
                rejection = Some(reason);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let reason = rejection.expect("the spool filled up");
    assert!(reason.contains("spool is full"), "{reason}");
    assert!(accepted_n > 5, "only {accepted_n} fit");
    // A probe says so too, before the hook commits anything locally.
    let probe = c.rt.block_on(pwsync_agent::client::request(
        &c.agents[a].socket,
        &pwsync_agent::api::Request::Probe { user: "bob".into() },
        Duration::from_secs(5),
    ));
    assert!(matches!(probe, Ok(Response::NotReady { .. })), "{probe:?}");
    assert_eq!(c.status(a).spool_records, accepted_n);

    c.start_relay();
    let group = c.group_client("g1");
    wait_until(Duration::from_secs(30), "the backlog at the group", || {
        group.count() as u64 >= accepted_n
    });
    let got = group.received();
    assert_eq!(got.len() as u64, accepted_n);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, r)| r.user == format!("u{i}")));
    // Room again once the relay took the backlog.
    wait_until(Duration::from_secs(30), "the spool to drain", || {
        c.status(a).spool_records == 0
    });
    assert!(accepted(&c.submit(a, "late", Op::Replace, Some("pw"))));
}

#[test]
fn users_outside_scope_are_ignored_not_spooled() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent(
        "host-a",
        AgentOptions {
            exclude: vec!["root".into(), "svc-*".into()],
            ..AgentOptions::default()
        },
    );
    c.start_agent(a);
    for user in ["root", "svc-backup"] {
        assert!(matches!(
            c.submit(a, user, Op::Replace, Some("x")),
            Response::Ignored { .. }
        ));
    }
    let out = c.submit_cli(a, "root", "x");
    assert_eq!(out.status.code(), Some(3), "ignored is not success");
    assert_eq!(c.status(a).spool_records, 0);
    assert_eq!(c.status(a).ignored, 3);
}
