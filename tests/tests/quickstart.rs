//! The README's first command: `pwsync-relay quickstart` (issue: the two README commands).

use pwsync_tests::{bin, wait_until};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

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
    }

    let log = std::fs::File::create(dir.path().join("quickstart.log")).expect("log");
    let mut daemons = Command::new(bin("pwsync-relay"))
        .args(["quickstart", "--dir", &qs.display().to_string()])
        .stdout(log.try_clone().expect("fd"))
        .stderr(log)
        .spawn()
        .expect("quickstart");
    let socket = qs.join("agent.sock");
    wait_until(Duration::from_secs(30), "the agent's socket", || {
        socket.exists()
    });
    let mut submit = Command::new(bin("pwsync-agent"))
        .args([
            "submit",
            "--config",
            &qs.join("agent.toml").display().to_string(),
            "--user",
            "alice",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("submit");
    submit
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"Qs-Test-Pw-7781\n")
        .expect("write");
    let out = submit.wait_with_output().expect("submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ht = qs.join("htpasswd");
    wait_until(
        Duration::from_secs(10),
        "alice's password in the htpasswd file",
        || pwsync_tests::htpasswd_verifies(&ht, "alice", "Qs-Test-Pw-7781"),
    );
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
    let log = std::fs::read_to_string(dir.path().join("quickstart.log")).expect("log");
    for name in ["[relay   ]", "[agent   ]", "[consumer]"] {
        assert!(log.contains(name), "no {name} lines:\n{log}");
    }
    assert!(
        !log.contains("Qs-Test-Pw-7781"),
        "the password reached a log"
    );
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
