//! The Kerberos target against a real MIT realm (issue 19): krb5kdc and kadmind on free loopback
//! ports, a change submitted through an agent reaching the principal through the whole pipeline,
//! checked by `kinit` (the realm's own login) with the new password and the old one; revoke,
//! resume and remove; the realm's policy refusing a change in its own words; kadmind stopped
//! mid-stream. Throughout, every process's argv is watched for the passwords (none may carry
//! one), and every log is read for them at the end.
//!
//! Each test has its realm (made in well under a second) and its installation; the consumer
//! finds the realm through `KRB5_CONFIG`, as any Kerberos program does.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::krb5::Kdc;
use pwsync_tests::{wait_until, ArgvWatch, Cluster};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn ok(r: Response) {
    assert!(
        matches!(r, Response::Accepted { durable: true, .. }),
        "{r:?}"
    );
}

/// A relay, one agent and a consumer whose one target is the realm (with `extra` in its
/// section), all started; returns the cluster, the agent and the consumer.
fn site(kdc: &Kdc, extra: &str) -> (Cluster, usize, usize) {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer(
        "k",
        "g1",
        &format!(
            "[retry]\nbase_ms = 100\nmax_secs = 1\nno_such_user_secs = 2\n\n[targets.realm]\n{}{extra}\n",
            kdc.target_section()
        ),
    );
    c.start_relay();
    let conf = kdc.krb5_conf().display().to_string();
    c.start_consumer_with_env(k, &[("KRB5_CONFIG", &conf)]);
    c.start_agent(a);
    (c, a, k)
}

/// Every log of the installation and of the realm.
fn all_logs(c: &Cluster, kdc: &Kdc) -> String {
    let mut out = c.all_logs();
    for f in ["kdc.log", "kadmind.log", "krb5kdc.out", "kadmind.out"] {
        out += &std::fs::read_to_string(kdc.path().join(f)).unwrap_or_default();
    }
    out
}

/// The watch over every process's argv, shown first to catch a password put in one.
fn watch(secrets: &[&str]) -> ArgvWatch {
    let canary = "Argv-Canary-7";
    let mut all = secrets.to_vec();
    all.push(canary);
    let w = ArgvWatch::start(&all);
    let shown = std::process::Command::new("sh")
        .args(["-c", "sleep 0.3", canary])
        .status()
        .expect("sh");
    assert!(shown.success());
    w
}

fn no_password_in_argv(w: ArgvWatch, secrets: &[&str]) {
    let (scans, seen) = w.finish();
    assert!(scans > 10, "the process list was scanned {scans} times");
    assert!(
        seen.iter().any(|argv| argv.contains("Argv-Canary-7")),
        "the watch did not see the canary's command line: {seen:?}"
    );
    let leaks: Vec<_> = seen
        .iter()
        .filter(|argv| secrets.iter().any(|s| argv.contains(s)))
        .collect();
    assert!(leaks.is_empty(), "a password in a command line: {leaks:?}");
}

#[test]
fn a_change_sets_the_principal_so_kinit_takes_the_new_password_and_revoke_resume_remove_follow() {
    let Some(kdc) = Kdc::start() else { return };
    let passwords = ["Krb-Old-pw-1", "Krb-New-pw-1", "Bob-Stays-pw-1"];
    let argv = watch(&passwords);
    kdc.add_principal("alice", "Krb-Old-pw-1");
    kdc.add_principal("bob", "Bob-Stays-pw-1");
    let (c, a, k) = site(&kdc, "remove = \"delete\"\n");

    ok(c.submit(a, "alice", Op::Replace, Some("Krb-New-pw-1")));
    wait_until(WAIT, "alice's kinit with the new password", || {
        kdc.kinit("alice", b"Krb-New-pw-1")
    });
    assert!(!kdc.kinit("alice", b"Krb-Old-pw-1"), "the old password");
    assert!(kdc.kinit("bob", b"Bob-Stays-pw-1"), "bob changed");

    ok(c.submit(a, "alice", Op::Revoke, None));
    wait_until(WAIT, "alice's kinit to be refused", || {
        !kdc.kinit("alice", b"Krb-New-pw-1")
    });
    assert!(
        kdc.attributes("alice").contains("DISALLOW_ALL_TIX"),
        "{}",
        kdc.attributes("alice")
    );
    ok(c.submit(a, "alice", Op::Resume, None));
    wait_until(WAIT, "alice's kinit again", || {
        kdc.kinit("alice", b"Krb-New-pw-1")
    });
    assert!(kdc.attributes("alice").is_empty());

    // remove = "delete": the principal is gone; bob is as he was.
    ok(c.submit(a, "alice", Op::Remove, None));
    wait_until(WAIT, "alice's principal to be deleted", || {
        !kdc.exists("alice")
    });
    assert!(kdc.kinit("bob", b"Bob-Stays-pw-1"));
    assert_eq!(
        c.consumer_status(k)["targets"]["realm"]["dead_lettered"].as_u64(),
        Some(0)
    );
    no_password_in_argv(argv, &passwords);
    let logs = all_logs(&c, &kdc);
    for p in passwords {
        assert!(!logs.contains(p), "{p} in a log");
    }
}

#[test]
fn the_realms_policy_refuses_in_its_own_words_and_a_missing_principal_is_no_such_user() {
    let Some(kdc) = Kdc::start() else { return };
    kdc.local("addpol -minlength 12 -minclasses 2 strict", "");
    kdc.add_principal("frank", "Frank-Old-pw-1");
    kdc.local("modprinc -policy strict frank", "");
    let (c, a, k) = site(&kdc, "");

    ok(c.submit(a, "frank", Op::Replace, Some("short1")));
    ok(c.submit(a, "nobody", Op::Replace, Some("Nobody-pw-1")));
    wait_until(WAIT, "two dead letters", || {
        c.consumer_status(k)["targets"]["realm"]["dead_lettered"].as_u64() == Some(2)
    });
    let users = &c.consumer_status(k)["users"];
    let frank = users["frank"]["realm"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        frank.contains("password policy") && frank.contains("too short"),
        "{users}"
    );
    let nobody = users["nobody"]["realm"].as_str().unwrap_or_default();
    assert!(nobody.contains("no principal nobody@"), "{users}");
    assert!(kdc.kinit("frank", b"Frank-Old-pw-1"));

    // A password the policy takes lands.
    ok(c.submit(a, "frank", Op::Replace, Some("Frank-Long-Enough-1")));
    wait_until(WAIT, "frank's new password", || {
        kdc.kinit("frank", b"Frank-Long-Enough-1")
    });
    let logs = all_logs(&c, &kdc);
    for p in ["short1", "Nobody-pw-1", "Frank-Long-Enough-1"] {
        assert!(!logs.contains(p), "{p} in a log");
    }
}

#[test]
fn kadmind_stopped_mid_stream_the_changes_wait_and_land_when_it_returns() {
    let Some(mut kdc) = Kdc::start() else { return };
    let passwords = [
        "Carol-Old-pw-1",
        "Carol-pw-1",
        "Carol-pw-2",
        "Dave-Old-pw-1",
        "Dave-pw-1",
        "Erin-pw-1",
    ];
    let argv = watch(&passwords);
    kdc.add_principal("carol", "Carol-Old-pw-1");
    kdc.add_principal("dave", "Dave-Old-pw-1");
    kdc.add_principal("erin", "Erin-pw-1");
    let (c, a, k) = site(&kdc, "");
    ok(c.submit(a, "carol", Op::Replace, Some("Carol-pw-1")));
    wait_until(WAIT, "carol's first change", || {
        kdc.kinit("carol", b"Carol-pw-1")
    });

    kdc.stop_kadmind();
    ok(c.submit(a, "carol", Op::Replace, Some("Carol-pw-2")));
    ok(c.submit(a, "dave", Op::Replace, Some("Dave-pw-1")));
    ok(c.submit(a, "erin", Op::Remove, None));
    wait_until(WAIT, "the target to be reported unavailable", || {
        c.consumer_status(k)["targets"]["realm"]["unavailable"].is_string()
    });
    let status = c.consumer_status(k);
    assert!(
        status["targets"]["realm"]["retry_depth"].as_u64() >= Some(1),
        "{status}"
    );
    // Nothing moved while kadmind was away.
    assert!(kdc.kinit("carol", b"Carol-pw-1"));
    assert!(kdc.kinit("dave", b"Dave-Old-pw-1"));

    kdc.start_kadmind();
    wait_until(
        WAIT,
        "carol's and dave's changes after kadmind returned",
        || kdc.kinit("carol", b"Carol-pw-2") && kdc.kinit("dave", b"Dave-pw-1"),
    );
    // remove = "disable" (the default): erin is kept, and gets no tickets.
    wait_until(WAIT, "erin to be disabled", || {
        kdc.attributes("erin").contains("DISALLOW_ALL_TIX")
    });
    assert!(kdc.exists("erin") && !kdc.kinit("erin", b"Erin-pw-1"));
    assert!(!kdc.kinit("carol", b"Carol-pw-1"));
    wait_until(WAIT, "the retry queue to drain", || {
        let s = c.consumer_status(k);
        s["targets"]["realm"]["retry_depth"].as_u64() == Some(0)
            && s["targets"]["realm"]["unavailable"].is_null()
    });
    assert_eq!(
        c.consumer_status(k)["targets"]["realm"]["dead_lettered"].as_u64(),
        Some(0)
    );
    no_password_in_argv(argv, &passwords);
    let logs = all_logs(&c, &kdc);
    for p in passwords {
        assert!(!logs.contains(p), "{p} in a log");
    }
}

#[test]
fn the_target_connects_again_after_kadmind_returns_and_a_redelivered_change_is_applied() {
    use pwsync_consumer::targets::{self, Outcome};
    use pwsync_proto::{Change, Secret};
    let Some(mut kdc) = Kdc::start() else { return };
    kdc.add_principal("gina", "Gina-Old-pw-1");
    // This process's libkadm5 reads KRB5_CONFIG when it connects; only this test connects in
    // this binary's own process.
    std::env::set_var("KRB5_CONFIG", kdc.krb5_conf());
    let section: toml::Table = toml::from_str(&kdc.target_section()).expect("section");
    let first = targets::build("realm", section.clone(), &kdc.path().join("consumer.toml"))
        .expect("target");
    assert!(first.target.check().is_ok());
    drop(first);
    let t = targets::build("realm", section, &kdc.path().join("consumer.toml")).expect("target");
    assert!(t.target.check().is_ok());
    let set = |pw: &str| {
        t.apply(
            &Change::new(
                "gina",
                "elsewhere",
                Op::Replace,
                vec![Secret::new(pw.into())],
            ),
            "gina",
        )
    };
    assert_eq!(set("Gina-pw-1"), Outcome::Applied);
    kdc.stop_kadmind();
    for _ in 0..3 {
        assert!(matches!(set("Gina-pw-2"), Outcome::Unavailable(_)));
    }
    kdc.start_kadmind();
    assert_eq!(set("Gina-pw-2"), Outcome::Applied);
    assert!(kdc.kinit("gina", b"Gina-pw-2"));

    // Under a policy with a history, the same change delivered again (after a consumer crash)
    // is refused by kadmind as reuse: a login with it shows it is in place, so it is applied.
    // An older password is a dead letter in the policy's words.
    kdc.local("addpol -history 3 hist", "");
    kdc.local("modprinc -policy hist gina", "");
    assert_eq!(set("Gina-pw-3"), Outcome::Applied);
    assert_eq!(set("Gina-pw-3"), Outcome::Applied);
    match set("Gina-pw-2") {
        Outcome::Failed(m) => assert!(m.contains("password policy") && m.contains("reuse"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(kdc.kinit("gina", b"Gina-pw-3"));
}

/// The KDC's own policy reaches agents as the target's rules: a principal under a policy of
/// `minlength 12` has a password of 11 characters refused at the agent, naming the policy and
/// the realm; a principal without a policy is not held to it.
#[test]
fn the_kdcs_policy_of_a_principal_reaches_agents() {
    use pwsync_agent_api::Request;
    use pwsync_proto::Secret;
    let Some(kdc) = Kdc::start() else { return };
    kdc.local("addpol -minlength 12 -minclasses 2 long12", "");
    kdc.add_principal("gail", "Gail-Old-pw-1-x");
    kdc.local("modprinc -policy long12 gail", "");
    kdc.add_principal("hugo", "Hugo-Old-pw-1");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let key = c.root.path().join("keys/group-g1.pub");
    c.groups["g1"]
        .verifying_key()
        .save(&key)
        .expect("group key");
    let config = std::fs::read_to_string(&c.agents[a].config).expect("agent config");
    std::fs::write(
        &c.agents[a].config,
        format!("{config}\n[policy]\ngroups = {{ g1 = {key:?} }}\n"),
    )
    .expect("agent config");
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("[targets.realm]\n{}\n", kdc.target_section()),
    );
    c.start_relay();
    let conf = kdc.krb5_conf().display().to_string();
    c.start_consumer_with_env(k, &[("KRB5_CONFIG", &conf)]);
    c.start_agent(a);
    let check = |user: &str, pw: &str| {
        pwsync_agent_api::blocking::request(
            &c.agents[a].socket,
            &Request::CheckPassword {
                user: user.into(),
                password: Secret::new(pw.as_bytes().to_vec()),
            },
            Duration::from_secs(10),
        )
        .expect("the agent answers")
    };
    wait_until(
        WAIT,
        "the KDC's policy at the agent",
        || matches!(check("gail", "Eleven-char"), Response::Rejected { reason } if reason.contains("at least 12 characters") && reason.contains("the KDC policy long12 of realm")),
    );
    assert!(
        matches!(check("gail", "twelve-chars"), Response::Ready),
        "12 characters of two classes pass"
    );
    assert!(
        matches!(check("gail", "twelvechars0"), Response::Ready),
        "two classes: lower case and digits"
    );
    assert!(
        matches!(check("gail", "twelvecharsx"), Response::Rejected { reason } if reason.contains("2 of 4 character classes")),
        "one class is refused"
    );
    assert!(
        matches!(check("hugo", "Eleven-char"), Response::Ready),
        "hugo has no policy"
    );
}
