//! The README's first command: `pwsync-relay quickstart` (issue: the two README commands).

use pwsync_tests::pam::PrivateEtc;
use pwsync_tests::{bin, wait_until};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `pwsync-agent --config CONFIG ARGS` with `password` on stdin: whether it succeeded, and
/// what it said.
fn agent(config: &Path, args: &[&str], password: &str) -> (bool, String) {
    let mut child = Command::new(bin("pwsync-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pwsync-agent");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("pwsync-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn quickstart_sets_up_runs_and_a_submitted_change_verifies_with_htpasswd() {
    let dir = tempfile::tempdir().expect("temp dir");
    let qs = dir.path().join("qs");
    let setup = Command::new(bin("pwsync-relay"))
        .args([
            "quickstart",
            "--dir",
            &qs.display().to_string(),
            "--no-start",
        ])
        .output()
        .expect("quickstart --no-start");
    assert!(
        setup.status.success(),
        "{}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let said = String::from_utf8_lossy(&setup.stdout).to_string();
    assert!(
        said.contains("pwsync-agent submit --config") && said.contains("htpasswd -vb"),
        "{said}"
    );
    for key in [
        "keys/relay.key",
        "keys/agent.key",
        "keys/consumer.key",
        "keys/group.key",
        "keys/agent-mqtt.pw",
        "keys/consumer-mqtt.pw",
        "tls/ca.key",
        "tls/relay.key",
        "credentials.toml",
    ] {
        let mode = std::fs::metadata(qs.join(key)).expect("key").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{key}"
        );
    }
    // Running it again reuses what is there.
    let before = std::fs::read(qs.join("keys/relay.key")).expect("key");
    let toml_before = std::fs::read_to_string(qs.join("relay.toml")).expect("toml");
    let again = Command::new(bin("pwsync-relay"))
        .args([
            "quickstart",
            "--dir",
            &qs.display().to_string(),
            "--no-start",
        ])
        .output()
        .expect("again");
    assert!(again.status.success());
    assert_eq!(
        std::fs::read(qs.join("keys/relay.key")).expect("key"),
        before
    );
    assert_eq!(
        std::fs::read_to_string(qs.join("relay.toml")).expect("toml"),
        toml_before
    );
    // Each config is valid for its program.
    for (program, config) in [
        ("pwsync-relay", "relay.toml"),
        ("pwsync-agent", "agent.toml"),
        ("pwsync-consumer", "consumer.toml"),
    ] {
        let check = Command::new(bin(program))
            .args(["--config", &qs.join(config).display().to_string(), "check"])
            .output()
            .expect("check");
        assert!(
            check.status.success(),
            "{program} check: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(
            !String::from_utf8_lossy(&check.stderr).contains("warning"),
            "{program} check: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // The agent's config has the group's policy on; without it, `check` warns, naming the
    // section.
    let agent_text = std::fs::read_to_string(qs.join("agent.toml")).expect("agent.toml");
    let (with, _) = agent_text
        .split_once("[policy]")
        .expect("a [policy] section");
    let unchecked = qs.join("agent-without-policy.toml");
    std::fs::write(&unchecked, with).expect("write");
    let check = Command::new(bin("pwsync-agent"))
        .args(["--config", &unchecked.display().to_string(), "check"])
        .output()
        .expect("check");
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && said.contains("warning: no [policy] groups"),
        "{said}"
    );
    std::fs::remove_file(&unchecked).expect("rm");

    let log = std::fs::File::create(dir.path().join("quickstart.log")).expect("log");
    let mut daemons = Command::new(bin("pwsync-relay"))
        .args(["quickstart", "--dir", &qs.display().to_string()])
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("quickstart");
    // A failed assertion must not leave the three daemons running: Ctrl-C them on the way out.
    struct Interrupt(u32);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            // SAFETY: signalling our own child by pid, not yet reaped (forgotten once it is).
            unsafe { libc::kill(self.0 as i32, libc::SIGINT) };
        }
    }
    let interrupt = Interrupt(daemons.id());
    let socket = qs.join("agent.sock");
    wait_until(Duration::from_secs(30), "the agent's socket", || {
        socket.exists()
    });
    let agent_toml = qs.join("agent.toml");
    // The quickstart's agent enforces the consumer group's policy: once it has arrived, a
    // password the htpasswd target's bcrypt cannot hold is refused at submit, with the reason.
    wait_until(
        Duration::from_secs(30),
        "the group's policy at the agent",
        || {
            agent(
                &agent_toml,
                &["check-password", "--user", "alice"],
                "Qs-Test-Pw-7781",
            )
            .0
        },
    );
    let too_long = "Qs-Too-Long-".repeat(7); // 84 bytes
    let (ok, said) = agent(&agent_toml, &["submit", "--user", "alice"], &too_long);
    assert!(!ok, "a password bcrypt cannot hold was taken: {said}");
    assert!(
        said.contains("at most 71 bytes") && said.contains("bcrypt"),
        "the reason: {said}"
    );
    let (ok, said) = agent(
        &agent_toml,
        &["submit", "--user", "alice"],
        "Qs-Test-Pw-7781",
    );
    assert!(ok, "{said}");
    let ht = qs.join("htpasswd");
    wait_until(
        Duration::from_secs(10),
        "alice's password in the htpasswd file",
        || pwsync_tests::htpasswd_verifies(&ht, "alice", "Qs-Test-Pw-7781"),
    );

    // Through the documented PAM stack (deploy/pam.d/debian-common-password, with the real
    // pam_unix, over a copy of /etc): the too-long password is refused before pam_unix sets
    // anything; a good one is set locally and reaches the target.
    if let Some(etc) = PrivateEtc::new() {
        etc.add_user("qsuser", 61_001);
        let documented = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pam.d/debian-common-password"),
        )
        .expect("the documented stack");
        let stack = documented
            .replace("/run/pwsync/agent.sock", &socket.display().to_string())
            .replace(
                "pam_pwsync.so",
                &bin("libpam_pwsync.so").display().to_string(),
            );
        std::fs::write(etc.file("pam.d/pwsync-quickstart"), stack).expect("the service");
        let before = etc.shadow_line("qsuser");
        let out = etc.chauthtok("pwsync-quickstart", "qsuser", &too_long);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "pamtester: {text}");
        assert!(
            text.contains("at most 71 bytes") && text.contains("bcrypt"),
            "the reason: {text}"
        );
        assert_eq!(
            etc.shadow_line("qsuser"),
            before,
            "the local password moved"
        );
        let out = etc.chauthtok("pwsync-quickstart", "qsuser", "Qs-Pam-Pw-5512");
        assert!(
            out.status.success(),
            "pamtester: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_ne!(etc.shadow_line("qsuser"), before, "pam_unix set nothing");
        wait_until(
            Duration::from_secs(10),
            "qsuser's PAM change in the htpasswd file",
            || pwsync_tests::htpasswd_verifies(&ht, "qsuser", "Qs-Pam-Pw-5512"),
        );
    }
    // Ctrl-C stops all three.
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(daemons.id() as i32, libc::SIGINT) };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while daemons.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "quickstart did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::mem::forget(interrupt);
    let log = std::fs::read_to_string(dir.path().join("quickstart.log")).expect("log");
    for name in ["[relay   ]", "[agent   ]", "[consumer]"] {
        assert!(log.contains(name), "no {name} lines:\n{log}");
    }
    for pw in ["Qs-Test-Pw-7781", &too_long, "Qs-Pam-Pw-5512"] {
        assert!(!log.contains(pw), "a password reached a log");
    }
    // Secure by default: TLS with logins, no plaintext warning anywhere.
    assert!(
        log.contains("MQTT gateway listening") && log.contains("tls=true"),
        "{log}"
    );
    assert!(log.contains("MQTT over TLS"), "{log}");
    assert!(!log.contains("insecure_plaintext"), "{log}");
    // rumqttd may log a connection race at ERROR while everything shuts down; pwsync's own
    // components must log no error in a clean run.
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") && !l.contains("incoming{") && !l.contains("remote_link"))
        .collect();
    assert!(
        errors.is_empty(),
        "errors in a clean run:\n{}",
        errors.join("\n")
    );
}

/// Issue 32: `pwsync-relay quickstart --relays 2 --nats` runs the whole HA set on one machine
/// (three NATS nodes, two relays on their shared journal, an agent and a consumer that list both
/// relays): a change arrives, and after one relay is killed the next one arrives through the
/// other. Needs nats-server (installed in CI).
#[test]
fn the_ha_quickstart_runs_two_relays_on_nats_and_survives_losing_one() {
    if !pwsync_tests::nats::installed() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let qs = dir.path().join("ha");
    let log_path = dir.path().join("quickstart.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut daemons = Command::new(bin("pwsync-relay"))
        .args([
            "quickstart",
            "--dir",
            &qs.display().to_string(),
            "--relays",
            "2",
            "--nats",
        ])
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("quickstart");
    struct Interrupt(u32);
    impl Drop for Interrupt {
        fn drop(&mut self) {
            // SAFETY: signalling our own child by pid, not yet reaped (forgotten once it is).
            unsafe { libc::kill(self.0 as i32, libc::SIGINT) };
        }
    }
    let interrupt = Interrupt(daemons.id());
    let text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    wait_until(Duration::from_secs(60), "the HA set running", || {
        text().contains("running (relay pid ")
    });
    let relay_pid: i32 = text()
        .split("running (relay pid ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|pid| pid.trim().parse().ok())
        .expect("relay pid");
    let agent_toml = qs.join("agent.toml");
    let ht = qs.join("htpasswd");
    wait_until(
        Duration::from_secs(30),
        "the group's policy at the agent",
        || {
            agent(
                &agent_toml,
                &["check-password", "--user", "alice"],
                "Ha-Test-Pw-1",
            )
            .0
        },
    );
    let (ok, said) = agent(&agent_toml, &["submit", "--user", "alice"], "Ha-Test-Pw-1");
    assert!(ok, "{said}");
    wait_until(
        Duration::from_secs(30),
        "alice's change at the target",
        || pwsync_tests::htpasswd_verifies(&ht, "alice", "Ha-Test-Pw-1"),
    );
    // The first relay is lost: the next change goes through the second.
    // SAFETY: a pid the quickstart reported for its own child.
    unsafe { libc::kill(relay_pid, libc::SIGKILL) };
    let (ok, said) = agent(&agent_toml, &["submit", "--user", "bob"], "Ha-Test-Pw-2");
    assert!(ok, "{said}");
    wait_until(
        Duration::from_secs(60),
        "bob's change through the other relay",
        || pwsync_tests::htpasswd_verifies(&ht, "bob", "Ha-Test-Pw-2"),
    );
    let stats = Command::new(bin("pwsync-relay"))
        .args([
            "--config",
            &qs.join("relay2.toml").display().to_string(),
            "journal",
            "stats",
        ])
        .output()
        .expect("journal stats");
    assert!(
        stats.status.success() && String::from_utf8_lossy(&stats.stdout).contains("records:"),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    // The quickstart noticed its relay died and stops the rest; or Ctrl-C does.
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(daemons.id() as i32, libc::SIGINT) };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while daemons.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "quickstart did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::mem::forget(interrupt);
    let log = text();
    for name in [
        "[nats1   ]",
        "[relay   ]",
        "[relay2  ]",
        "[agent   ]",
        "[consumer]",
    ] {
        assert!(log.contains(name), "no {name} lines:\n{log}");
    }
    for pw in ["Ha-Test-Pw-1", "Ha-Test-Pw-2"] {
        assert!(!log.contains(pw), "a password reached a log");
    }
}
