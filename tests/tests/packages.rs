//! The Debian packages (issue: install it the way Linux administrators expect): built by
//! `scripts/build-debs.sh` from the binaries this suite built, installed on this machine with
//! `apt-get install ./…deb`, and used the way an administrator would. Needs root and dpkg (as
//! CI has); it refuses to run where pwsync is installed already, so it never touches a real
//! installation.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::pam::Service;
use pwsync_tests::{htpasswd_verifies, wait_until, Cluster, HT_TARGET};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?}: {}", text(&out));
    text(&out)
}

fn apt(args: &[&str]) -> String {
    ok(Command::new("apt-get")
        .args(["-y", "-q", "--no-install-recommends"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Purges the packages and what the test left, whatever happens.
struct Uninstall;

impl Drop for Uninstall {
    fn drop(&mut self) {
        let _ = Command::new("apt-get")
            .args([
                "-y",
                "-q",
                "purge",
                "pwsync-agent",
                "pwsync-relay",
                "pwsync-consumer",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        let _ = std::fs::remove_dir_all("/var/lib/pwsync");
        let _ = std::fs::remove_dir_all("/etc/pwsync");
    }
}

#[test]
fn the_debian_packages_install_run_keep_data_and_set_up_pam() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/usr/bin/dpkg-deb").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the package test needs root and dpkg-deb in CI"
        );
        eprintln!("skipped: needs root and dpkg-deb");
        return;
    }
    assert!(
        !Path::new("/usr/bin/pwsync-agent").exists() && !Path::new("/etc/pwsync").exists(),
        "pwsync is installed on this machine: the package test installs and purges it, so it does not run here"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ok(Command::new(repo.join("scripts/build-debs.sh"))
        .args(["--prebuilt", "--profile", "dev", "--out"])
        .arg(dir.path()));
    let debs: Vec<PathBuf> = ["agent", "relay", "consumer"]
        .iter()
        .map(|r| {
            std::fs::read_dir(dir.path())
                .expect("out")
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&format!("pwsync-{r}_")))
                })
                .unwrap_or_else(|| panic!("no pwsync-{r} package"))
        })
        .collect();
    let _cleanup = Uninstall;
    let paths: Vec<String> = debs.iter().map(|p| p.display().to_string()).collect();
    let mut args = vec!["install"];
    args.extend(paths.iter().map(String::as_str));
    let said = apt(&args);
    // Nothing configured yet: nothing started, and the operator is told what to do.
    assert!(said.contains("no /etc/pwsync/agent.toml yet"), "{said}");

    for program in ["pwsync-agent", "pwsync-relay", "pwsync-consumer"] {
        let v = ok(Command::new(format!("/usr/bin/{program}")).arg("--version"));
        assert!(v.contains(program), "{v}");
        let page = ok(Command::new("man")
            .args(["-l", &format!("/usr/share/man/man1/{program}.1.gz")])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"));
        assert!(
            page.contains("SYNOPSIS") || page.contains("Synopsis"),
            "{page}"
        );
        let loaded = ok(Command::new("bash").args([
            "-c",
            &format!(
                "source /usr/share/bash-completion/completions/{program} && complete -p {program}"
            ),
        ]));
        assert!(loaded.contains(program), "{loaded}");
        for f in [
            format!("/usr/share/zsh/vendor-completions/_{program}"),
            format!("/usr/share/fish/vendor_completions.d/{program}.fish"),
            format!("/usr/share/doc/{program}/examples/{}.toml", &program[7..]),
        ] {
            assert!(Path::new(&f).exists(), "{f}");
        }
    }
    // A subcommand has its own page.
    assert!(Path::new("/usr/share/man/man1/pwsync-agent-submit.1.gz").exists());
    for unit in [
        "pwsync-agent",
        "pwsync-ldap-sock",
        "pwsync-samba-sync",
        "pwsync-relay",
        "pwsync-consumer",
    ] {
        let path = format!("/lib/systemd/system/{unit}.service");
        let body = std::fs::read_to_string(&path).expect("unit");
        assert!(
            body.contains("ExecStart=/usr/bin/") && !body.contains("/usr/local"),
            "{body}"
        );
        assert!(body.contains("ConditionPathExists=/etc/pwsync/"), "{body}");
        let out = run(Command::new("systemd-analyze").args(["verify", &path]));
        assert!(
            out.status.success(),
            "systemd-analyze verify {path}: {}",
            text(&out)
        );
    }
    ok(Command::new("getent").args(["passwd", "pwsync"]));
    let files = ok(Command::new("dpkg").args(["-L", "pwsync-agent"]));
    assert!(files.contains("/security/pam_pwsync.so"), "{files}");
    assert!(files.contains("/usr/share/pam-configs/pwsync"), "{files}");

    // Data: an agent whose spool (the package's state folder) holds a change not yet forwarded.
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("pkg-host", AgentOptions::default());
    let config = c.agents[a].config.clone();
    let cfg = std::fs::read_to_string(&config).expect("config");
    let cfg = cfg.replace("dir = \"spool\"", "dir = \"/var/lib/pwsync/agent/spool\"");
    std::fs::write(&config, &cfg).expect("config");
    std::fs::write("/etc/pwsync/agent.toml", &cfg).expect("/etc/pwsync/agent.toml");
    c.start_agent(a);
    assert!(matches!(
        c.submit(a, "kim", Op::Replace, Some("Kim-Pkg-pw-1")),
        Response::Accepted { durable: true, .. }
    ));
    c.agents[a].daemon.as_mut().expect("agent").stop();

    // Remove and install again: configs and state stay.
    apt(&["remove", "pwsync-agent"]);
    assert!(Path::new("/etc/pwsync/agent.toml").exists());
    assert!(Path::new("/var/lib/pwsync/agent/spool").exists());
    apt(&["install", &paths[0]]);
    assert!(Path::new("/etc/pwsync/agent.toml").exists());
    // Purge while the spool holds a record: the data is kept, and the operator told so.
    let said = apt(&["purge", "pwsync-agent"]);
    assert!(said.contains("KEPT"), "{said}");
    assert!(
        Path::new("/var/lib/pwsync/agent/spool").exists(),
        "a spool with records was removed"
    );
    let stats = ok(Command::new(pwsync_tests::bin("pwsync-agent")).args([
        "spool",
        "--spool",
        "/var/lib/pwsync/agent/spool",
        "stats",
    ]));
    assert!(stats.contains("records:      1"), "{stats}");
    // Emptied (here: by hand), a purge removes the state folder.
    std::fs::remove_dir_all("/var/lib/pwsync/agent/spool").expect("rm spool");
    std::fs::remove_file("/etc/pwsync/agent.toml").expect("rm config");
    apt(&["install", &paths[0]]);
    apt(&["purge", "pwsync-agent"]);
    assert!(!Path::new("/var/lib/pwsync/agent").exists());

    // PAM: pam-auth-update, in a mount namespace of its own over copies of /etc/pam.d and
    // /var/lib/pam, enables the profile after pam_unix; the real files are untouched.
    apt(&["install", &paths[0]]);
    let copies = tempfile::tempdir().expect("temp dir");
    ok(Command::new("cp")
        .args(["-a", "/etc/pam.d"])
        .arg(copies.path().join("pam.d")));
    ok(Command::new("cp")
        .args(["-a", "/var/lib/pam"])
        .arg(copies.path().join("varlibpam")));
    let generated = ok(Command::new("unshare").args([
        "-m",
        "sh",
        "-c",
        &format!(
            "mount --bind {0}/pam.d /etc/pam.d && mount --bind {0}/varlibpam /var/lib/pam && pam-auth-update --package --enable pwsync && cat /etc/pam.d/common-password",
            copies.path().display()
        ),
    ]));
    let unix = generated
        .find("pam_unix.so")
        .expect("pam_unix in common-password");
    let ours = generated
        .find("pam_pwsync.so")
        .unwrap_or_else(|| panic!("pwsync not enabled:\n{generated}"));
    assert!(unix < ours, "pam_pwsync before pam_unix:\n{generated}");
    let real = std::fs::read_to_string("/etc/pam.d/common-password").unwrap_or_default();
    assert!(
        !real.contains("pam_pwsync"),
        "the machine's own PAM stack was changed"
    );
    // The line pam-auth-update wrote, with this test's socket, after a stand-in for pam_unix:
    // a change through it arrives at a target.
    let line = generated
        .lines()
        .find(|l| l.contains("pam_pwsync.so"))
        .expect("the line")
        .to_string();
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("pam-host", AgentOptions::default());
    let k = c.add_consumer("k", "g1", HT_TARGET);
    let Some(service) = Service::with_stack(&format!(
        "password requisite pam_permit.so\n{line} socket={}\n",
        c.agents[a].socket.display()
    )) else {
        return;
    };
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    let out = service.chauthtok("lee", "Lee-Pam-pw-1");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(
        Duration::from_secs(30),
        "lee's change at the target",
        || htpasswd_verifies(&ht, "lee", "Lee-Pam-pw-1"),
    );
}
