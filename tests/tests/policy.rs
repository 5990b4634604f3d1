//! The combined password policy (issue: one password policy for every system): consumers
//! publish what their targets can hold and the operator's `[policy]`, signed; agents enforce it
//! where the person types the password (PAM `check`, the socket API), and refuse deniable users
//! while it is unavailable.

use pwsync_agent::api::{Request, Response};
use pwsync_proto::policy::{PasswordPolicy, Rule, SourcedRule};
use pwsync_proto::{GroupName, Op, Secret, SigningKey};
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::pam::Service;
use pwsync_tests::scrape::{get, sample};
use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW};
use pwsync_tests::{free_port, htpasswd_verifies, wait_until, Cluster, HT_TARGET};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn append(path: &Path, text: &str) {
    let old = std::fs::read_to_string(path).expect("config");
    std::fs::write(path, format!("{old}\n{text}\n")).expect("config");
}

/// Makes agent `a` enforce group g1's policy (its public key from the cluster's keys), with
/// `extra` in the `[policy]` section.
fn enforce(c: &Cluster, a: usize, extra: &str) {
    let key = c.root.path().join("keys/group-g1.pub");
    if !key.exists() {
        c.groups["g1"]
            .verifying_key()
            .save(&key)
            .expect("group pub");
    }
    append(
        &c.agents[a].config,
        &format!("[policy]\ngroups = {{ g1 = {key:?} }}\n{extra}"),
    );
}

/// The running agent's answer to "would this password pass?".
fn check(c: &Cluster, a: usize, user: &str, password: &str) -> Response {
    pwsync_agent_api::blocking::request(
        &c.agents[a].socket,
        &Request::CheckPassword {
            user: user.into(),
            password: Secret::new(password.as_bytes().to_vec()),
        },
        Duration::from_secs(10),
    )
    .expect("the agent answers")
}

/// A program's stdout and stderr.
fn output(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn refused(r: &Response) -> Option<&str> {
    match r {
        Response::Rejected { reason } => Some(reason),
        _ => None,
    }
}

#[test]
fn pamtester_refuses_too_long_and_too_short_before_the_local_password_changes() {
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("pat", "Pat-Old-pw-1");
    let dir = tempfile::tempdir().expect("temp dir");
    let ldap_pw = dir.path().join("ldap.pw");
    std::fs::write(&ldap_pw, ADMIN_PW).expect("secret");
    std::fs::set_permissions(
        &ldap_pw,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    // pam_unix's stand-in, where it would set the local password: it leaves `local` behind
    // when it is reached (pam_exec gives a password-stack program no password to read).
    let local = dir.path().join("local");
    let set = dir.path().join("set.sh");
    std::fs::write(
        &set,
        format!("#!/bin/sh\necho \"$PAM_TYPE\" > {}\n", local.display()),
    )
    .expect("set.sh");
    std::fs::set_permissions(&set, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");

    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    enforce(&c, a, "");
    let k = c.add_consumer(
        "k",
        "g1",
        &format!(
            "{HT_TARGET}\n[targets.dir]\ntype = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"{}\"\npassword_mode = \"ssha\"\ndn_template = \"uid={{user}},ou=people,dc=example,dc=org\"\n\n[policy]\nmin_length = 12\n",
            slapd.url(),
            ldap_pw.display()
        ),
    );
    let socket = c.agents[a].socket.display().to_string();
    let Some(service) = Service::with_stack(&format!(
        "password requisite {{module}} socket={socket} check\npassword requisite pam_exec.so quiet {}\npassword required {{module}} socket={socket}\n",
        set.display()
    )) else {
        return;
    };
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    wait_until(WAIT, "the group's policy at the agent", || {
        refused(&check(&c, a, "pat", "Short-pw-1")).is_some_and(|r| r.contains("at least 12"))
    });

    let long = "Long-pw-1-".repeat(7) + "abc"; // 73 bytes
    assert_eq!(long.len(), 73);
    let out = service.chauthtok("pat", &long);
    let text = output(&out);
    assert!(!out.status.success(), "pamtester: {text}");
    assert!(
        text.contains("at most 71 bytes") && text.contains("web stores bcrypt"),
        "the reason: {text}"
    );
    assert!(!local.exists(), "the local password changed");

    let out = service.chauthtok("pat", "Short-pw-1");
    let text = output(&out);
    assert!(!out.status.success(), "pamtester: {text}");
    assert!(
        text.contains("at least 12 characters: the password policy of group g1"),
        "the reason: {text}"
    );
    assert!(!local.exists(), "the local password changed");

    let out = service.chauthtok("pat", "Pat-Good-pw-long-2");
    assert!(
        out.status.success(),
        "pamtester: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(local.exists(), "the local password was not set");
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(WAIT, "pat's change at both targets", || {
        htpasswd_verifies(&ht, "pat", "Pat-Good-pw-long-2")
            && slapd.binds("pat", "Pat-Good-pw-long-2")
    });
    assert_eq!(c.status(a).accepted, 1, "a refused password was forwarded");
    // The socket API refuses too (submit checks again).
    assert!(refused(&c.submit(a, "pat", Op::Replace, Some(&long))).is_some());

    // A stack without the `check` line: pam_unix sets the password first, so pwsync must not
    // refuse it after (the local password would be ahead of every other system, unforwarded).
    let Some(unchecked) = Service::with_stack(&format!(
        "password requisite pam_exec.so quiet {}\npassword required {{module}} socket={socket}\n",
        set.display()
    )) else {
        return;
    };
    let out = unchecked.chauthtok("pat", "Pat-Short-2");
    assert!(out.status.success(), "pamtester: {}", output(&out));
    wait_until(WAIT, "the change set locally at the targets", || {
        htpasswd_verifies(&ht, "pat", "Pat-Short-2") && slapd.binds("pat", "Pat-Short-2")
    });
    let logs = c.all_logs();
    for pw in [
        long.as_str(),
        "Short-pw-1",
        "Pat-Good-pw-long-2",
        "Pat-Short-2",
    ] {
        assert!(!logs.contains(pw), "{pw} in a log");
    }
}

#[test]
fn a_consumer_config_change_reaches_agents_in_seconds_and_survives_relay_and_agent_restarts() {
    // And the relay keeps it: an agent that starts while the group's consumers are down, after
    // a relay restart, gets it all the same.
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    enforce(&c, a, "");
    // First only a target that takes long passwords.
    let k = c.add_consumer(
        "k",
        "g1",
        "[targets.log]\ntype = \"null\"\nsystem = \"log\"\n",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let long = "x".repeat(72) + "Y1";
    wait_until(WAIT, "the first policy", || {
        check(&c, a, "ann", &long) == Response::Ready
    });

    // A new target that holds at most 71 bytes.
    let config = c.consumers[k].config.clone();
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, format!("{text}\n{HT_TARGET}")).expect("config");
    c.consumers[k].daemon.as_mut().expect("consumer").stop();
    c.start_consumer(k);
    wait_until(WAIT, "the stricter policy at the agent", || {
        refused(&check(&c, a, "ann", &long)).is_some_and(|r| r.contains("web stores bcrypt"))
    });

    // The relay and the agent restart; the agent enforces at once, from its copy.
    c.relay().restart();
    c.agents[a].daemon.as_mut().expect("agent").stop();
    c.start_agent(a);
    assert!(
        refused(&check(&c, a, "ann", &long)).is_some(),
        "forgotten across a restart"
    );
    let out = std::process::Command::new(pwsync_tests::bin("pwsync-agent"))
        .args([
            "--config",
            &c.agents[a].config.display().to_string(),
            "policy",
        ])
        .output()
        .expect("pwsync-agent policy");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("group g1: version")
            && shown.contains("at most 71 bytes")
            && shown.contains("from web stores bcrypt (htpasswd)"),
        "{shown}"
    );
    // check-password answers from the same copy.
    let mut cmd = std::process::Command::new(pwsync_tests::bin("pwsync-agent"));
    cmd.args([
        "--config",
        &c.agents[a].config.display().to_string(),
        "check-password",
        "--user",
        "ann",
    ]);
    let run = |cmd: &mut std::process::Command, pw: &str| {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("check-password");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{pw}\n").as_bytes())
            .expect("stdin");
        child.wait_with_output().expect("check-password")
    };
    let out = run(&mut cmd, &long);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("at most 71 bytes"));
    assert_eq!(run(&mut cmd, "Fine-pw-123").status.code(), Some(0));
    // And the policy still flows after the relay's restart: published again by the consumer.
    let before = std::fs::metadata(c.agents[a].spool.join("policy/g1.signed"))
        .and_then(|m| m.modified())
        .expect("kept policy");
    wait_until(
        WAIT,
        "the policy published again after the restarts",
        || {
            std::fs::metadata(c.agents[a].spool.join("policy/g1.signed"))
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > before)
        },
    );

    let b = c.add_agent("host-b", AgentOptions::default());
    enforce(&c, b, "");
    c.consumers[k].daemon.as_mut().expect("consumer").stop();
    c.relay().restart();
    c.start_agent(b);
    wait_until(WAIT, "the relay's copy at a new agent", || {
        refused(&check(&c, b, "ann", &long)).is_some_and(|r| r.contains("web stores bcrypt"))
    });
    let log = c.agents[b].daemon.as_ref().expect("agent").log_text();
    assert!(
        !log.contains("replayed"),
        "the relay's copies were taken for replays:\n{log}"
    );
}

#[test]
fn a_policy_from_an_unknown_key_or_an_older_version_is_ignored_and_counted() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let port = free_port();
    enforce(&c, a, "");
    // The agent's /metrics, to read the counts.
    append(
        &c.agents[a].config,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""),
    );
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("{HT_TARGET}\n[policy]\nmin_length = 10\n"),
    );
    // The relay's /metrics too.
    let relay_port = free_port();
    append(
        &c.relay_config,
        &format!("[metrics]\nlisten = \"127.0.0.1:{relay_port}\""),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    wait_until(WAIT, "the group's policy", || {
        refused(&check(&c, a, "bo", "Short-1")).is_some_and(|r| r.contains("at least 10"))
    });
    c.consumers[k].daemon.as_mut().expect("consumer").stop();

    let group = GroupName::new("g1").expect("group");
    let now = pwsync_proto::hlc::wall_ms();
    let forged = |version: u64, published_ms: u64, rules: Vec<Rule>, key: &SigningKey| {
        let p = PasswordPolicy {
            group: group.clone(),
            version,
            issued_ms: 1,
            published_ms,
            rules: rules
                .into_iter()
                .map(|rule| SourcedRule {
                    rule,
                    source: "an attacker".into(),
                })
                .collect(),
        };
        pwsync_proto::signed::sign(&p, key).expect("sign")
    };
    let probe = c.probe_as("consumer:g1", "forger", &[]);
    let topic = pwsync_proto::topics::policy(&group);
    let key = &c.groups["g1"];
    // A genuine policy made by mistake, published further down (signed now, while the test
    // holds the group's key).
    let mistaken = now + 5 * 60 * 1000;
    let mistaken_policy = forged(mistaken, now, vec![Rule::MinChars(30)], key);
    // Signed by a key that is not the group's, with a huge version.
    let other = SigningKey::generate().expect("key");
    probe.publish(
        &c.rt,
        &topic,
        forged(u64::MAX, now, vec![Rule::MinChars(1)], &other),
    );
    // Signed by the group's key (stolen, or a mistake): an older version; a version and a
    // publication time from far in the future, which would pin the group for ever; rules no
    // password can keep, which would refuse every password.
    probe.publish(&c.rt, &topic, forged(1, 1, vec![Rule::MinChars(1)], key));
    probe.publish(
        &c.rt,
        &topic,
        forged(u64::MAX, u64::MAX, vec![Rule::MinChars(1)], key),
    );
    probe.publish(
        &c.rt,
        &topic,
        forged(
            now + 1,
            now,
            vec![Rule::MinChars(50), Rule::MaxChars(8)],
            key,
        ),
    );
    let count = |page: &str, outcome: &str| {
        sample(
            page,
            &format!("pwsync_agent_policy_messages_total{{outcome=\"{outcome}\"}}"),
        )
    };
    wait_until(WAIT, "each counted", || {
        let (_, page) = get(port, "/metrics");
        count(&page, "bad_signature") == Some(1.0)
            && count(&page, "replayed") >= Some(1.0)
            && count(&page, "from_the_future") >= Some(1.0)
            && count(&page, "unsatisfiable") >= Some(1.0)
    });
    // The relay refused and counted the same ones (and kept none of them to republish).
    let relay_count = |page: &str, outcome: &str| {
        sample(
            page,
            &format!("pwsync_relay_policy_messages_total{{outcome=\"{outcome}\"}}"),
        )
    };
    wait_until(WAIT, "each counted at the relay", || {
        let (_, page) = get(relay_port, "/metrics");
        relay_count(&page, "bad_signature") == Some(1.0)
            && relay_count(&page, "replayed") >= Some(1.0)
            && relay_count(&page, "from_the_future") == Some(1.0)
            && relay_count(&page, "unsatisfiable") == Some(1.0)
    });
    // Still the group's own policy.
    assert!(refused(&check(&c, a, "bo", "Short-1")).is_some_and(|r| r.contains("at least 10")));
    let log = c.agents[a].daemon.as_ref().expect("agent").log_text();
    assert!(
        log.contains("bad_signature")
            && log.contains("replayed")
            && log.contains("from_the_future")
            && log.contains("unsatisfiable"),
        "{log}"
    );
    // The group's next genuine policy is taken: nothing pinned it.
    let config = c.consumers[k].config.clone();
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("min_length = 10", "min_length = 11")).expect("config");
    c.start_consumer(k);
    wait_until(WAIT, "the group's next policy", || {
        refused(&check(&c, a, "bo", "Short-pw-1")).is_some_and(|r| r.contains("at least 11"))
    });

    // A genuine policy made by mistake (the group's key, rules nobody meant, a version
    // minutes ahead: within the tolerance, so agents and the relay take it) is superseded by
    // the running consumer as soon as it sees it: no new key, no hand-editing, no waiting.
    probe.publish(&c.rt, &topic, mistaken_policy);
    let agent_config = c.agents[a].config.display().to_string();
    let held = || {
        let out = std::process::Command::new(pwsync_tests::bin("pwsync-agent"))
            .args(["--config", &agent_config, "policy"])
            .output()
            .expect("pwsync-agent policy");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    wait_until(
        WAIT,
        "the consumer's version above the mistaken one",
        || held().contains(&format!("version {},", mistaken + 1)),
    );
    assert!(refused(&check(&c, a, "bo", "Short-pw-1")).is_some_and(|r| r.contains("at least 11")));
    assert_eq!(check(&c, a, "bo", "Good-pw-1234"), Response::Ready);
    let consumer_log = c.consumers[k].daemon.as_ref().expect("consumer").log_text();
    assert!(
        consumer_log.contains("superseding it with this consumer's rules"),
        "{consumer_log}"
    );
    // Kept: a restart publishes the superseding version again (agents would ignore an older
    // one, so the consumer's own record and log are what show it).
    c.consumers[k].daemon.as_mut().expect("consumer").stop();
    let kept: PasswordPolicy = postcard::from_bytes(
        &std::fs::read(c.consumers[k].dir.join("state/policy.last")).expect("policy.last"),
    )
    .expect("policy.last decodes");
    assert_eq!(kept.version, mistaken + 1);
    let refreshed = || relay_count(&get(relay_port, "/metrics").1, "refreshed").unwrap_or(0.0);
    let before = refreshed();
    c.start_consumer(k);
    // The relay holds the superseding version: only that version, published again, counts as
    // refreshed there (an older one would be a replay).
    wait_until(
        WAIT,
        "the superseding version republished after a restart",
        || refreshed() > before,
    );
    let kept: PasswordPolicy = postcard::from_bytes(
        &std::fs::read(c.consumers[k].dir.join("state/policy.last")).expect("policy.last"),
    )
    .expect("policy.last decodes");
    assert_eq!(kept.version, mistaken + 1);
}

/// The relay and an agent follow one acceptance rule: fed the same sequence of genuine
/// policies (newer, older, republished, other rules under a held version, from the future,
/// unsatisfiable), in a seeded random order, they hold the same one after every message.
#[test]
fn the_relay_and_an_agent_fed_the_same_policies_keep_the_same_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = SigningKey::generate().expect("key");
    let group = GroupName::new("g1").expect("group");
    let public = dir.path().join("g1.pub");
    key.verifying_key().save(&public).expect("save");
    let cfg: pwsync_agent::policy::PolicyConfig =
        toml::from_str(&format!("groups = {{ g1 = {public:?} }}\n")).expect("config");
    let agent =
        pwsync_agent::policy::Policies::open(Some(&cfg), &dir.path().join("agent")).expect("agent");
    std::fs::create_dir_all(dir.path().join("relay")).expect("dir");
    let vk = key.verifying_key();
    let mut relay =
        pwsync_relay::policies::Policies::open(&dir.path().join("relay"), [(&group, &vk)]);
    let now = pwsync_proto::hlc::wall_ms();
    let mut state = std::env::var("PWSYNC_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(31);
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let mut taken = 0;
    for step in 0..300 {
        let version = match next(6) {
            0 => u64::MAX,
            1 => now + pwsync_proto::policy::AHEAD_TOLERANCE_MS + 60_000 + next(1000),
            _ => now - 50 + next(100),
        };
        let published = match next(8) {
            0 => u64::MAX / 2,
            _ => now - 50 + next(100),
        };
        let mut rules = vec![Rule::MinChars(8 + next(2) as u32)];
        if next(10) == 0 {
            rules.push(Rule::MaxChars(4));
        }
        let p = PasswordPolicy {
            group: group.clone(),
            version,
            issued_ms: now,
            published_ms: published,
            rules: rules
                .into_iter()
                .map(|rule| SourcedRule {
                    rule,
                    source: "g1".into(),
                })
                .collect(),
        };
        let bytes = pwsync_proto::signed::sign(&p, &key).expect("sign");
        let at_agent = agent.offer(&group, &bytes);
        let at_relay = relay.offer(&group, &vk, &bytes);
        let agent_holds = agent.held().into_iter().next().and_then(|(_, p)| p);
        let relay_holds = relay.all().into_iter().next().map(|(_, b)| {
            pwsync_proto::signed::verify::<PasswordPolicy>(&b, &vk).expect("verifies")
        });
        assert_eq!(
            agent_holds, relay_holds,
            "step {step}: {at_agent:?} / {at_relay}"
        );
        if let Some(h) = &agent_holds {
            assert!(h.version <= now + pwsync_proto::policy::AHEAD_TOLERANCE_MS);
            assert!(h.contradictions().is_empty());
        }
        taken += at_relay as u32;
    }
    assert!(taken > 3, "the sequence took only {taken} policies");
}

#[test]
fn with_no_policy_a_deniable_user_is_refused_and_an_undeniable_one_passes_and_is_logged() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    enforce(&c, a, "undeniable = [\"breakglass-*\"]\n");
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_agent(a);
    // No consumer has run: no policy.
    let r = c.submit(a, "dora", Op::Replace, Some("Dora-pw-123456"));
    assert!(
        refused(&r).is_some_and(|r| r.contains("password policy unavailable")),
        "{r:?}"
    );
    let r = c.submit(a, "breakglass-1", Op::Replace, Some("Break-pw-123456"));
    assert!(
        matches!(r, Response::Accepted { durable: true, .. }),
        "{r:?}"
    );
    let log = c.agents[a].daemon.as_ref().expect("agent").log_text();
    assert!(
        log.contains("undeniable user's change goes ahead unchecked"),
        "{log}"
    );
    assert!(!log.contains("Break-pw-123456") && !log.contains("Dora-pw-123456"));
    // Once the group publishes, dora's change goes through to the target.
    c.start_consumer(k);
    wait_until(WAIT, "the policy", || {
        check(&c, a, "dora", "Dora-pw-123456") == Response::Ready
    });
    assert!(matches!(
        c.submit(a, "dora", Op::Replace, Some("Dora-pw-123456")),
        Response::Accepted { durable: true, .. }
    ));
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(WAIT, "dora at the target", || {
        htpasswd_verifies(&ht, "dora", "Dora-pw-123456")
    });
    wait_until(WAIT, "the undeniable change too", || {
        htpasswd_verifies(&ht, "breakglass-1", "Break-pw-123456")
    });
}

/// A flood of "would this password pass?" from one peer is slowed to the documented rate
/// (`pwsync_agent::throttle`: BURST at once, PER_SECOND a second after), turned away when its
/// turn would come more than MAX_WAIT later, counted, and logged at most once a minute.
#[test]
fn a_flood_of_password_checks_is_slowed_counted_and_logged_once_a_minute() {
    use pwsync_agent::throttle::{BURST, PER_SECOND};
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let port = free_port();
    enforce(&c, a, "");
    append(
        &c.agents[a].config,
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""),
    );
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("{HT_TARGET}\n[policy]\nmin_length = 10\n"),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let first_check = std::time::Instant::now();
    wait_until(WAIT, "the group's policy", || {
        refused(&check(&c, a, "bo", "Short-1")).is_some_and(|r| r.contains("at least 10"))
    });

    // One check at a time: every one is answered, but no faster than the rate.
    let n = 120u32;
    let started = std::time::Instant::now();
    for _ in 0..n {
        assert!(refused(&check(&c, a, "bo", "Short-1")).is_some_and(|r| r.contains("at least 10")));
    }
    let took = started.elapsed().as_secs_f64();
    let least = f64::from(n - BURST) / f64::from(PER_SECOND);
    assert!(
        took >= least - 0.05,
        "{n} checks in {took:.2} s: at most {BURST} at once and {PER_SECOND} a second after allow no less than {least:.2} s"
    );

    // Many at once: those whose turn would come too late are turned away at once, saying why.
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let answers: Vec<Response> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..160)
            .map(|_| s.spawn(|| check(&c, a, "bo", "Short-1")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a flooding thread"))
            .collect()
    });
    let turned_away = answers
        .iter()
        .filter(|r| {
            matches!(r, Response::NotReady { reason } if reason.contains(&format!("too many password checks from uid {me}")))
        })
        .count();
    let refused_by_policy = answers
        .iter()
        .filter(|r| refused(r).is_some_and(|r| r.contains("at least 10")))
        .count();
    assert!(
        turned_away > 0,
        "none of 160 checks at once was turned away"
    );
    assert_eq!(
        turned_away + refused_by_policy,
        answers.len(),
        "{answers:?}"
    );

    // Counted, every one.
    let (_, page) = get(port, "/metrics");
    let count = |outcome: &str| {
        sample(
            &page,
            &format!("pwsync_agent_password_checks_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(
        count("refused") >= f64::from(n) + refused_by_policy as f64,
        "{page}"
    );
    assert!(count("turned_away") >= turned_away as f64, "{page}");
    assert!(
        sample(&page, "pwsync_agent_password_checks_slowed_total").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    // Logged at most once a minute for this peer, whatever the flood.
    let minutes = first_check.elapsed().as_secs() / 60 + 1;
    let log = c.agents[a].daemon.as_ref().expect("agent").log_text();
    let lines = log
        .lines()
        .filter(|l| {
            l.contains("refused by the password policy") || l.contains("too many password checks")
        })
        .count() as u64;
    assert!(
        (1..=minutes).contains(&lines),
        "{lines} lines in {minutes} minute(s):\n{log}"
    );
}

/// Issue 32: `pwsync-agent reload` (and SIGHUP) takes a new `[scope]` and a new `[policy]`
/// group without a restart: a user newly excluded is ignored, and the group added is enforced
/// from its next publication. A config that changes what needs a restart is refused in words,
/// and the running one stays.
#[test]
fn an_agent_reload_takes_scope_and_policy_groups_without_a_restart() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer(
        "k",
        "g1",
        &format!("{HT_TARGET}\n[policy]\nmin_length = 10\n"),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let cfg = c.agents[a].config.display().to_string();
    let reload = |c: &Cluster| c.tool("pwsync-agent", &["--config", &cfg, "reload"]);
    // No [policy]: every password passes; svc-x is in scope.
    assert!(refused(&check(&c, a, "bo", "Short-1")).is_none());
    assert!(matches!(
        c.submit(a, "svc-x", Op::Replace, Some("Long-enough-1")),
        Response::Accepted { .. }
    ));

    let original = std::fs::read_to_string(&c.agents[a].config).expect("config");
    std::fs::write(
        &c.agents[a].config,
        original.replace("exclude = [\"root\"]", "exclude = [\"root\", \"svc-*\"]"),
    )
    .expect("config");
    enforce(&c, a, "");
    let o = reload(&c);
    assert!(o.status.success(), "{}", output(&o));
    assert!(
        output(&o).contains("policy groups [\"g1\"] taken"),
        "{}",
        output(&o)
    );
    assert!(matches!(
        c.submit(a, "svc-x", Op::Replace, Some("Long-enough-2")),
        Response::Ignored { .. }
    ));
    wait_until(WAIT, "the added group's policy enforced", || {
        refused(&check(&c, a, "bo", "Short-1")).is_some_and(|r| r.contains("at least 10"))
    });

    // What needs a restart: refused, and the running config stays.
    let now = std::fs::read_to_string(&c.agents[a].config).expect("config");
    std::fs::write(
        &c.agents[a].config,
        now.replace("window = 256", "window = 128"),
    )
    .expect("config");
    let o = reload(&c);
    assert!(!o.status.success(), "{}", output(&o));
    assert!(
        output(&o).contains("[relay] changed, which takes a restart"),
        "{}",
        output(&o)
    );
    assert!(refused(&check(&c, a, "bo", "Short-1")).is_some());

    // SIGHUP: back to the original scope and no policy.
    std::fs::write(&c.agents[a].config, &original).expect("config");
    let pid = c.agent(a).pid().expect("pid");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    wait_until(WAIT, "the SIGHUP reload", || {
        refused(&check(&c, a, "bo", "Short-1")).is_none()
    });
    assert!(matches!(
        c.submit(a, "svc-x", Op::Replace, Some("Long-enough-3")),
        Response::Accepted { .. }
    ));
    assert!(c.agent(a).is_running());
}
