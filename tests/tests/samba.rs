//! Active Directory as a source and a target, against a real Samba AD DC (issue 17): the
//! DC's changes captured by `pwsync-agent samba-sync` (samba-tool's syncpasswords loop calling
//! the agent as its hook) reach an htpasswd file and an OpenLDAP directory, checked by their own
//! logins; samba-tool and the agent stopped and started mid-stream lose nothing and apply
//! nothing twice; a change captured by PAM lands in AD (an LDAPS bind and `kinit`), and AD's
//! report of that same value back is dropped as an echo.
//!
//! One DC for the binary (provisioning takes seconds), its tests one at a time, each with its
//! own users, its own installation and its own syncpasswords cache. Everything runs inside the
//! DC's network namespace (`SambaDc::enter`).

use pwsync_consumer::targets::Configured;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::samba::{SambaDc, ADMIN_DN, ADMIN_PW, BASE_DN, LDAPS_URL};
use pwsync_tests::slapd::{Slapd, ADMIN_DN as LDAP_ADMIN_DN, ADMIN_PW as LDAP_ADMIN_PW, SUFFIX};
use pwsync_tests::{bin, htpasswd_verifies, wait_until, Cluster, Daemon};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// The DC, and a guard that runs this binary's tests one at a time; the calling thread is in the
/// DC's namespace afterwards.
fn dc() -> Option<(&'static SambaDc, MutexGuard<'static, ()>)> {
    static DC: OnceLock<Option<SambaDc>> = OnceLock::new();
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dc = DC.get_or_init(SambaDc::start).as_ref()?;
    dc.enter();
    Some((dc, guard))
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
}

/// One installation: a relay, the DC's agent (origin `ad`) with `samba-sync` beside it, a
/// Linux host's agent (origin `host1`), and a consumer with an htpasswd, an LDAP and an AD
/// target.
struct Site {
    c: Cluster,
    slapd: Slapd,
    dc_agent: usize,
    host_agent: usize,
    consumer: usize,
    sync: Option<Daemon>,
    sync_config: PathBuf,
}

impl Site {
    fn new(dc: &SambaDc) -> Site {
        Self::with_ad(dc, "reset")
    }

    /// [`Site::new`] with the AD target's `password_change`.
    fn with_ad(dc: &SambaDc, password_change: &str) -> Site {
        let slapd = Slapd::start().expect("slapd (installed with Samba by install-deps)");
        let mut c = Cluster::new(&["g1"], "");
        let dc_agent = c.add_agent("dc1", AgentOptions::default());
        let host_agent = c.add_agent("host1", AgentOptions::default());
        let a = &c.agents[dc_agent];
        let config = std::fs::read_to_string(&a.config).expect("agent config");
        let sync_config = a.config.clone();
        std::fs::write(
            &a.config,
            format!(
                "origin = \"ad\"\n{config}\n[samba]\nsmb_conf = {:?}\nstate_dir = \"samba\"\ngnupg_home = {:?}\n",
                dc.smb_conf(),
                dc.gnupg()
            ),
        )
        .expect("agent config");
        let root = c.path().to_path_buf();
        private_file(&root.join("ldap.pw"), LDAP_ADMIN_PW);
        private_file(&root.join("ad.pw"), ADMIN_PW);
        let targets = format!(
            "{}\n[targets.dir]\ntype = \"ldap\"\nsystem = \"ldap\"\nurl = \"{}\"\nbind_dn = \"{LDAP_ADMIN_DN}\"\n\
             bind_password_file = {:?}\ndn_template = \"uid={{user}},ou=people,{SUFFIX}\"\n\n\
             [targets.ad]\ntype = \"ad\"\nsystem = \"ad\"\nurl = \"{LDAPS_URL}\"\nca_file = {:?}\nbind_dn = \"{ADMIN_DN}\"\n\
             bind_password_file = {:?}\nsearch_base = \"{BASE_DN}\"\npassword_change = \"{password_change}\"\n",
            pwsync_tests::HT_TARGET,
            slapd.url(),
            root.join("ldap.pw"),
            dc.ca_file(),
            root.join("ad.pw"),
        );
        let consumer = c.add_consumer("k", "g1", &targets);
        c.start_relay();
        c.start_consumer(consumer);
        c.start_agent(dc_agent);
        c.start_agent(host_agent);
        Site {
            c,
            slapd,
            dc_agent,
            host_agent,
            consumer,
            sync: None,
            sync_config,
        }
    }

    fn htpasswd(&self) -> PathBuf {
        self.c.consumers[self.consumer].dir.join("htpasswd")
    }

    /// Starts `pwsync-agent samba-sync` and waits until its first pass has handed `seen` to
    /// the hook.
    fn start_sync(&mut self, seen: &str) {
        let log = self.c.path().join("samba-sync.log");
        let config = self.sync_config.display().to_string();
        self.sync = Some(Daemon::start(
            "samba-sync",
            bin("pwsync-agent"),
            &["--config", &config, "samba-sync"],
            log,
        ));
        wait_until(WAIT, &format!("the first pass to reach {seen}"), || {
            self.sync_log().contains(&format!("DONE-EXIT: {seen}"))
        });
    }

    fn sync_log(&self) -> String {
        self.sync.as_ref().map(|d| d.log_text()).unwrap_or_default()
    }

    /// The pid of the samba-tool the supervisor started last.
    fn samba_tool_pid(&self) -> i32 {
        self.sync_log()
            .lines()
            .rev()
            .find(|l| l.contains("samba-tool user syncpasswords started"))
            .and_then(|l| l.split("pid=").nth(1))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .expect("samba-tool's pid in the supervisor's log")
    }

    /// Lines of the consumer's log saying `target` applied a change for `user`.
    fn applied(&mut self, target: &str, user: &str) -> usize {
        self.c
            .consumer(self.consumer)
            .log_text()
            .lines()
            .filter(|l| {
                l.contains(" applied ")
                    && l.contains(&format!("target={target} "))
                    && l.contains(&format!("user={user} "))
            })
            .count()
    }

    fn logs(&self) -> String {
        self.c.all_logs() + &self.sync_log()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // SIGTERM: the supervisor stops its samba-tool too.
        if let Some(d) = self.sync.as_mut() {
            d.stop();
        }
    }
}

#[test]
fn admin_resets_user_changes_and_disable_enable_reach_htpasswd_and_ldap() {
    let Some((dc, _one)) = dc() else { return };
    let mut s = Site::new(dc);
    dc.create_user("carol", "Carol-Init-0");
    s.slapd.add_user("carol", "Carol-Ldap-0");
    s.start_sync("carol");
    // The first pass hands every account to the hook; a password set before pwsync watched the
    // DC is not a change, so nothing was forwarded for carol.
    assert!(!htpasswd_verifies(&s.htpasswd(), "carol", "Carol-Init-0"));
    assert!(s.slapd.binds("carol", "Carol-Ldap-0"));

    // An administrator's reset.
    dc.tool(&[
        "user",
        "setpassword",
        "carol",
        "--newpassword=Admin-Reset-1",
    ]);
    wait_until(WAIT, "the reset at htpasswd and LDAP", || {
        htpasswd_verifies(&s.htpasswd(), "carol", "Admin-Reset-1")
            && s.slapd.binds("carol", "Admin-Reset-1")
    });
    assert!(!s.slapd.binds("carol", "Carol-Ldap-0"));

    // The user's own change over LDAP (delete old, add new).
    let out = dc.user_changes_password("carol", "Admin-Reset-1", "User-Chose-2");
    assert!(out.status.success(), "user change: {out:?}");
    wait_until(WAIT, "the user's change at htpasswd and LDAP", || {
        htpasswd_verifies(&s.htpasswd(), "carol", "User-Chose-2")
            && s.slapd.binds("carol", "User-Chose-2")
    });
    assert!(!htpasswd_verifies(&s.htpasswd(), "carol", "Admin-Reset-1"));
    assert!(!s.slapd.binds("carol", "Admin-Reset-1"));

    // Disabled in AD: revoked on the other targets; enabled: resumed.
    dc.tool(&["user", "disable", "carol"]);
    wait_until(WAIT, "the revoke at htpasswd and LDAP", || {
        !htpasswd_verifies(&s.htpasswd(), "carol", "User-Chose-2")
            && !s.slapd.binds("carol", "User-Chose-2")
    });
    dc.tool(&["user", "enable", "carol"]);
    wait_until(WAIT, "the resume at htpasswd and LDAP", || {
        htpasswd_verifies(&s.htpasswd(), "carol", "User-Chose-2")
            && s.slapd.binds("carol", "User-Chose-2")
    });
    // Each change was applied once per target: the calls for a disable or an enable carry the
    // same password, which is not sent again.
    assert_eq!(
        s.applied("web", "carol"),
        4,
        "replace, replace, revoke, resume"
    );
    let logs = s.logs();
    for pw in ["Admin-Reset-1", "User-Chose-2", "Carol-Init-0"] {
        assert!(!logs.contains(pw), "a password in the logs");
    }
}

#[test]
fn samba_tool_killed_and_the_agent_down_lose_nothing_and_apply_nothing_twice() {
    let Some((dc, _one)) = dc() else { return };
    let mut s = Site::new(dc);
    let users: Vec<String> = (0..4).map(|i| format!("dave{i}")).collect();
    for u in &users {
        dc.create_user(u, "Dave-Init-0");
    }
    s.start_sync(&users[3]);

    // A burst of resets, and samba-tool killed in the middle of it: the supervisor starts it
    // again and it resumes from its cache.
    for u in &users {
        dc.tool(&["user", "setpassword", u, "--newpassword=First-Round-1"]);
    }
    let pid = s.samba_tool_pid();
    // SAFETY: signalling the samba-tool our supervisor started (its pid from the log).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_until(WAIT, "the first round everywhere", || {
        users
            .iter()
            .all(|u| htpasswd_verifies(&s.htpasswd(), u, "First-Round-1"))
    });
    assert_ne!(s.samba_tool_pid(), pid, "samba-tool was started again");

    // The agent down: the hook cannot hand the changes on, so samba-tool stops without
    // acknowledging them, and is started again until the agent is back.
    let accepted_before = s.c.status(s.dc_agent).accepted;
    s.c.agent(s.dc_agent).stop();
    for u in &users {
        dc.tool(&["user", "setpassword", u, "--newpassword=Second-Round-2"]);
    }
    wait_until(WAIT, "the hook to find the agent down", || {
        s.sync_log().contains("cannot reach the agent")
    });
    std::thread::sleep(Duration::from_secs(2));
    for u in &users {
        assert!(htpasswd_verifies(&s.htpasswd(), u, "First-Round-1"));
    }
    s.c.start_agent(s.dc_agent);
    wait_until(WAIT, "the second round everywhere", || {
        users
            .iter()
            .all(|u| htpasswd_verifies(&s.htpasswd(), u, "Second-Round-2"))
    });
    // One submit per real change: 4 in the first round (before the agent stopped), 4 after.
    assert_eq!(accepted_before, users.len() as u64);
    wait_until(WAIT, "the agent to count the second round", || {
        s.c.status(s.dc_agent).accepted == users.len() as u64
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(s.c.status(s.dc_agent).accepted, users.len() as u64);
    for u in &users {
        assert_eq!(s.applied("web", u), 2, "{u}: each round applied once");
    }
}

#[test]
fn a_change_captured_by_pam_lands_in_ad_and_its_echo_is_dropped() {
    let Some((dc, _one)) = dc() else { return };
    let mut s = Site::new(dc);
    dc.create_user("frank", "Frank-Init-0");
    s.slapd.add_user("frank", "Frank-Ldap-0");
    let Some(service) = pwsync_tests::pam::Service::new(&format!(
        "socket={} strict timeout=10",
        s.c.agents[s.host_agent].socket.display()
    )) else {
        return;
    };
    s.start_sync("frank");
    let out = service.chauthtok("frank", "Pam-Chose-3");
    assert!(out.status.success(), "pamtester: {out:?}");
    wait_until(WAIT, "the PAM change in AD", || {
        dc.binds("frank", b"Pam-Chose-3")
    });
    assert!(
        !dc.binds("frank", b"Frank-Init-0"),
        "the old password still binds"
    );
    assert!(
        dc.kinit("frank", "Pam-Chose-3"),
        "kinit with the new password"
    );
    assert!(
        !dc.kinit("frank", "Frank-Init-0"),
        "kinit with the old password"
    );
    // Samba's capture reports the value pwsync just set: forwarded by the DC's agent, and
    // dropped by the consumer as the echo it is.
    wait_until(WAIT, "AD's report of the new value to come back", || {
        s.c.consumer_counter(s.consumer, "echo") >= 1
    });
    assert_eq!(s.applied("ad", "frank"), 1);
    assert_eq!(s.applied("web", "frank"), 1);
    assert_eq!(s.applied("dir", "frank"), 1);
    assert!(s.slapd.binds("frank", "Pam-Chose-3"));
    assert!(!s.logs().contains("Pam-Chose-3"));
}

/// An `ad` target on the test DC at `url` (verified against the DC's CA), bound as its
/// Administrator, with `extra` keys; built beside `dir`.
fn ad_target(dc: &SambaDc, dir: &Path, url: &str, extra: &str) -> Configured {
    private_file(&dir.join("ad.pw"), ADMIN_PW);
    let section = format!(
        "type = \"ad\"\nsystem = \"ad\"\nurl = \"{url}\"\nca_file = {:?}\nbind_dn = \"{ADMIN_DN}\"\n\
         bind_password_file = \"ad.pw\"\nsearch_base = \"{BASE_DN}\"\n{extra}",
        dc.ca_file()
    );
    pwsync_consumer::targets::build(
        "ad",
        toml::from_str(&section).expect("section"),
        &dir.join("consumer.toml"),
    )
    .expect("the ad target builds")
}

/// The `ad` target alone, on what the conformance suite does not reach: AD's own refusals are
/// dead letters in words; revoke and resume change the ACCOUNTDISABLE bit and nothing else;
/// `remove = "delete"` deletes the object, once.
#[test]
fn ad_target_refusals_in_words_and_only_the_disable_bit_changes() {
    use pwsync_consumer::targets::{self, Outcome};
    use pwsync_proto::{Change, Op, Secret};
    let Some((dc, _one)) = dc() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let build = |extra: &str| ad_target(dc, dir.path(), LDAPS_URL, extra);
    let t = build("");
    let change = |op: Op, pw: Option<&str>| {
        Change::new(
            "gina",
            "elsewhere",
            op,
            pw.map(|p| vec![Secret::new(p.as_bytes().to_vec())])
                .unwrap_or_default(),
        )
    };
    dc.create_user("gina", "Gina-Init-0");
    // The domain's policy wants 7 characters at least.
    let r = t.apply(&change(Op::Replace, Some("short")), "gina");
    assert!(
        matches!(&r, Outcome::Failed(m) if m.contains("constraintViolation") && m.contains("password policy")),
        "{r:?}"
    );
    assert!(
        dc.binds("gina", b"Gina-Init-0"),
        "a refused change changed nothing"
    );
    // A delete cannot be applied to AD's one password: refused, in words.
    let r = t.apply(&change(Op::Delete, Some("Gina-Init-0")), "gina");
    assert!(
        matches!(&r, Outcome::Failed(m) if m.contains("one password")),
        "{r:?}"
    );

    // Revoke and resume flip ACCOUNTDISABLE and keep every other bit (here DONT_EXPIRE_PASSWD).
    dc.tool(&["user", "setexpiry", "gina", "--noexpiry"]);
    let before = dc.account_control("gina");
    assert_eq!(before & 0x10000, 0x10000, "{before:#x}");
    assert_eq!(t.apply(&change(Op::Revoke, None), "gina"), Outcome::Applied);
    assert_eq!(dc.account_control("gina"), before | 0x2);
    assert!(!dc.binds("gina", b"Gina-Init-0"));
    assert_eq!(
        t.apply(&change(Op::Revoke, None), "gina"),
        Outcome::Applied,
        "again: no change"
    );
    assert_eq!(t.apply(&change(Op::Resume, None), "gina"), Outcome::Applied);
    assert_eq!(dc.account_control("gina"), before);
    assert!(dc.binds("gina", b"Gina-Init-0"));

    // remove: disabled by default; deleted where configured, and deleting again is done.
    assert_eq!(t.apply(&change(Op::Remove, None), "gina"), Outcome::Applied);
    assert_eq!(dc.account_control("gina"), before | 0x2);
    let deleting = build("remove = \"delete\"\n");
    assert_eq!(
        deleting.apply(&change(Op::Remove, None), "gina"),
        Outcome::Applied
    );
    assert!(matches!(
        t.apply(&change(Op::Resume, None), "gina"),
        Outcome::NoSuchUser(_)
    ));
    assert_eq!(
        deleting.apply(&change(Op::Remove, None), "gina"),
        Outcome::Applied
    );

    // StartTLS on the plain port does as well as LDAPS.
    dc.create_user("gina2", "Gina-Init-0");
    let starttls = ad_target(dc, dir.path(), "ldap://127.0.0.1", "starttls = true\n");
    let two = Change::new(
        "gina2",
        "elsewhere",
        Op::Replace,
        vec![Secret::from("Over-StartTLS-1")],
    );
    assert_eq!(starttls.apply(&two, "gina2"), Outcome::Applied);
    assert!(dc.binds("gina2", b"Over-StartTLS-1"));

    // A plain ldap:// URL is refused at configuration: AD sets passwords only encrypted.
    let section = format!(
        "type = \"ad\"\nsystem = \"ad\"\nurl = \"ldap://127.0.0.1\"\nbind_dn = \"{ADMIN_DN}\"\n\
         bind_password_file = \"ad.pw\"\nsearch_base = \"{BASE_DN}\"\n"
    );
    let err = targets::build(
        "ad",
        toml::from_str(&section).expect("section"),
        &dir.path().join("consumer.toml"),
    )
    .err()
    .expect("refused");
    assert!(err.contains("encrypted"), "{err}");
}

/// The user-change form: AD checks the previous password and applies its history, which a reset
/// does not; a change without a previous password is refused in words. Through the pipeline:
/// `pwsync-agent submit --previous` on a Linux host lands in AD as the person's own change.
#[test]
fn the_user_change_form_applies_the_domains_history_and_needs_the_previous_password() {
    use pwsync_consumer::targets::Outcome;
    use pwsync_proto::{Change, Op, Secret};
    let Some((dc, _one)) = dc() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let build = |form: &str| {
        ad_target(
            dc,
            dir.path(),
            LDAPS_URL,
            &format!("password_change = \"{form}\"\n"),
        )
    };
    let (user_form, reset) = (build("user"), build("reset"));
    let change = |new: &str, previous: Option<&str>| Change {
        previous: previous.map(Secret::from),
        ..Change::new("hank", "elsewhere", Op::Replace, vec![Secret::from(new)])
    };
    dc.create_user("hank", "Hank-Init-0");
    dc.tool(&["domain", "passwordsettings", "set", "--history-length=3"]);
    let r1 = user_form.apply(&change("Hank-Second-1", Some("Hank-Init-0")), "hank");
    // Delivered again (at least once): done, not a dead letter.
    let again = user_form.apply(&change("Hank-Second-1", Some("Hank-Init-0")), "hank");
    // Back to a password in the history: refused as the person's own change...
    let r2 = user_form.apply(&change("Hank-Init-0", Some("Hank-Second-1")), "hank");
    let still = dc.binds("hank", b"Hank-Second-1");
    // ... and with a previous password that is not the account's.
    let r3 = user_form.apply(&change("Hank-Third-3", Some("Not-His-9")), "hank");
    // A reset ignores the history.
    let r4 = reset.apply(&change("Hank-Init-0", None), "hank");
    let r5 = user_form.apply(&change("Hank-Fourth-4", None), "hank");
    dc.tool(&["domain", "passwordsettings", "set", "--history-length=0"]);
    assert_eq!(r1, Outcome::Applied);
    assert_eq!(again, Outcome::Applied);
    assert!(
        matches!(&r2, Outcome::Failed(m) if m.contains("password policy")),
        "{r2:?}"
    );
    assert!(still, "a refused change changed nothing");
    assert!(matches!(&r3, Outcome::Failed(_)), "{r3:?}");
    assert_eq!(r4, Outcome::Applied);
    assert!(dc.binds("hank", b"Hank-Init-0"));
    assert!(
        matches!(&r5, Outcome::Failed(m) if m.contains("no previous password")),
        "{r5:?}"
    );

    // End to end: the person's own change, with the password it replaces, from a Linux host.
    let mut s = Site::with_ad(dc, "user");
    dc.create_user("ivy", "Ivy-Init-0");
    let out = s.c.submit_cli_with(
        s.host_agent,
        "ivy",
        &["--previous"],
        "Ivy-Init-0\nIvy-Chose-1",
    );
    assert!(out.status.success(), "submit --previous: {out:?}");
    wait_until(WAIT, "ivy's own change in AD", || {
        dc.binds("ivy", b"Ivy-Chose-1")
    });
    assert!(!dc.binds("ivy", b"Ivy-Init-0"));
    assert_eq!(s.applied("ad", "ivy"), 1);
    assert!(!s.logs().contains("Ivy-Init-0") && !s.logs().contains("Ivy-Chose-1"));
}

/// The person's own change through a real pam_unix stack (run as the person, as `passwd` is:
/// pam_unix asks for the current password, which PAM hands on as PAM_OLDAUTHTOK) reaches an
/// `ad` target in its user-change form, which needs that previous password.
#[test]
fn a_persons_own_change_through_pam_unix_reaches_ad_in_the_user_change_form() {
    let Some((dc, _one)) = dc() else { return };
    if !pwsync_tests::process::root_or_skip("a test with a Unix account") {
        return;
    }
    let s = Site::with_ad(dc, "user");
    let user = format!("june{}", std::process::id() % 10_000);
    dc.create_user(&user, "June-Init-0");
    s.slapd.add_user(&user, "June-Ldap-0");
    struct UnixUser(String);
    impl Drop for UnixUser {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg(&self.0).output();
        }
    }
    let out = std::process::Command::new("useradd")
        .args(["-M", "-s", "/usr/sbin/nologin", &user])
        .output()
        .expect("useradd");
    assert!(out.status.success(), "useradd: {out:?}");
    let _account = UnixUser(user.clone());
    let feed = |cmd: &mut std::process::Command, input: &str| {
        pwsync_tests::process::run_with_input(cmd, input.as_bytes())
    };
    let out = feed(
        &mut std::process::Command::new("chpasswd"),
        &format!("{user}:June-Init-0\n"),
    );
    assert!(out.status.success(), "chpasswd: {out:?}");
    let socket = s.c.agents[s.host_agent].socket.display().to_string();
    let Some(service) = pwsync_tests::pam::Service::with_stack(&format!(
        "password requisite {{module}} socket={socket} check\n\
         password [success=1 default=ignore] pam_unix.so yescrypt use_authtok\n\
         password requisite pam_deny.so\n\
         password required pam_permit.so\n\
         password required {{module}} socket={socket}\n"
    )) else {
        return;
    };
    let uid = pwsync_agent::unix_users::user_id(&user).expect("uid");
    let out = feed(
        std::process::Command::new("setpriv").args([
            &format!("--ruid={uid}"),
            "pamtester",
            &service.name,
            &user,
            "chauthtok",
        ]),
        "June-Init-0\nJune-Chose-1\nJune-Chose-1\n",
    );
    assert!(out.status.success(), "pamtester as {user}: {out:?}");
    let applied = pwsync_tests::process::wait_for(WAIT, || dc.binds(&user, b"June-Chose-1"));
    assert!(
        applied,
        "not applied in AD; the consumer's log:\n{}",
        s.c.all_logs()
    );
    assert!(!dc.binds(&user, b"June-Init-0"));
    assert!(
        dc.kinit(&user, "June-Chose-1"),
        "kinit with the new password"
    );
    assert!(!s.logs().contains("June-Init-0") && !s.logs().contains("June-Chose-1"));
}

/// One attribute of the entry `filter` finds in the domain, as `ldapsearch` prints it.
fn attribute(dc: &SambaDc, filter: &str, attr: &str) -> String {
    let out = dc.ldap_tool(
        "ldapsearch",
        ADMIN_DN,
        ADMIN_PW.as_bytes(),
        &["-LLL", "-b", BASE_DN, filter, attr],
        "",
    );
    let prefix = format!("{attr}: ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("{attr} of {filter}: {out:?}"))
}

/// Whether `principal` gets a ticket with its key from `keytab` (its own login).
fn kinit_keytab(dc: &SambaDc, keytab: &Path, principal: &str) -> bool {
    std::process::Command::new("kinit")
        .args(["-k", "-t"])
        .arg(keytab)
        .arg(principal)
        .env("KRB5_CONFIG", dc.krb5_conf())
        .env(
            "KRB5CCNAME",
            format!("FILE:{}/cc-kt-{}", dc.path().display(), std::process::id()),
        )
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Only people's accounts: a computer account (the DC's own), a managed service account and
/// `krbtgt` (even taken out of `protect`) are refused in words and keep their passwords (the
/// DC's keytab still logs in, `pwdLastSet` unchanged). The consumer's own login, configured
/// as a UPN, as `DOMAIN\user` and as a DN in other case, is refused for what it is; under each
/// spelling the target still sets other people's passwords.
#[test]
fn only_peoples_accounts_and_never_its_own_login() {
    use pwsync_consumer::targets::Outcome;
    use pwsync_proto::{Change, Op, Secret};
    let Some((dc, _one)) = dc() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let reset =
        |user: &str, pw: &str| Change::new(user, "elsewhere", Op::Replace, vec![Secret::from(pw)]);
    let keytab = dir.path().join("dc1.keytab");
    let out = std::process::Command::new("samba-tool")
        .args(["domain", "exportkeytab"])
        .arg(&keytab)
        .arg("--principal=DC1$")
        .arg("-s")
        .arg(dc.smb_conf())
        .output()
        .expect("samba-tool");
    assert!(out.status.success(), "exporting the DC's keytab: {out:?}");
    assert!(
        kinit_keytab(dc, &keytab, "DC1$@SAMDOM.TEST"),
        "the DC's keytab logs in to begin with"
    );
    let msa = "CN=svcmsa,CN=Managed Service Accounts,DC=samdom,DC=test";
    let out = dc.ldap_tool(
        "ldapadd",
        ADMIN_DN,
        ADMIN_PW.as_bytes(),
        &[],
        &format!(
            "dn: {msa}\nobjectClass: msDS-ManagedServiceAccount\nsAMAccountName: svcmsa$\nuserAccountControl: 4096\nunicodePwd:: {}\n",
            pwsync_tests::samba::unicode_pwd_b64("Msa-Init-Pass-0")
        ),
    );
    assert!(out.status.success(), "creating the MSA: {out:?}");

    let t = ad_target(dc, dir.path(), LDAPS_URL, "protect = []\n");
    for (account, words) in [
        ("DC1$", "computer account"),
        ("svcmsa$", "managed service account"),
        ("krbtgt", "krbtgt account"),
    ] {
        let filter = format!("(sAMAccountName={account})");
        let before = attribute(dc, &filter, "pwdLastSet");
        let control = attribute(dc, &filter, "userAccountControl");
        let r = t.apply(&reset(account, "Not-For-Machines-1"), account);
        assert!(
            matches!(&r, Outcome::Failed(m) if m.contains(words) && m.contains("only people's accounts")),
            "{account}: {r:?}"
        );
        assert!(matches!(
            t.apply(
                &Change::new(account, "elsewhere", Op::Revoke, vec![]),
                account
            ),
            Outcome::Failed(_)
        ));
        assert_eq!(attribute(dc, &filter, "pwdLastSet"), before, "{account}");
        assert_eq!(
            attribute(dc, &filter, "userAccountControl"),
            control,
            "{account}"
        );
    }
    assert!(
        kinit_keytab(dc, &keytab, "DC1$@SAMDOM.TEST"),
        "the DC's keytab still logs in"
    );
    assert!(
        dc.binds_dn(msa, b"Msa-Init-Pass-0"),
        "the MSA keeps its password"
    );

    // The consumer's own login, under three spellings AD takes for one account.
    dc.create_user("svc2", "Svc2-Own-Pass-0");
    dc.tool(&["group", "addmembers", "Domain Admins", "svc2"]);
    dc.create_user("hale", "Hale-Init-0");
    for (i, spelling) in [
        "svc2@samdom.test",
        "SAMDOM\\\\svc2",
        "cn=SVC2,cn=users,DC=SAMDOM,dc=test",
    ]
    .into_iter()
    .enumerate()
    {
        private_file(&dir.path().join("svc2.pw"), "Svc2-Own-Pass-0");
        let section = format!(
            "type = \"ad\"\nsystem = \"ad\"\nurl = \"{LDAPS_URL}\"\nca_file = {:?}\nbind_dn = \"{spelling}\"\n\
             bind_password_file = \"svc2.pw\"\nsearch_base = \"{BASE_DN}\"\n",
            dc.ca_file()
        );
        let t = pwsync_consumer::targets::build(
            "ad",
            toml::from_str(&section).expect("section"),
            &dir.path().join("consumer.toml"),
        )
        .expect("builds");
        let r = t.apply(&reset("svc2", "Svc2-Changed-1"), "svc2");
        assert!(
            matches!(&r, Outcome::Failed(m) if m.contains("its own login") && m.contains("binds as")),
            "{spelling}: {r:?}"
        );
        assert!(
            dc.binds("svc2", b"Svc2-Own-Pass-0"),
            "{spelling}: the login is untouched"
        );
        let pw = format!("Hale-New-{i}-x");
        assert_eq!(
            t.apply(&reset("hale", &pw), "hale"),
            Outcome::Applied,
            "{spelling}"
        );
        assert!(dc.binds("hale", pw.as_bytes()), "{spelling}");
    }
}

/// AD counts a password in UTF-16 code units: 256 of them (the default limit) bind whole, a
/// 133-character accented passphrase of over 256 bytes binds, one unit past the limit is
/// refused naming it; with a higher `max_password_length` (Samba takes longer ones), 300
/// characters bind whole.
#[test]
fn ad_passwords_are_measured_in_utf16_code_units() {
    use pwsync_consumer::targets::Outcome;
    use pwsync_proto::{Change, Op, Secret};
    let Some((dc, _one)) = dc() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let reset = |pw: &str| Change::new("iris", "elsewhere", Op::Replace, vec![Secret::from(pw)]);
    dc.create_user("iris", "Iris-Init-0");
    let t = ad_target(dc, dir.path(), LDAPS_URL, "");
    let at_limit = "Aa1-".repeat(64);
    assert_eq!(t.apply(&reset(&at_limit), "iris"), Outcome::Applied);
    assert!(dc.binds("iris", at_limit.as_bytes()));
    // Whole: a login with one character less is refused.
    assert!(!dc.binds("iris", &at_limit.as_bytes()[..255]));
    let accented = format!("{}Zz9", "é".repeat(130));
    assert!(accented.len() > 256 && accented.chars().count() == 133);
    assert_eq!(t.apply(&reset(&accented), "iris"), Outcome::Applied);
    assert!(dc.binds("iris", accented.as_bytes()));
    let past = format!("{at_limit}x");
    let r = t.apply(&reset(&past), "iris");
    assert!(
        matches!(&r, Outcome::Failed(m) if m.contains("257 UTF-16 code units") && m.contains("at most 256 UTF-16 code units")),
        "{r:?}"
    );
    assert!(
        dc.binds("iris", accented.as_bytes()),
        "the refused one changed nothing"
    );
    // An emoji is two units.
    let emoji = format!("{}\u{1F600}", "Aa1-".repeat(63)) + "Aa1";
    assert_eq!(emoji.chars().count(), 256);
    assert!(
        matches!(t.apply(&reset(&emoji), "iris"), Outcome::Failed(m) if m.contains("257 UTF-16"))
    );
    let long = ad_target(dc, dir.path(), LDAPS_URL, "max_password_length = 400\n");
    let three_hundred = "Aa1-".repeat(75);
    assert_eq!(long.apply(&reset(&three_hundred), "iris"), Outcome::Applied);
    assert!(dc.binds("iris", three_hundred.as_bytes()));
    assert!(!dc.binds("iris", &three_hundred.as_bytes()[..256]));
}

/// Puts the domain's password settings back as the fixture provisions them (complexity off, a
/// minimum of 7, no fine-grained policy) when a test that changed them ends (passed or not), for
/// the tests after it.
struct DomainSettings<'a>(&'a SambaDc);

impl Drop for DomainSettings<'_> {
    fn drop(&mut self) {
        self.0.tool(&[
            "domain",
            "passwordsettings",
            "set",
            "--complexity=off",
            "--min-pwd-length=7",
        ]);
        let _ = std::process::Command::new("samba-tool")
            .args([
                "domain",
                "passwordsettings",
                "pso",
                "delete",
                "strict",
                "-s",
            ])
            .arg(self.0.smb_conf())
            .output();
    }
}

/// The domain's own rules reach agents as the `ad` target's: with complexity off and a minimum
/// of 12, exactly those (a 12-character password of one class passes, 11 characters are
/// refused, naming the domain); a user under a fine-grained policy of 16 gets its minimum and
/// not the domain's; a change of the domain's minimum while everything runs reaches agents
/// at the next read (`[policy] refresh_secs`).
#[test]
fn the_domains_own_password_rules_reach_agents() {
    use pwsync_agent_api::{Request, Response};
    use pwsync_proto::Secret;
    let Some((dc, _one)) = dc() else { return };
    let _restore = DomainSettings(dc);
    dc.tool(&[
        "domain",
        "passwordsettings",
        "set",
        "--complexity=off",
        "--min-pwd-length=12",
    ]);
    dc.create_user("pia", "Pia-Init-Pass-0-long");
    dc.tool(&[
        "domain",
        "passwordsettings",
        "pso",
        "create",
        "strict",
        "1",
        "--min-pwd-length=16",
        "--complexity=off",
    ]);
    dc.tool(&[
        "domain",
        "passwordsettings",
        "pso",
        "apply",
        "strict",
        "pia",
    ]);

    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host1", AgentOptions::default());
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
    let root = c.path().to_path_buf();
    private_file(&root.join("ad.pw"), ADMIN_PW);
    let k = c.add_consumer(
        "k",
        "g1",
        &format!(
            "[policy]\nrefresh_secs = 1\n\n[targets.ad]\ntype = \"ad\"\nsystem = \"ad\"\nurl = \"{LDAPS_URL}\"\nca_file = {:?}\n\
             bind_dn = \"{ADMIN_DN}\"\nbind_password_file = {:?}\nsearch_base = \"{BASE_DN}\"\n",
            dc.ca_file(),
            root.join("ad.pw")
        ),
    );
    c.start_relay();
    c.start_consumer(k);
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
    let refused = |user: &str, pw: &str| match check(user, pw) {
        Response::Rejected { reason } => reason,
        other => format!("not refused: {other:?}"),
    };
    wait_until(WAIT, "the domain's policy at the agent", || {
        refused("ann", "elevenchars").contains("at least 12 characters")
    });
    assert!(
        refused("ann", "elevenchars").contains("the password policy of domain samdom.test"),
        "{}",
        refused("ann", "elevenchars")
    );
    // Complexity is off: one class is enough.
    assert_eq!(check("ann", "twelvechars!"), Response::Ready);
    assert_eq!(check("ann", "all lower case"), Response::Ready);
    // Pia's resultant policy is the PSO's: 16, and the domain's 12 does not bind her.
    let r = refused("pia", "fifteen-chars-x");
    assert!(
        r.contains("at least 16 characters") && r.contains("fine-grained password policy strict"),
        "{r}"
    );
    assert!(
        refused("PIA", "fifteen-chars-x").contains("at least 16"),
        "names fold"
    );
    assert_eq!(check("pia", "sixteen-chars-xx"), Response::Ready);
    let out = std::process::Command::new(pwsync_tests::bin("pwsync-agent"))
        .args([
            "--config",
            &c.agents[a].config.display().to_string(),
            "policy",
        ])
        .output()
        .expect("pwsync-agent policy");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("at least 12 characters for all but pia")
            && shown.contains("from ad: the password policy of domain samdom.test")
            && shown.contains("at least 16 characters for pia")
            && !shown.contains("4 character classes"),
        "{shown}"
    );
    // The domain's minimum raised while everything runs: the next read publishes it.
    dc.tool(&["domain", "passwordsettings", "set", "--min-pwd-length=14"]);
    wait_until(WAIT, "the raised minimum at the agent", || {
        refused("ann", "thirteen-char").contains("at least 14 characters")
    });
}
