//! The PAM module with the real PAM library, `pamtester`, and the real pipeline (issue: PAM
//! module). Each test writes its own service file in /etc/pam.d (so it needs root, as CI has)
//! and removes it afterwards.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::pam::Service;
use pwsync_tests::{htpasswd_verifies, wait_until, Cluster, HT_TARGET};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn pamtester_chauthtok_reaches_a_target_through_the_pipeline_and_excluded_users_pass_through() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    let Some(service) = Service::new(&format!(
        "socket={} strict timeout=10",
        c.agents[a].socket.display()
    )) else {
        return;
    };
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let out = service.chauthtok("alice", "Pam-Secret-4711");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(
        Duration::from_secs(20),
        "alice's new password at the target",
        || htpasswd_verifies(&ht, "alice", "Pam-Secret-4711"),
    );

    // root is outside the agent's scope: the change passes through PAM, nothing is forwarded.
    let out = service.chauthtok("root", "Pam-Root-9");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    assert_eq!(c.status(a).ignored, 1, "the update was answered ignored");
    assert_eq!(c.status(a).accepted, 1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!std::fs::read_to_string(&ht)
        .unwrap_or_default()
        .contains("root:"));
    assert!(!c.all_logs().contains("Pam-Secret-4711"));
}

/// Collects what programs send to syslog, on a /dev/log socket of the test's own.
struct SyslogCapture {
    socket: std::os::unix::net::UnixDatagram,
}

impl SyslogCapture {
    fn new() -> SyslogCapture {
        assert!(
            !Path::new("/dev/log").exists(),
            "/dev/log belongs to a running syslog here; this test needs to read what the PAM module logs"
        );
        let socket = std::os::unix::net::UnixDatagram::bind("/dev/log").expect("bind /dev/log");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        SyslogCapture { socket }
    }

    fn drain(&self) -> String {
        let mut out = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            out += &String::from_utf8_lossy(&buf[..n]);
            out.push('\n');
        }
        out
    }
}

impl Drop for SyslogCapture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/dev/log");
    }
}

#[test]
fn with_the_agent_stopped_strict_refuses_with_the_message_and_lenient_goes_ahead_and_logs() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let socket = c.agents[a].socket.display().to_string();
    let Some(strict) = Service::new(&format!("socket={socket} strict timeout=2")) else {
        return;
    };
    let Some(lenient) = Service::new(&format!("socket={socket} lenient timeout=2")) else {
        return;
    };
    // The agent is not running.
    let out = strict.chauthtok("alice", "Pam-Strict-1");
    assert!(
        !out.status.success(),
        "strict mode let the change through: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("password synchronization is unavailable; try again later"),
        "{}",
        text(&out)
    );

    let syslog = SyslogCapture::new();
    let out = lenient.chauthtok("alice", "Pam-Lenient-2");
    assert!(out.status.success(), "lenient mode refused: {}", text(&out));
    let logged = syslog.drain();
    assert!(
        logged.contains("pam_pwsync: LENIENT: password changed locally but NOT synchronized"),
        "syslog got: {logged}"
    );
    assert!(!logged.contains("Pam-Lenient-2"));

    // Once the agent runs, strict mode goes through.
    drop(syslog);
    c.start_agent(a);
    let out = strict.chauthtok("alice", "Pam-Strict-3");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(c.status(a).spool_records, 1);
    assert!(matches!(
        c.submit(a, "bob", Op::Replace, Some("x")),
        Response::Accepted { .. }
    ));
}

#[test]
fn a_change_the_agent_rejects_tells_the_person_why_instead_of_unavailable() {
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let Some(strict) = Service::new(&format!(
        "socket={} strict timeout=10",
        c.agents[a].socket.display()
    )) else {
        return;
    };
    c.start_agent(a);
    // A user name over the agent's limit (256 bytes): not a valid change, whenever it is tried.
    let long_user = "u".repeat(300);
    let out = strict.chauthtok(&long_user, "Pam-Rejected-5");
    let said = text(&out);
    assert!(!out.status.success(), "strict mode let it through: {said}");
    assert!(
        said.contains("password change rejected: invalid change: user name must be 1 to 256 bytes"),
        "{said}"
    );
    assert!(
        !said.contains("unavailable; try again later"),
        "a rejection is not an outage: {said}"
    );
    assert_eq!(c.status(a).rejected, 1);
    assert_eq!(c.status(a).spool_records, 0);
    assert!(!c.all_logs().contains("Pam-Rejected-5"));
}

/// Backfill at login: after the module that authenticated the person (here `pam_exec` running
/// a password check of the test's own, as `pam_unix` would check /etc/shadow), a successful
/// login's password fills a target that had no value; a failed login fills nothing; the same
/// password again sends nothing; a login with an old password after a newer change changes
/// nothing anywhere.
#[test]
fn a_successful_pam_login_fills_a_target_and_a_failed_or_older_one_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let known = dir.path().join("known");
    std::fs::write(&known, "Nina-Login-pw-1").expect("known");
    let check = dir.path().join("check.sh");
    std::fs::write(
        &check,
        format!(
            "#!/bin/sh\n[ \"$(tr -d '\\000')\" = \"$(cat {})\" ]\n",
            known.display()
        ),
    )
    .expect("check.sh");
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("host-a", AgentOptions::default());
    let config = c.agents[a].config.clone();
    let text_cfg = std::fs::read_to_string(&config).expect("agent config");
    std::fs::write(&config, format!("backfill_interval_secs = 0\n{text_cfg}")).expect("config");
    let k = c.add_consumer("k", "g1", HT_TARGET);
    let Some(service) = Service::with_stack(&format!(
        "auth requisite pam_exec.so expose_authtok quiet {}\nauth optional {{module}} socket={} backfill\n",
        check.display(),
        c.agents[a].socket.display()
    )) else {
        return;
    };
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let ht = c.consumers[k].dir.join("htpasswd");

    let out = service.authenticate("nina", "Not-Ninas-pw");
    assert!(!out.status.success(), "pamtester: {}", text(&out));
    let out = service.authenticate("nina", "Nina-Login-pw-1");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    wait_until(
        Duration::from_secs(20),
        "nina's backfill at the target",
        || htpasswd_verifies(&ht, "nina", "Nina-Login-pw-1"),
    );
    let out = service.authenticate("nina", "Nina-Login-pw-1");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    assert_eq!(
        c.status(a).accepted,
        1,
        "only the first successful login was sent"
    );

    // nina's real change; then a login with her old password (a host it has not reached).
    assert!(matches!(
        c.submit(a, "nina", Op::Replace, Some("Nina-New-pw-2")),
        Response::Accepted { durable: true, .. }
    ));
    wait_until(
        Duration::from_secs(20),
        "nina's change at the target",
        || htpasswd_verifies(&ht, "nina", "Nina-New-pw-2"),
    );
    let out = service.authenticate("nina", "Nina-Login-pw-1");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    wait_until(
        Duration::from_secs(20),
        "the old password's backfill to be refused",
        || c.consumer_counter(k, "backfill_superseded") == 1,
    );
    assert!(htpasswd_verifies(&ht, "nina", "Nina-New-pw-2"));
    assert_eq!(c.consumer_counter(k, "backfill_applied"), 1);
    let logs = c.all_logs();
    for pw in ["Not-Ninas-pw", "Nina-Login-pw-1", "Nina-New-pw-2"] {
        assert!(!logs.contains(pw), "{pw} in a log");
    }
}
