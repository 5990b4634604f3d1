//! The account audit (issue 35), end to end: a real agent, relay and consumer writing to
//! htpasswd and slapd; then passwords set directly on each system (`htpasswd -b`, `ldappasswd`
//! as the directory's administrator). `pwsync-consumer audit` through the running consumer, its
//! timer (the gauges on `/metrics`, `audit.json`) and the same command with the consumer
//! stopped must name exactly those accounts as changed outside pwsync, with a time within
//! seconds where the system keeps one; an account pwsync never wrote as such, and one whose
//! last change is a dead letter there as that. No test password
//! anywhere: output, logs, metrics, state.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::scrape::{get, sample};
use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW};
use pwsync_tests::{free_port, wait_until, Cluster, HT_TARGET};
use std::process::{Command, Stdio};
use std::time::Duration;

const PASSWORDS: [&str; 6] = [
    "Audit-alice-pw-1",
    "Audit-bob-pw-1",
    "Outside-alice-pw-2",
    "Outside-bob-pw-2",
    "Carol-initial-pw-0",
    // Longer than bcrypt reads: applied at the directory, a dead letter at the htpasswd file.
    "Audit-dan-pw-1-that-is-longer-than-the-seventy-two-bytes-bcrypt-reads-xx",
];

/// `pwsync-consumer audit ARGS… --json` against consumer `k`: the report.
fn audit(c: &Cluster, k: usize, args: &[&str]) -> serde_json::Value {
    let cfg = c.consumers[k].config.display().to_string();
    let mut all = vec!["--config", cfg.as_str(), "audit", "--json"];
    all.extend_from_slice(args);
    let out = c.tool("pwsync-consumer", &all);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "audit: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for pw in PASSWORDS {
        assert!(!stdout.contains(pw), "a password in the audit's output");
    }
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn state_of(report: &serde_json::Value, user: &str, target: &str) -> String {
    report["users"][user][target]["state"]
        .as_str()
        .unwrap_or("(none)")
        .to_string()
}

#[test]
fn the_audit_names_exactly_the_passwords_set_outside_pwsync() {
    let Some(slapd) = Slapd::start() else { return };
    for u in ["alice", "bob", "carol", "dan"] {
        slapd.add_user(u, "Carol-initial-pw-0");
    }
    let metrics = free_port();
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer(
        "k",
        "g1",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\n[audit]\nevery_secs = 2\nreads_per_sec = 50\n\n{HT_TARGET}\n{}",
            slapd.target_section("dir", &c.path().join("ldap.pw"))
        ),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    for (user, pw) in [
        ("alice", PASSWORDS[0]),
        ("bob", PASSWORDS[1]),
        ("dan", PASSWORDS[5]),
    ] {
        assert!(matches!(
            c.submit(a, user, Op::Replace, Some(pw)),
            Response::Accepted { durable: true, .. }
        ));
    }
    wait_until(Duration::from_secs(30), "the changes applied", || {
        let s = c.consumer_status(k);
        s["targets"]["dir"]["applied"].as_u64() == Some(3)
            && s["targets"]["web"]["applied"].as_u64() == Some(2)
            && s["targets"]["web"]["dead_lettered"].as_u64() == Some(1)
    });

    // Through the running consumer: everything pwsync wrote is in step.
    let report = audit(&c, k, &[]);
    for user in ["alice", "bob"] {
        for target in ["web", "dir"] {
            assert_eq!(
                state_of(&report, user, target),
                "in_step",
                "{user} at {target}: {report}"
            );
        }
    }
    // pwsync's last change for dan waits at the htpasswd file (a dead letter, by a limit).
    assert_eq!(state_of(&report, "dan", "dir"), "in_step", "{report}");
    assert_eq!(state_of(&report, "dan", "web"), "dead_letter", "{report}");

    // One password set directly on each system, a second after pwsync's (LDAP keeps seconds).
    std::thread::sleep(Duration::from_millis(1_100));
    let before = pwsync_proto::hlc::wall_ms();
    let ht = c.consumers[k].dir.join("htpasswd");
    let set = Command::new("htpasswd")
        .args(["-b", "-B", "-C", "4"])
        .arg(&ht)
        .args(["alice", PASSWORDS[2]])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(set, "htpasswd -b");
    let set = Command::new("ldappasswd")
        .args(["-x", "-H", &slapd.url(), "-D", ADMIN_DN, "-w", ADMIN_PW])
        .args(["-s", PASSWORDS[3], "uid=bob,ou=people,dc=example,dc=org"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(set, "ldappasswd");
    let after = pwsync_proto::hlc::wall_ms();

    let check = |report: &serde_json::Value| {
        assert_eq!(
            state_of(report, "alice", "web"),
            "changed_outside",
            "{report}"
        );
        assert_eq!(state_of(report, "alice", "dir"), "in_step", "{report}");
        assert_eq!(state_of(report, "bob", "web"), "in_step", "{report}");
        assert_eq!(
            state_of(report, "bob", "dir"),
            "changed_outside",
            "{report}"
        );
        // LDAP's pwdChangedTime: within seconds of the change (whole seconds).
        let at = report["users"]["bob"]["dir"]["at_ms"].as_u64().unwrap_or(0);
        assert!(
            at + 1_000 >= before && at <= after + 1_000,
            "changed at {at}, set between {before} and {after}"
        );
        assert_eq!(report["summary"]["web"]["changed_outside"], 1, "{report}");
        assert_eq!(report["summary"]["dir"]["changed_outside"], 1, "{report}");
    };
    check(&audit(&c, k, &[]));
    // An account pwsync never wrote: carol is at the directory, not in the htpasswd file.
    let carol = audit(&c, k, &["--user", "carol"]);
    assert_eq!(state_of(&carol, "carol", "dir"), "never_written", "{carol}");
    assert_eq!(state_of(&carol, "carol", "web"), "missing", "{carol}");

    // The timer's audits: the gauges and the report file.
    wait_until(Duration::from_secs(30), "the audit gauges", || {
        let (_, m) = get(metrics, "/metrics");
        sample(
            &m,
            "pwsync_consumer_audit_accounts{target=\"web\",state=\"changed_outside\"}",
        ) == Some(1.0)
            && sample(
                &m,
                "pwsync_consumer_audit_accounts{target=\"dir\",state=\"in_step\"}",
            ) == Some(2.0)
    });
    let (_, metrics_text) = get(metrics, "/metrics");
    let kept: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.consumers[k].dir.join("state/audit.json")).expect("audit.json"),
    )
    .expect("json");
    check(&kept);

    // A reload's new target is audited from then on (over the audit's own new connection);
    // one the reload takes away is no longer counted.
    let cfg_path = c.consumers[k].config.clone();
    let original = std::fs::read_to_string(&cfg_path).expect("config");
    std::fs::write(
        &cfg_path,
        format!("{original}\n[targets.web2]\ntype = \"htpasswd\"\nsystem = \"web2\"\npath = \"htpasswd2\"\ncost = 4\n"),
    )
    .expect("config");
    let cfg = cfg_path.display().to_string();
    let out = c.tool("pwsync-consumer", &["--config", &cfg, "reload"]);
    assert!(
        out.status.success(),
        "reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = audit(&c, k, &[]);
    for user in ["alice", "bob", "dan"] {
        assert_eq!(state_of(&report, user, "web2"), "missing", "{report}");
    }
    check(&report);
    std::fs::write(&cfg_path, &original).expect("config");
    let out = c.tool("pwsync-consumer", &["--config", &cfg, "reload"]);
    assert!(out.status.success(), "reload back");
    let report = audit(&c, k, &[]);
    assert!(report["summary"].get("web2").is_none(), "{report}");
    let (_, m) = get(metrics, "/metrics");
    assert_eq!(
        sample(
            &m,
            "pwsync_consumer_audit_accounts{target=\"web2\",state=\"missing\"}"
        ),
        Some(0.0),
        "a removed target still counted"
    );

    // The consumer stopped: the same command on its state folder.
    c.consumer(k).stop();
    check(&audit(&c, k, &[]));
    let table = {
        let cfg = c.consumers[k].config.display().to_string();
        let out = c.tool("pwsync-consumer", &["--config", &cfg, "audit"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let alice = table.lines().find(|l| l.starts_with("alice")).unwrap_or("");
    assert!(
        alice.contains("CHANGED OUTSIDE") && alice.contains("in step"),
        "{table}"
    );
    assert!(
        table.contains("web: 1 changed outside, 1 dead letter, 1 in step"),
        "{table}"
    );

    // No test password anywhere: logs, metrics (above, as read), the state folder.
    let logs = c.all_logs();
    for pw in PASSWORDS {
        assert!(!logs.contains(pw), "a password in the logs");
        assert!(!metrics_text.contains(pw), "a password in the metrics");
    }
    for entry in walk(&c.consumers[k].dir.join("state")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        for pw in PASSWORDS {
            assert!(
                !bytes.windows(pw.len()).any(|w| w == pw.as_bytes()),
                "{pw} in {}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
