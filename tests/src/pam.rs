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
