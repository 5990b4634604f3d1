//! A PAM service of a test's own in /etc/pam.d (so it needs root, as CI has): pwsync's module
//! behind `pam_permit`, driven by `pamtester`. Removed when dropped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A PAM service file of this test's own, removed when dropped.
pub struct Service {
    pub name: String,
    path: PathBuf,
}

impl Service {
    pub fn new(module_args: &str) -> Option<Service> {
        Self::with_stack(&format!(
            "password requisite pam_permit.so\npassword required {{module}} {module_args}\n"
        ))
    }

    /// A service whose file is `stack`, `{module}` standing for pwsync's module.
    pub fn with_stack(stack: &str) -> Option<Service> {
        if !crate::process::root_or_skip("a PAM test (it writes /etc/pam.d)") {
            return None;
        }
        assert!(
            Path::new("/usr/bin/pamtester").exists(),
            "pamtester is not installed (scripts/install-deps.sh installs it)"
        );
        let module = crate::bin("libpam_pwsync.so");
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("pwsync-test-{}-{n}", std::process::id());
        let path = PathBuf::from("/etc/pam.d").join(&name);
        std::fs::write(
            &path,
            stack.replace("{module}", &module.display().to_string()),
        )
        .expect("write the PAM service file");
        Some(Service { name, path })
    }

    /// `pamtester SERVICE USER chauthtok`, answering the prompts with `password` twice.
    pub fn chauthtok(&self, user: &str, password: &str) -> Output {
        self.pamtester(user, "chauthtok", &format!("{password}\n{password}\n"))
    }

    /// `pamtester SERVICE USER authenticate`, answering the password prompt with `password`.
    pub fn authenticate(&self, user: &str, password: &str) -> Output {
        self.pamtester(user, "authenticate", &format!("{password}\n"))
    }

    fn pamtester(&self, user: &str, operation: &str, answers: &str) -> Output {
        let mut child = Command::new("pamtester")
            .args([&self.name, user, operation])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pamtester");
        // pamtester may finish (a refusal) before it reads the answers: a closed pipe is fine.
        if let Err(e) = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(answers.as_bytes())
        {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "answers: {e}");
        }
        child.wait_with_output().expect("pamtester output")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A copy of this machine's `/etc` that PAM modules may change (`pam_unix` rewrites
/// `/etc/shadow`), mounted over `/etc` only for the commands [`PrivateEtc::run`] starts, in a
/// mount namespace of their own: the machine's own accounts and PAM stacks are never touched.
pub struct PrivateEtc {
    dir: tempfile::TempDir,
}

impl PrivateEtc {
    pub fn new() -> Option<PrivateEtc> {
        if !crate::process::root_or_skip("a PAM test with pam_unix (it mounts over /etc)") {
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new("cp")
            .args(["-a", "/etc"])
            .arg(dir.path().join("etc"))
            .output()
            .expect("cp -a /etc");
        assert!(
            out.status.success(),
            "cp -a /etc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(PrivateEtc { dir })
    }

    /// A file of the copy, by its path under `/etc`.
    pub fn file(&self, under_etc: &str) -> PathBuf {
        self.dir.path().join("etc").join(under_etc)
    }

    /// Adds a local account with no usable password, as `useradd` would.
    pub fn add_user(&self, user: &str, uid: u32) {
        let append = |file: &str, line: String| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(self.file(file))
                .expect("open a copied account file");
            f.write_all(line.as_bytes()).expect("append");
        };
        append(
            "passwd",
            format!("{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n"),
        );
        append("group", format!("{user}:x:{uid}:\n"));
        append("shadow", format!("{user}:!:20000:0:99999:7:::\n"));
    }

    /// The account's line in the copy's `/etc/shadow`.
    pub fn shadow_line(&self, user: &str) -> String {
        std::fs::read_to_string(self.file("shadow"))
            .expect("read the copied shadow")
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `script` with `sh -c`, the copy mounted over `/etc` and each `(from, onto)` of
    /// `binds` mounted too, `stdin` written to it.
    pub fn run(&self, binds: &[(&Path, &str)], script: &str, stdin: &str) -> Output {
        let mut mounts = format!("mount --bind '{}' /etc", self.file("").display());
        for (from, onto) in binds {
            mounts += &format!(" && mount --bind '{}' '{onto}'", from.display());
        }
        let mut child = Command::new("unshare")
            .args(["-m", "sh", "-c", &format!("{mounts} && {script}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare");
        if let Err(e) = child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
        {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "stdin: {e}");
        }
        child.wait_with_output().expect("unshare output")
    }

    /// `pamtester SERVICE USER chauthtok` in the copy, answering the prompts with `password`.
    pub fn chauthtok(&self, service: &str, user: &str, password: &str) -> Output {
        self.run(
            &[],
            &format!("pamtester '{service}' '{user}' chauthtok"),
            &format!("{password}\n{password}\n"),
        )
    }
}
