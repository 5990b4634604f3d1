//! `exec`: runs a program per change, the plugin protocol for any language.
//!
//! The program gets one JSON document on stdin:
//! `{"user", "account", "op", "values": [..], "attributes": {..}, "origin"}` (values are the
//! cleartext passwords: the program must not log them) and answers with its exit status:
//! 0 applied, 75 (EX_TEMPFAIL) try again later, 67 (EX_NOUSER) no such user (retried for the
//! no-such-user window), anything else failed for good. Its stderr (at most 1 KiB, with any
//! password value blanked out) goes into the dead letter. The program is given no argv beyond
//! the configured command, and is killed after the timeout (a retry).
//!
//! With `audit = true` the account audit asks the program too: the same document with
//! `"op": "audit"` (no values), answered by exit 0 and one JSON line on stdout (at most 4 KiB)
//! `{"changed_at_ms": N or null, "changed_by": "…" or null, "verifier": "…" or null}`, where
//! `verifier` is any text that changes whenever the password does (the stored hashes: pwsync
//! keeps only a keyed fingerprint of it); exit 67 for an account that is not there.

use super::observed::{Observed, Seen, Verifier};
use super::{Limits, Outcome, Target, Unusable};
use pwsync_proto::Change;
use serde::Deserialize;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program and its fixed arguments.
    pub command: Vec<String>,
    /// Seconds before the program is killed (and the change retried). Default 30.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// The program answers the account audit (`"op": "audit"`). Default false.
    #[serde(default)]
    pub audit: bool,
}

fn default_timeout() -> u64 {
    30
}

pub struct Exec {
    program: PathBuf,
    args: Vec<String>,
    timeout: Duration,
    audit: bool,
}

/// How much of an audit answer is read.
const MAX_AUDIT_ANSWER: u64 = 4096;

/// The program's answer to `"op": "audit"`.
#[derive(Deserialize)]
struct AuditAnswer {
    changed_at_ms: Option<u64>,
    changed_by: Option<String>,
    verifier: Option<String>,
}

pub const EXIT_RETRY: i32 = 75;
pub const EXIT_NO_SUCH_USER: i32 = 67;

impl Exec {
    pub fn new(c: ExecConfig, base: &Path) -> Self {
        let mut it = c.command.into_iter();
        let program = it.next().map(PathBuf::from).unwrap_or_default();
        Exec {
            program: if program.components().count() > 1 {
                pwsync_runtime::resolve(base, &program)
            } else {
                program
            },
            args: it.collect(),
            timeout: Duration::from_secs(c.timeout_secs.max(1)),
            audit: c.audit,
        }
    }

    /// Runs the program with `doc` on stdin until it exits (killed after the timeout): its
    /// status, stdout (at most [`MAX_AUDIT_ANSWER`] bytes, when `answer`) and stderr (1 KiB).
    fn run(
        &self,
        doc: &[u8],
        answer: bool,
    ) -> Result<(std::process::ExitStatus, Vec<u8>, Vec<u8>), Outcome> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(if answer {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                Outcome::RetryLater(format!("cannot run {}: {e}", self.program.display()))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(doc);
        }
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Outcome::RetryLater(format!(
                        "{} did not finish within {:?}",
                        self.program.display(),
                        self.timeout
                    )));
                }
                Err(e) => {
                    return Err(Outcome::RetryLater(format!(
                        "waiting for {}: {e}",
                        self.program.display()
                    )))
                }
            }
        };
        let mut stdout = Vec::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.by_ref().take(MAX_AUDIT_ANSWER).read_to_end(&mut stdout);
        }
        let mut stderr = Vec::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.by_ref().take(1024).read_to_end(&mut stderr);
        }
        Ok((status, stdout, stderr))
    }
}

fn document(change: &Change, account: &str) -> Zeroizing<Vec<u8>> {
    let values: Vec<String> = change
        .values
        .iter()
        .map(|v| String::from_utf8_lossy(v.expose()).into_owned())
        .collect();
    let doc = serde_json::json!({
        "user": change.user,
        "account": account,
        "op": change.op.as_str(),
        "values": values,
        "attributes": change.attributes,
        "origin": change.origin,
    });
    let out = Zeroizing::new(serde_json::to_vec(&doc).unwrap_or_default());
    drop(Zeroizing::new(values));
    out
}

impl Target for Exec {
    fn apply(&self, change: &Change, account: &str) -> Outcome {
        let (status, _, stderr) = match self.run(&document(change, account), false) {
            Ok(r) => r,
            Err(o) => return o,
        };
        let mut message = String::from_utf8_lossy(&stderr).trim().to_string();
        for v in &change.values {
            let v = String::from_utf8_lossy(v.expose());
            if !v.is_empty() {
                message = message.replace(v.as_ref(), "***");
            }
        }
        let what = format!(
            "{} exited with {status}{}",
            self.program.display(),
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        );
        match status.code() {
            Some(0) => Outcome::Applied,
            Some(EXIT_RETRY) => Outcome::RetryLater(what),
            Some(EXIT_NO_SUCH_USER) => Outcome::NoSuchUser(what),
            _ => Outcome::Failed(what),
        }
    }

    /// The program's answer to `"op": "audit"`, when it answers one (`audit = true`).
    fn observe(&self, account: &str) -> Observed {
        if !self.audit {
            return Observed::Unsupported;
        }
        let asked = Change::new(account, "", pwsync_proto::Op::Replace, vec![]);
        let mut doc: serde_json::Value =
            serde_json::from_slice(&document(&asked, account)).unwrap_or_default();
        doc["op"] = "audit".into();
        let (status, stdout, stderr) = match self.run(doc.to_string().as_bytes(), true) {
            Ok(r) => r,
            Err(o) => return Observed::Unreadable(o.reason().to_string()),
        };
        match status.code() {
            Some(0) => {}
            Some(EXIT_NO_SUCH_USER) => return Observed::Missing,
            _ => {
                return Observed::Unreadable(format!(
                    "{} exited with {status} to an audit: {}",
                    self.program.display(),
                    String::from_utf8_lossy(&stderr).trim()
                ))
            }
        }
        let stdout = Zeroizing::new(stdout);
        match serde_json::from_slice::<AuditAnswer>(&stdout) {
            Ok(a) => Observed::Present(Seen {
                changed_at_ms: a.changed_at_ms,
                changed_by: a.changed_by,
                verifier: a
                    .verifier
                    .map(|v| Verifier::Stored(Zeroizing::new(v.into_bytes()))),
            }),
            Err(e) => Observed::Unreadable(format!(
                "{} answered an audit with something other than its JSON line: {e}",
                self.program.display()
            )),
        }
    }

    fn limits(&self) -> Limits {
        // JSON carries text: a password that is not UTF-8 is refused, not mangled.
        Limits {
            multi_valued: true,
            ..Limits::text("the program's own")
        }
    }

    fn check(&self) -> Result<(), Unusable> {
        if self.program.as_os_str().is_empty() {
            return Err(Unusable::Config("command is empty".into()));
        }
        if self.program.components().count() > 1 && !self.program.exists() {
            return Err(Unusable::Config(format!(
                "{} does not exist",
                self.program.display()
            )));
        }
        Ok(())
    }
}
