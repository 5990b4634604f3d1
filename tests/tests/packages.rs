//! The Debian packages (issue: install it the way Linux administrators expect): built by
//! `scripts/build-debs.sh` from the binaries this suite built, checked by lintian (no error, no
//! warning), installed on this machine with
//! `apt-get install ./…deb`, and used the way an administrator would. Needs root and dpkg (as
//! CI has); it refuses to run where pwsync is installed already, so it never touches a real
//! installation.

use pwsync_agent::api::Response;
use pwsync_proto::Op;
use pwsync_tests::cluster::AgentOptions;
use pwsync_tests::pam::PrivateEtc;
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
        // dpkg, not apt-get: apt refuses the whole purge when one of them is unknown to it.
        let _ = Command::new("dpkg")
            .args(["--purge", "pwsync-agent", "pwsync-relay", "pwsync-consumer"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
        let _ = std::fs::remove_dir_all("/var/lib/pwsync");
        let _ = std::fs::remove_dir_all("/etc/pwsync");
    }
}

/// One package test at a time: each installs and purges the same packages.
static APT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `apt-get ARGS` with `repo` as its only source, its lists in `lists` (not the machine's).
fn apt_from(repo: &Path, lists: &Path, args: &[&str]) -> Output {
    std::fs::create_dir_all(lists.join("partial")).expect("lists");
    let sources = lists.join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [signed-by={}] file://{} stable main\n",
            repo.join("pwsync-archive-keyring.gpg").display(),
            repo.display()
        ),
    )
    .expect("sources.list");
    run(Command::new("apt-get")
        .args(["-y", "-q", "--no-install-recommends", "-o"])
        .arg(format!("Dir::Etc::SourceList={}", sources.display()))
        .args(["-o", "Dir::Etc::SourceParts=/nonexistent", "-o"])
        .arg(format!("Dir::State::Lists={}", lists.display()))
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The packages `scripts/build-debs.sh` makes of this suite's binaries in `out`, as `version`
/// (the workspace's when `None`).
fn build_debs(out: &Path, version: Option<&str>) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(repo.join("scripts/build-debs.sh"));
    cmd.args(["--prebuilt", "--profile", "dev", "--out"])
        .arg(out);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    ok(&mut cmd);
}

fn installed_version(package: &str) -> String {
    ok(Command::new("dpkg-query").args(["-W", "-f", "${Version}", package]))
}

/// Whether this machine can run the package tests (root, dpkg-deb; in CI it must).
fn can_install_packages() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/usr/bin/dpkg-deb").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the package tests need root and dpkg-deb in CI"
        );
        eprintln!("skipped: needs root and dpkg-deb");
        return false;
    }
    assert!(
        !Path::new("/usr/bin/pwsync-agent").exists() && !Path::new("/etc/pwsync").exists(),
        "pwsync is installed on this machine: the package tests install and purge it, so they do not run here"
    );
    true
}

/// The packages from a signed apt repository (`scripts/build-apt-repo.sh`), as a fleet takes
/// them: `apt-get update` checks the signature (a tampered Release is refused), the three
/// install from it, and the next version, published there while changes wait everywhere (100 in
/// the agent's spool with the relay down, 30 in the relay's journal, 40 in the consumer's retry
/// queue for a target that says "later"), upgrades them in place: configuration and state stay,
/// and once everything is back all 170 reach both targets, each journaled once.
#[test]
fn a_signed_repository_installs_and_upgrades_in_place_keeping_every_waiting_change() {
    let _apt = APT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !can_install_packages() {
        return;
    }
    for tool in ["/usr/bin/apt-ftparchive", "/usr/bin/gpg"] {
        if !Path::new(tool).exists() {
            assert!(
                std::env::var_os("CI").is_none(),
                "the repository test needs {tool} in CI"
            );
            eprintln!("skipped: needs {tool}");
            return;
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (v1, v2) = (dir.path().join("v1"), dir.path().join("v2"));
    let next = format!("{}+1", env!("CARGO_PKG_VERSION"));
    build_debs(&v1, None);
    build_debs(&v2, Some(&next));

    // The repository's signing key, made in a keyring of the test's own.
    let gnupg = dir.path().join("gnupg");
    std::fs::create_dir(&gnupg).expect("gnupg");
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .expect("mode");
    ok(Command::new("gpg").arg("--homedir").arg(&gnupg).args([
        "--batch",
        "--quiet",
        "--passphrase",
        "",
        "--quick-gen-key",
        "pwsync test repository <repository@pwsync.invalid>",
        "ed25519",
        "sign",
        "never",
    ]));
    let key = dir.path().join("repository-key.asc");
    let armoured = run(Command::new("gpg").arg("--homedir").arg(&gnupg).args([
        "--batch",
        "--armor",
        "--export-secret-keys",
    ]));
    std::fs::write(&key, &armoured.stdout).expect("key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("mode");
    let publish = |debs: &Path, repo: &Path| {
        ok(Command::new(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-apt-repo.sh"),
        )
        .arg("--key")
        .arg(&key)
        .arg("--debs")
        .arg(debs)
        .arg("--out")
        .arg(repo));
    };
    let repo = dir.path().join("repo");
    publish(&v1, &repo);

    // A Release changed after signing: apt refuses the repository.
    let tampered = dir.path().join("tampered");
    ok(Command::new("cp").arg("-a").arg(&repo).arg(&tampered));
    for f in ["Release", "InRelease"] {
        let path = tampered.join("dists/stable").join(f);
        let body = std::fs::read_to_string(&path).expect("release");
        std::fs::write(&path, body.replace("Label: pwsync", "Label: evil")).expect("release");
    }
    let refused = apt_from(&tampered, &dir.path().join("lists-tampered"), &["update"]);
    assert!(
        !refused.status.success() && text(&refused).contains("BADSIG"),
        "a tampered repository was taken: {}",
        text(&refused)
    );

    let _cleanup = Uninstall;
    let lists = dir.path().join("lists");
    let roles = ["pwsync-agent", "pwsync-relay", "pwsync-consumer"];
    let update = apt_from(&repo, &lists, &["update"]);
    assert!(update.status.success(), "apt-get update: {}", text(&update));
    let install = apt_from(&repo, &lists, &[&["install"][..], &roles[..]].concat());
    assert!(
        install.status.success(),
        "apt-get install: {}",
        text(&install)
    );
    for p in roles {
        assert_eq!(installed_version(p), env!("CARGO_PKG_VERSION"));
    }

    // A cluster keeping its state in the packages' state folders: the agent's spool, the
    // relay's journal, the consumer's state (cursor and retry queues). Its second target, a
    // program, answers "try again later" until the flag file exists.
    let mut c = Cluster::new(&["g1"], "");
    let relay_cfg = std::fs::read_to_string(&c.relay_config).expect("relay config");
    std::fs::write(
        &c.relay_config,
        relay_cfg.replace(
            "dir = \"journal\"",
            "dir = \"/var/lib/pwsync/relay/journal\"",
        ),
    )
    .expect("relay config");
    let a = c.add_agent("pkg-up", AgentOptions::default());
    let config = c.agents[a].config.clone();
    let cfg = std::fs::read_to_string(&config).expect("config");
    let cfg = cfg.replace("dir = \"spool\"", "dir = \"/var/lib/pwsync/agent/spool\"");
    std::fs::write(&config, &cfg).expect("config");
    std::fs::write("/etc/pwsync/agent.toml", &cfg).expect("/etc/pwsync/agent.toml");
    let (flag, applied) = (dir.path().join("app-up"), dir.path().join("app-applied"));
    let script = dir.path().join("app.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ninput=$(cat)\n[ -e '{}' ] || exit 75\nprintf '%s\\n' \"$input\" | sed -n 's/.*\"user\": *\"\\([^\"]*\\)\".*/\\1/p' >>'{}'\n",
            flag.display(),
            applied.display()
        ),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("mode");
    let k = c.add_consumer(
        "k",
        "g1",
        &format!(
            "{HT_TARGET}\n[targets.app]\ntype = \"exec\"\nsystem = \"app\"\ncommand = [{:?}]\n\n[retry]\nbase_ms = 100\nmax_secs = 1\n",
            script.display().to_string()
        ),
    );
    let consumer_cfg = std::fs::read_to_string(&c.consumers[k].config).expect("consumer config");
    std::fs::write(
        &c.consumers[k].config,
        consumer_cfg.replace(
            "dir = \"state\"",
            "dir = \"/var/lib/pwsync/consumer/state\"",
        ),
    )
    .expect("consumer config");
    let ht = c.consumers[k].dir.join("htpasswd");
    let submit = |c: &Cluster, range: std::ops::Range<usize>| {
        for i in range {
            let pw = format!("Up-Pkg-pw-{i}");
            assert!(
                matches!(
                    c.submit(a, &format!("up{i}"), Op::Replace, Some(&pw)),
                    Response::Accepted { durable: true, .. }
                ),
                "change {i} not accepted"
            );
        }
    };
    // 40 changes applied at the htpasswd file and waiting in the program's retry queue.
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    submit(&c, 0..40);
    wait_until(Duration::from_secs(60), "the first 40 at htpasswd", || {
        (0..40).all(|i| htpasswd_verifies(&ht, &format!("up{i}"), &format!("Up-Pkg-pw-{i}")))
    });
    let status = Path::new("/var/lib/pwsync/consumer/state/status.json");
    wait_until(
        Duration::from_secs(30),
        "the consumer committed 40 and holds 40 for the program",
        || {
            let s: serde_json::Value = std::fs::read(status)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            s["committed"] == 40 && s["targets"]["app"]["retry_depth"] == 40
        },
    );
    c.consumers[k].daemon.as_mut().expect("consumer").stop();
    // 30 journaled at the relay, not delivered (the consumer is down).
    submit(&c, 40..70);
    wait_until(Duration::from_secs(30), "70 changes journaled", || {
        c.journal("stats")
            .contains("pkg-up\tjournaled through seq 70")
    });
    c.relay().stop();
    // 100 in the agent's spool (the relay is down).
    submit(&c, 70..170);
    c.agents[a].daemon.as_mut().expect("agent").stop();

    // A key kept where an administrator keeps them: /etc/pwsync (the packages own none of it).
    let key_file = Path::new("/etc/pwsync/agent.key");
    std::fs::copy(c.agents[a].dir.join("agent.key"), key_file).expect("key");
    std::fs::set_permissions(
        key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("mode");
    let key_bytes = std::fs::read(key_file).expect("key");

    // The next version, published and taken from the repository: an upgrade in place.
    publish(&v2, &repo);
    let update = apt_from(&repo, &lists, &["update"]);
    assert!(update.status.success(), "apt-get update: {}", text(&update));
    let upgrade = apt_from(&repo, &lists, &[&["install"][..], &roles[..]].concat());
    assert!(
        upgrade.status.success(),
        "apt-get install: {}",
        text(&upgrade)
    );
    for p in roles {
        assert_eq!(installed_version(p), next);
    }
    assert_eq!(
        std::fs::read_to_string("/etc/pwsync/agent.toml").expect("config kept"),
        cfg
    );
    assert_eq!(std::fs::read(key_file).expect("key kept"), key_bytes);
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(key_file).expect("key").permissions()
        ) & 0o777,
        0o600
    );
    let stats = ok(Command::new("/usr/bin/pwsync-agent").args([
        "spool",
        "--spool",
        "/var/lib/pwsync/agent/spool",
        "stats",
    ]));
    assert!(stats.contains("records:      100"), "{stats}");

    // Everything back, the program up: every change reaches both targets, each journaled once.
    std::fs::write(&flag, "").expect("flag");
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    wait_until(
        Duration::from_secs(90),
        "the 170 changes at both targets",
        || {
            let at_app = std::fs::read_to_string(&applied).unwrap_or_default();
            (0..170).all(|i| {
                htpasswd_verifies(&ht, &format!("up{i}"), &format!("Up-Pkg-pw-{i}"))
                    && at_app.lines().any(|u| u == format!("up{i}"))
            })
        },
    );
    let journal = c.journal("stats");
    assert!(
        journal.contains("next offset:  171")
            && journal.contains("pkg-up\tjournaled through seq 170"),
        "each change journaled once:\n{journal}"
    );
    let logs = c.all_logs();
    assert!(!logs.contains("Up-Pkg-pw-"), "a password in a log");
}

#[test]
fn the_debian_packages_install_run_keep_data_and_set_up_pam() {
    let _apt = APT_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !can_install_packages() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    build_debs(dir.path(), None);
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
    // Checked as a Debian maintainer checks a package: lintian finds no error and no warning.
    let lintian = Path::new("/usr/bin/lintian");
    if lintian.exists() {
        let out = run(Command::new(lintian)
            .args(["--tag-display-limit", "0"])
            .args(&debs));
        let report = text(&out);
        let flagged: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
            .collect();
        assert!(
            flagged.is_empty() && out.status.success(),
            "lintian on the packages:\n{report}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "the package test needs lintian in CI"
        );
        eprintln!("lintian not installed: the packages were not checked with it");
    }
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

    // PAM: pam-auth-update enables both profiles over a private copy of /etc (and of
    // /var/lib/pam), in a mount namespace of its own: the policy `check` line before pam_unix,
    // the hand-over after it; the machine's own files are untouched.
    apt(&["install", &paths[0]]);
    let Some(etc) = PrivateEtc::new() else {
        return;
    };
    let varlibpam = tempfile::tempdir().expect("temp dir");
    ok(Command::new("cp")
        .args(["-a", "/var/lib/pam"])
        .arg(varlibpam.path().join("pam")));
    let enabled = etc.run(
        &[(&varlibpam.path().join("pam"), "/var/lib/pam")],
        "pam-auth-update --package --enable pwsync pwsync-check && cat /etc/pam.d/common-password",
        "",
    );
    assert!(
        enabled.status.success(),
        "pam-auth-update: {}",
        text(&enabled)
    );
    let generated = String::from_utf8_lossy(&enabled.stdout).to_string();
    let line_of = |what: &str| {
        generated
            .lines()
            .position(|l| !l.starts_with('#') && l.contains(what))
            .unwrap_or_else(|| panic!("no {what} in common-password:\n{generated}"))
    };
    let (check, unix, hand_over) = (
        line_of("pam_pwsync.so check"),
        line_of("pam_unix.so"),
        generated
            .lines()
            .collect::<Vec<_>>()
            .iter()
            .rposition(|l| !l.starts_with('#') && l.contains("pam_pwsync.so"))
            .expect("the hand-over line"),
    );
    assert!(
        check < unix && unix < hand_over,
        "the check line before pam_unix, the hand-over after:\n{generated}"
    );
    assert!(
        generated
            .lines()
            .nth(unix)
            .is_some_and(|l| l.contains("use_authtok")),
        "pam_unix must set the password the check line took:\n{generated}"
    );
    let real = std::fs::read_to_string("/etc/pam.d/common-password").unwrap_or_default();
    assert!(
        !real.contains("pam_pwsync"),
        "the machine's own PAM stack was changed"
    );

    // That stack, with the real pam_unix and the installed module, in front of an agent that
    // enforces its group's policy (its socket where the package puts it, /run/pwsync, in the
    // namespace only): a password the target cannot hold is refused with the reason before
    // the local password moves; a good one is set and reaches the target.
    let mut c = Cluster::new(&["g1"], "");
    let a = c.add_agent("pam-host", AgentOptions::default());
    let key = c.root.path().join("keys/group-g1.pub");
    c.groups["g1"]
        .verifying_key()
        .save(&key)
        .expect("group pub");
    let config = std::fs::read_to_string(&c.agents[a].config).expect("config");
    std::fs::write(
        &c.agents[a].config,
        format!("{config}\n[policy]\ngroups = {{ g1 = {key:?} }}\n"),
    )
    .expect("config");
    let k = c.add_consumer("k", "g1", HT_TARGET);
    c.start_relay();
    c.start_consumer(k);
    c.start_agent(a);
    etc.add_user("lee", 61_002);
    std::fs::write(etc.file("pam.d/pwsync-pkg"), "@include common-password\n").expect("service");
    let agent_dir = c.agents[a]
        .socket
        .parent()
        .expect("agent dir")
        .to_path_buf();
    let chauthtok = |password: &str| {
        etc.run(
            &[],
            &format!(
                "mount -t tmpfs tmpfs /run && mkdir /run/pwsync && mount --bind '{}' /run/pwsync && pamtester pwsync-pkg lee chauthtok",
                agent_dir.display()
            ),
            &format!("{password}\n{password}\n"),
        )
    };
    let long = "Lee-Pkg-Long-".repeat(6); // 78 bytes
    let before = etc.shadow_line("lee");
    wait_until(
        Duration::from_secs(30),
        "the group's policy at the agent",
        || {
            let out = chauthtok(&long);
            !out.status.success() && text(&out).contains("at most 71 bytes")
        },
    );
    let out = chauthtok(&long);
    assert!(
        !out.status.success() && text(&out).contains("bcrypt"),
        "the reason: {}",
        text(&out)
    );
    assert_eq!(etc.shadow_line("lee"), before, "the local password moved");
    let out = chauthtok("Lee-Pam-pw-1");
    assert!(out.status.success(), "pamtester: {}", text(&out));
    assert_ne!(etc.shadow_line("lee"), before, "pam_unix set nothing");
    let ht = c.consumers[k].dir.join("htpasswd");
    wait_until(
        Duration::from_secs(30),
        "lee's change at the target",
        || htpasswd_verifies(&ht, "lee", "Lee-Pam-pw-1"),
    );
    let logs = c.all_logs();
    for pw in [long.as_str(), "Lee-Pam-pw-1"] {
        assert!(!logs.contains(pw), "a password in a log");
    }
}
