//! The end-to-end test harness: starts the real `pwsync-*` binaries as processes on loopback
//! ports in a temp dir, with freshly generated keys and configs, and kills, restarts and
//! inspects them the way an operator would.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/pwsync-*`). Every wait is bounded and fails with what it was waiting for.

pub mod cluster;
pub mod group_client;
pub mod krb5;
pub mod nats;
pub mod pam;
pub mod pg;
pub mod probe;
pub mod process;
pub mod samba;
pub mod scrape;
pub mod slapd;

pub use cluster::Cluster;
pub use group_client::GroupClient;
pub use process::{bin, free_port, wait_until, ArgvWatch, Daemon};

/// A consumer's target section for most tests: the htpasswd file `htpasswd` in the consumer's
/// folder, bcrypt cost 4 (fast).
pub const HT_TARGET: &str =
    "[targets.web]\ntype = \"htpasswd\"\nsystem = \"web\"\npath = \"htpasswd\"\ncost = 4\n";

/// Writes `text` to `path`, mode 0600 (a password file a daemon's config names).
pub fn secret_file(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("secret file");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod 0600");
}

/// `htpasswd -vb FILE USER PASSWORD` (apache2-utils): the check a user of the file would make.
pub fn htpasswd_verifies(file: &std::path::Path, user: &str, password: &str) -> bool {
    file.exists()
        && std::process::Command::new("htpasswd")
            .args(["-vb", &file.display().to_string(), user, password])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

/// libfaketime's preload library (Debian's `faketime`), to run a daemon with a wrong clock;
/// `None` (outside CI) when it is not installed.
pub fn libfaketime() -> Option<std::path::PathBuf> {
    let found = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| std::path::Path::new(d).join("faketime/libfaketime.so.1"))
    .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "libfaketime is not installed (scripts/install-deps.sh installs it)"
        );
        eprintln!("skipped: libfaketime is not installed");
    }
    found
}

/// Runs `pwsync-exec-store COMMAND STORE ACCOUNT` (`create` or `login`) with `password` on
/// stdin: the exec target's test system, as its administrator or its own login. Whether it
/// succeeded.
pub fn exec_store(command: &str, store: &std::path::Path, account: &str, password: &[u8]) -> bool {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin("pwsync-exec-store"))
        .arg(command)
        .arg(store)
        .arg(account)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pwsync-exec-store");
    // A refusal may come before the program reads its input: a closed pipe is an answer.
    let _ = child.stdin.take().expect("stdin").write_all(password);
    child.wait().expect("pwsync-exec-store").success()
}

/// `envelope` as an agent publishes it: a batch of one.
pub fn batch_of(envelope: Vec<u8>) -> Vec<u8> {
    let mut b = pwsync_proto::batch::Batch::default();
    b.push(envelope);
    b.take_encoded()
}
