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
fn ten_thousand_submits_while_relay_down_drain_in_order_over_short_and_kept_connections() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_agent(a);
    let mut changes: Vec<(String, String)> = (0..10_000)
        .map(|i| (format!("user{}", i % 300), format!("pw-{i}")))
        .collect();
    // Half by one connection per change (as hooks submit), half over 8 connections kept open
    // (as a bulk source would).
    let kept_open = changes.split_off(5_000);
    let responses = c.submit_many(a, changes, 32);
    assert!(responses.iter().all(accepted), "not all accepted");
    let responses = c.submit_many_connected(a, kept_open, 8);
    assert_eq!(responses.len(), 5_000);
    assert!(
        responses.iter().all(accepted),
        "not all accepted over kept connections"
    );
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
            Response::Unavailable { reason } => {
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

/// Sends raw bytes on the agent's socket and returns what comes back (until EOF or 5 s).
fn raw_exchange(socket: &std::path::Path, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn error_reply(reply: &[u8]) -> String {
    assert!(reply.len() > 5, "no reply: {reply:?}");
    match pwsync_agent::api::decode::<Response>("response", &reply[4..]) {
        Ok(Response::Error { message }) => message,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn garbage_truncated_and_oversized_requests_get_errors_and_the_agent_keeps_serving() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_agent(a);
    let socket = c.agents[a].socket.clone();

    let mut garbage = 40u32.to_be_bytes().to_vec();
    garbage.extend([0xde; 40]);
    assert!(error_reply(&raw_exchange(&socket, &garbage)).contains("bad request"));

    let mut wrong_version = 3u32.to_be_bytes().to_vec();
    wrong_version.extend([9, 0, 0]);
    assert!(error_reply(&raw_exchange(&socket, &wrong_version)).contains("version 9"));

    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend([1; 10]);
    assert!(!error_reply(&raw_exchange(&socket, &truncated)).is_empty());

    let oversized = (1u32 << 30).to_be_bytes();
    assert!(error_reply(&raw_exchange(&socket, &oversized)).contains("exceeds the limit"));

    // A valid request with an invalid change (too many bytes in a password) is rejected by rule.
    let r = c.submit(a, "alice", Op::Replace, Some(&"x".repeat(5000)));
    assert!(matches!(r, Response::Rejected { .. }), "{r:?}");

    assert!(c.agent(a).is_running());
    assert!(accepted(&c.submit(
        a,
        "alice",
        Op::Replace,
        Some("after-garbage")
    )));
}

#[test]
fn a_caller_outside_the_allowed_group_is_refused() {
    if !pwsync_tests::process::root_or_skip("a test that runs a client as another uid") {
        return;
    }
    let mut c = Cluster::new(&["g1"], "");
    // World-connectable socket, so only the agent's own credential check stands in the way.
    let a = c.add_agent(
        "host-a",
        AgentOptions {
            socket_mode: 0o666,
            ..AgentOptions::default()
        },
    );
    c.start_agent(a);
    // The client runs as nobody: it must be able to reach the config and the socket.
    for p in [c.path().to_path_buf(), c.agents[a].dir.clone()] {
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    std::fs::set_permissions(
        &c.agents[a].config,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let out = std::process::Command::new(pwsync_tests::bin("pwsync-agent"))
        .args([
            "--config",
            &c.agents[a].config.display().to_string(),
            "submit",
            "--user",
            "alice",
        ])
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"pw-from-nobody\n")?;
            child.wait_with_output()
        })
        .expect("run as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("permission denied: uid 65534"), "{stderr}");
    assert_eq!(c.status(a).spool_records, 0);
    assert!(c.agent(a).log_text().contains("refused a socket client"));
}

use std::os::unix::process::CommandExt;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn spool_tools_after_a_crash_and_a_corrupt_record() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    c.start_agent(a);
    for i in 1..=20 {
        assert!(accepted(&c.submit(
            a,
            &format!("user{i}"),
            Op::Replace,
            Some(&format!("secret-pw-{i}"))
        )));
    }
    let cfg = c.agents[a].config.display().to_string();
    let spool = c.agents[a].spool.display().to_string();

    // While the agent runs, every spool tool asks it (its admin socket) and nothing stops.
    let live = c.tool("pwsync-agent", &["spool", "--spool", &spool, "ls"]);
    assert!(live.status.success(), "{}", text(&live));
    assert_eq!(String::from_utf8_lossy(&live.stdout).lines().count(), 20);
    let stats = c.tool("pwsync-agent", &["--config", &cfg, "spool", "stats"]);
    assert!(
        text(&stats).contains("records:      20"),
        "{}",
        text(&stats)
    );
    let verify = c.tool("pwsync-agent", &["--config", &cfg, "spool", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("20 good, 0 bad; signatures checked"));
    let live_export = c.path().join("live.pwx").display().to_string();
    let ex = c.tool(
        "pwsync-agent",
        &["--config", &cfg, "spool", "export", &live_export],
    );
    assert!(text(&ex).contains("exported 20 records"), "{}", text(&ex));
    assert!(c.agent(a).is_running(), "the agent ran throughout");
    assert!(!format!("{}{}", text(&live), text(&stats)).contains("secret-pw"));

    c.agent(a).kill9();
    let ls = c.tool("pwsync-agent", &["--config", &cfg, "spool", "ls"]);
    assert!(ls.status.success(), "{}", text(&ls));
    let lines: Vec<String> = String::from_utf8_lossy(&ls.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 20);
    for (i, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("{}\t", i + 1)), "{l}");
    }
    let verify = c.tool("pwsync-agent", &["--config", &cfg, "spool", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
    assert!(text(&verify).contains("20 good, 0 bad; signatures checked"));
    let show = c.tool("pwsync-agent", &["spool", "show", "--spool", &spool, "7"]);
    assert!(text(&show).contains("envelope seq: 7"), "{}", text(&show));

    // Damage record 5.
    {
        let s = pwsync_agent::spool::Spool::open_existing(&c.agents[a].spool).expect("open spool");
        s.overwrite_raw_for_test(pwsync_proto::Seq(5), b"\x01garbage that is no record")
            .expect("damage");
    }
    let verify = c.tool("pwsync-agent", &["--config", &cfg, "spool", "verify"]);
    assert!(!verify.status.success());
    let out = text(&verify);
    assert!(out.lines().any(|l| l.starts_with("5\tBAD")), "{out}");
    assert!(out.contains("19 good, 1 bad"), "{out}");
    let ls = c.tool("pwsync-agent", &["spool", "ls", "--spool", &spool]);
    let ls_out = String::from_utf8_lossy(&ls.stdout).to_string();
    assert_eq!(ls_out.lines().count(), 20);
    assert!(
        ls_out.lines().any(|l| l.starts_with("5\tCORRUPT")),
        "{ls_out}"
    );
    let export = c.path().join("backlog.pwx");
    let ex = c.tool(
        "pwsync-agent",
        &[
            "spool",
            "export",
            "--spool",
            &spool,
            &export.display().to_string(),
        ],
    );
    assert!(text(&ex).contains("exported 19 records"), "{}", text(&ex));
    let all_tool_output = format!("{ls_out}{out}{}", text(&show));
    assert!(
        !all_tool_output.contains("secret-pw"),
        "a password in tool output"
    );

    // The rest is still forwardable: 19 changes plus a lost-change placeholder for seq 5.
    c.start_relay();
    let group = c.group_client("g1");
    c.start_agent(a);
    wait_until(Duration::from_secs(30), "20 deliveries", || {
        group.count() >= 20
    });
    wait_until(Duration::from_secs(30), "the spool to drain", || {
        c.status(a).spool_records == 0
    });
    let got = group.received();
    assert_eq!(got.len(), 20);
    assert_eq!(got[4].op, Op::Lost);
    assert_eq!(got[4].seq, 5);
    assert!(got.iter().filter(|r| r.op == Op::Replace).count() == 19);
    assert_eq!(c.status(a).quarantined, 1);
}

#[test]
fn lenient_mode_accepts_what_it_cannot_spool_and_says_so_loudly() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent(
        "host-a",
        AgentOptions {
            mode: "lenient",
            max_bytes: 4 * 1024,
            ..AgentOptions::default()
        },
    );
    c.start_agent(a);
    let mut not_durable = 0;
    for i in 0..40 {
        match c.submit(a, &format!("u{i}"), Op::Replace, Some("pw-lenient")) {
            Response::Accepted { durable: true, .. } => {}
            Response::Accepted { durable: false, .. } => not_durable += 1,
            other => panic!("lenient mode answered {other:?}"),
        }
    }
    assert!(not_durable > 0, "the spool never filled");
    let log = c.agent(a).log_text();
    assert!(
        log.contains("LENIENT MODE: change accepted but NOT spooled"),
        "{log}"
    );
    assert!(!log.contains("pw-lenient"));
    // The CLI exits 4 for such an answer: not 0, since nothing was made durable.
    assert_eq!(c.submit_cli(a, "late", "pw-lenient").status.code(), Some(4));
}
