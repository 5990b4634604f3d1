//! The LDAP target against a real OpenLDAP slapd, through the whole pipeline (issue: real
//! downstream systems).

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::slapd::{Slapd, ADMIN_DN, ADMIN_PW};
use pwsync_tests::{wait_until, Cluster};
use std::time::Duration;

fn consumer_with_ldap(c: &mut Cluster, url: &str, extra: &str) -> usize {
    let pw_file = c.path().join("ldap-bind.pw");
    std::fs::write(&pw_file, format!("{ADMIN_PW}\n")).expect("bind pw");
    std::fs::set_permissions(
        &pw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let name = format!("k{}", c.consumers.len());
    c.add_consumer(
        &name,
        "g1",
        &format!(
            "[retry]\nbase_ms = 100\nmax_secs = 1\nno_such_user_secs = 2\n\n[targets.dir]\ntype = \"ldap\"\nsystem = \"ldap-main\"\nurl = \"{}\"\nbind_dn = \"{ADMIN_DN}\"\nbind_password_file = \"{}\"\n{extra}\n",
            url,
            pw_file.display()
        ),
    )
}

fn ok(r: Response) {
    assert!(
        matches!(r, Response::Accepted { durable: true, .. }),
        "{r:?}"
    );
}

#[test]
fn password_modify_exop_sets_passwords_the_server_hashes_and_accounts_lock_and_unlock() {
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("alice", "old-alice");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_ldap(
        &mut c,
        &slapd.url(),
        "dn_template = \"uid={user},ou=people,dc=example,dc=org\"",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);

    ok(c.submit(a, "alice", Op::Replace, Some("Ldap-New-1")));
    wait_until(
        Duration::from_secs(20),
        "alice to bind with the new password",
        || slapd.binds("alice", "Ldap-New-1"),
    );
    assert!(!slapd.binds("alice", "old-alice"));
    let stored = slapd.attr("alice", "userPassword");
    assert!(
        stored.len() == 1 && stored[0].starts_with("{SSHA}"),
        "the server's own hash: {stored:?}"
    );

    ok(c.submit(a, "alice", Op::Revoke, None));
    wait_until(Duration::from_secs(20), "alice to be locked", || {
        !slapd.binds("alice", "Ldap-New-1")
    });
    assert_eq!(
        slapd.attr("alice", "pwdAccountLockedTime"),
        vec!["000001010000Z".to_string()]
    );
    ok(c.submit(a, "alice", Op::Resume, None));
    wait_until(Duration::from_secs(20), "alice to be unlocked", || {
        slapd.binds("alice", "Ldap-New-1")
    });
    // Resuming an account that is not locked is fine (idempotent).
    ok(c.submit(a, "alice", Op::Resume, None));
    ok(c.submit(a, "alice", Op::Replace, Some("Ldap-New-2")));
    wait_until(Duration::from_secs(20), "the last password", || {
        slapd.binds("alice", "Ldap-New-2")
    });
    assert_eq!(
        c.consumer_status(k)["targets"]["dir"]["dead_lettered"].as_u64(),
        Some(0)
    );
    assert!(!c.all_logs().contains("Ldap-New"));
}

#[test]
fn ssha_mode_with_a_search_adds_and_deletes_values_and_a_missing_entry_becomes_a_dead_letter() {
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("bob", "old-bob");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_ldap(
        &mut c,
        &slapd.url(),
        "search_base = \"ou=people,dc=example,dc=org\"\nsearch_filter = \"(uid={user})\"\npassword_mode = \"ssha\"",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);

    ok(c.submit(a, "bob", Op::Replace, Some("Bob-One")));
    wait_until(Duration::from_secs(20), "bob's first password", || {
        slapd.binds("bob", "Bob-One")
    });
    ok(c.submit(a, "bob", Op::Add, Some("Bob-Two")));
    wait_until(Duration::from_secs(20), "bob's second value", || {
        slapd.binds("bob", "Bob-Two")
    });
    assert!(
        slapd.binds("bob", "Bob-One"),
        "add replaced instead of adding"
    );
    let stored = slapd.attr("bob", "userPassword");
    assert_eq!(stored.len(), 2);
    assert!(stored.iter().all(|v| v.starts_with("{SSHA}")), "{stored:?}");
    ok(c.submit(a, "bob", Op::Delete, Some("Bob-One")));
    wait_until(Duration::from_secs(20), "the first value deleted", || {
        !slapd.binds("bob", "Bob-One")
    });
    assert!(slapd.binds("bob", "Bob-Two"));

    // A user with no entry is retried for the no-such-user window (2 s here), then dead.
    ok(c.submit(a, "nobody-here", Op::Replace, Some("Ghost-Pw")));
    wait_until(Duration::from_secs(30), "a dead letter", || {
        c.consumer_status(k)["targets"]["dir"]["dead_lettered"].as_u64() == Some(1)
    });
    c.consumer(k).stop();
    let ls = c.tool(
        "pwsync-consumer",
        &[
            "--config",
            &c.consumers[k].config.display().to_string(),
            "deadletter",
            "ls",
        ],
    );
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    assert!(
        ls.contains("nobody-here") && ls.contains("no entry for nobody-here"),
        "{ls}"
    );
    assert!(!ls.contains("Ghost-Pw"));
}

#[test]
fn with_slapd_stopped_mid_stream_changes_wait_in_the_retry_queue_and_land_when_it_returns() {
    let Some(slapd) = Slapd::start() else { return };
    for u in 0..5 {
        slapd.add_user(&format!("u{u}"), "initial");
    }
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_ldap(
        &mut c,
        &slapd.url(),
        "dn_template = \"uid={user},ou=people,dc=example,dc=org\"",
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    ok(c.submit(a, "u0", Op::Replace, Some("before-stop")));
    wait_until(Duration::from_secs(20), "the first change", || {
        slapd.binds("u0", "before-stop")
    });

    slapd.stop();
    for u in 0..5 {
        ok(c.submit(
            a,
            &format!("u{u}"),
            Op::Replace,
            Some(&format!("during-outage-{u}")),
        ));
    }
    wait_until(
        Duration::from_secs(20),
        "five changes queued for retry",
        || c.consumer_status(k)["targets"]["dir"]["retry_depth"].as_u64() == Some(5),
    );
    // The journal offset moved on: the retry queue holds them durably.
    assert_eq!(c.consumer_status(k)["committed"].as_u64(), Some(6));

    slapd.restart();
    wait_until(
        Duration::from_secs(30),
        "every queued change applied",
        || (0..5).all(|u| slapd.binds(&format!("u{u}"), &format!("during-outage-{u}"))),
    );
    wait_until(Duration::from_secs(10), "the retry queue empty", || {
        c.consumer_status(k)["targets"]["dir"]["retry_depth"].as_u64() == Some(0)
    });
    assert_eq!(
        c.consumer_status(k)["targets"]["dir"]["dead_lettered"].as_u64(),
        Some(0)
    );
}

#[test]
fn crypt_mode_over_ldaps_verifies_the_server_against_the_configured_ca() {
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("carol", "old-carol");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = consumer_with_ldap(
        &mut c,
        &slapd.ldaps_url(),
        &format!(
            "dn_template = \"uid={{user}},ou=people,dc=example,dc=org\"\npassword_mode = \"crypt\"\nca_file = \"{}\"",
            slapd.ca_file().display()
        ),
    );
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);

    ok(c.submit(a, "carol", Op::Replace, Some("Crypt-One")));
    wait_until(Duration::from_secs(20), "carol's crypt password", || {
        slapd.binds("carol", "Crypt-One")
    });
    assert!(!slapd.binds("carol", "old-carol"));
    let stored = slapd.attr("carol", "userPassword");
    assert!(
        stored.len() == 1 && stored[0].starts_with("{CRYPT}$6$rounds=5000$"),
        "one SHA-512 crypt value computed by pwsync: {stored:?}"
    );
    // add then delete on the multi-valued attribute, with crypt values verified for delete.
    ok(c.submit(a, "carol", Op::Add, Some("Crypt-Two")));
    wait_until(Duration::from_secs(20), "carol's second value", || {
        slapd.attr("carol", "userPassword").len() == 2
    });
    assert!(slapd.binds("carol", "Crypt-One") && slapd.binds("carol", "Crypt-Two"));
    ok(c.submit(a, "carol", Op::Delete, Some("Crypt-One")));
    wait_until(Duration::from_secs(20), "the first value deleted", || {
        slapd.attr("carol", "userPassword").len() == 1
    });
    assert!(!slapd.binds("carol", "Crypt-One"));
    assert!(slapd.binds("carol", "Crypt-Two"));
    assert!(!c.all_logs().contains("Crypt-"));
}

#[test]
fn starttls_refuses_a_server_whose_certificate_another_ca_signed() {
    let Some(slapd) = Slapd::start() else { return };
    slapd.add_user("dave", "old-dave");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    // A CA that did not sign slapd's certificate.
    let stranger = c.path().join("stranger-ca.pem");
    let other = pwsync_relay::pki::Ca::generate("some other CA").expect("CA");
    std::fs::write(&stranger, &other.cert_pem).expect("stranger CA");
    let dn = "dn_template = \"uid={user},ou=people,dc=example,dc=org\"\nstarttls = true";
    let wrong = consumer_with_ldap(
        &mut c,
        &slapd.url(),
        &format!("{dn}\nca_file = \"{}\"", stranger.display()),
    );
    let check = |c: &Cluster, k: usize| {
        c.tool(
            "pwsync-consumer",
            &[
                "--config",
                &c.consumers[k].config.display().to_string(),
                "check",
            ],
        )
    };
    let refused = check(&c, wrong);
    let why = String::from_utf8_lossy(&refused.stderr).to_string();
    assert!(
        !refused.status.success(),
        "a server signed by another CA was trusted"
    );
    assert!(why.to_lowercase().contains("certificate"), "{why}");

    let right = consumer_with_ldap(
        &mut c,
        &slapd.url(),
        &format!("{dn}\nca_file = \"{}\"", slapd.ca_file().display()),
    );
    let accepted = check(&c, right);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    // And a change flows over StartTLS.
    c.start_relay();
    c.start_consumer(right);
    c.start_agent(a);
    ok(c.submit(a, "dave", Op::Replace, Some("Tls-Dave")));
    wait_until(
        Duration::from_secs(20),
        "dave's password over StartTLS",
        || slapd.binds("dave", "Tls-Dave"),
    );
}

/// The target's own login is known by the server's answer to "Who am I?", not by the text of
/// `bind_dn`: bound as `uid=svc,ou=people,…` spelled in other case and spacing, a change for
/// `svc` is refused in words and `svc` still logs in with its own password, while changes for
/// other people apply.
#[test]
fn the_own_login_in_another_spelling_is_never_changed() {
    use pwsync_consumer::targets::Outcome;
    use pwsync_proto::{Change, Secret};
    let Some(slapd) = Slapd::start_with(
        "access to attrs=userPassword by dn.exact=\"uid=svc,ou=people,dc=example,dc=org\" write by self write by anonymous auth by * none\n",
    ) else {
        return;
    };
    slapd.add_user("svc", "svc-own-pass");
    slapd.add_user("joan", "joan-init");
    let dir = tempfile::tempdir().expect("temp dir");
    let pw = dir.path().join("svc.pw");
    std::fs::write(&pw, "svc-own-pass\n").expect("pw");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    for (i, spelling) in [
        "UID=Svc, OU=People, DC=Example, DC=Org",
        // Each character of the value hex-escaped, as RFC 4514 allows.
        "uid=\\\\73\\\\76\\\\63,ou=people,dc=EXAMPLE,dc=org",
    ]
    .into_iter()
    .enumerate()
    {
        let section = format!(
            "type = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{spelling}\"\nbind_password_file = \"svc.pw\"\n\
             dn_template = \"uid={{user}},ou=people,dc=example,dc=org\"\npassword_mode = \"ssha\"\n",
            slapd.url()
        );
        let t = pwsync_consumer::targets::build(
            "dir",
            toml::from_str(&section).expect("section"),
            &dir.path().join("consumer.toml"),
        )
        .expect("builds");
        let set = |user: &str, pw: &str| {
            Change::new(user, "elsewhere", Op::Replace, vec![Secret::from(pw)])
        };
        let r = t.apply(&set("svc", "svc-changed"), "svc");
        assert!(
            matches!(&r, Outcome::Failed(m) if m.contains("its own login")),
            "{spelling}: {r:?}"
        );
        assert!(slapd.binds("svc", "svc-own-pass"), "{spelling}");
        let new = format!("joan-new-{i}");
        assert_eq!(
            t.apply(&set("joan", &new), "joan"),
            Outcome::Applied,
            "{spelling}"
        );
        assert!(slapd.binds("joan", &new), "{spelling}");
    }
}
