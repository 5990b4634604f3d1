//! `htpasswd`: an Apache htpasswd file of bcrypt (`$2y$`) lines, verified by `htpasswd -v`.
//!
//! | op | effect |
//! |---|---|
//! | replace, add | the account's password becomes the (first) value; the line is created if missing |
//! | delete | if the value is the current password, the account is locked |
//! | revoke | the account is locked (`!` before the hash, so nothing verifies) |
//! | resume | the lock is taken off |
//! | remove | the line is deleted |
//!
//! The audit compares the account's line's hash (the file keeps no time per line).
//!
//! Every change rewrites the file atomically: a temp file in the same folder, fsync, rename,
//! fsync of the folder. Other lines (and their order) are kept as they were.
//!
//! Lines are read as Apache reads them (spaces at either end dropped, `#` lines are comments,
//! the name is everything before the first `:`, the first line of a name counts), so the line
//! changed is the one Apache checks. Names Apache would read as another name (a space at either
//! end, a leading `#`, a `:`) are refused by the limits, as are passwords bcrypt would cut short.

use super::observed::{Observed, Seen, Verifier};
use super::{Limits, Outcome, Target, Unusable};
use pwsync_proto::{Change, Op};
use serde::Deserialize;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use zeroize::Zeroizing;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HtpasswdConfig {
    pub path: PathBuf,
    /// bcrypt cost (4–31). Default 5, as Apache's htpasswd.
    #[serde(default = "default_cost")]
    pub cost: u32,
}

fn default_cost() -> u32 {
    5
}

pub struct Htpasswd {
    path: PathBuf,
    cost: u32,
    lock: Mutex<()>,
}

const LOCK_MARK: char = '!';

/// A line as Apache's `mod_authn_file` and `htpasswd` read it: (name, hash), or `None` for a
/// comment or blank line.
fn apache_entry(line: &str) -> Option<(&str, &str)> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    t.split_once(':')
}

impl Htpasswd {
    pub fn new(c: HtpasswdConfig, base: &Path) -> Self {
        Htpasswd {
            path: pwsync_runtime::resolve(base, &c.path),
            cost: c.cost,
            lock: Mutex::new(()),
        }
    }

    fn read(&self) -> Result<Vec<String>, String> {
        match std::fs::read_to_string(&self.path) {
            Ok(t) => Ok(t.lines().map(str::to_string).collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
            Err(e) => Err(format!("reading {}: {e}", self.path.display())),
        }
    }

    /// The folder of the file (`.` for a bare file name).
    fn dir(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    fn write(&self, lines: &[String]) -> Result<(), String> {
        let dir = self.dir();
        let tmp = dir.join(format!(
            ".{}.pwsync-tmp",
            self.path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("htpasswd")
        ));
        let io = |e: std::io::Error| format!("writing {}: {e}", self.path.display());
        let mode = std::fs::metadata(&self.path)
            .map(|m| m.permissions().mode())
            .unwrap_or(0o640);
        {
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io)?;
            for l in lines {
                writeln!(f, "{l}").map_err(io)?;
            }
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    fn hash(&self, password: &[u8]) -> Result<String, String> {
        // The limits refuse what bcrypt would truncate; the non-truncating call makes sure.
        bcrypt::non_truncating_hash_with_result(password, self.cost)
            .map(|h| h.format_for_version(bcrypt::Version::TwoY))
            .map_err(|e| format!("bcrypt: {e}"))
    }
}

impl Target for Htpasswd {
    /// The account's line's hash (a lock mark taken off): the file keeps no time per line.
    fn observe(&self, account: &str) -> Observed {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let lines = match self.read() {
            Ok(l) => l,
            Err(e) => return Observed::Unreadable(e),
        };
        let hash = lines.iter().find_map(|l| {
            apache_entry(l)
                .filter(|(n, _)| *n == account)
                .map(|(_, h)| h)
        });
        match hash {
            None => Observed::Missing,
            Some(h) => Observed::Present(Seen {
                verifier: Some(Verifier::Stored(Zeroizing::new(
                    h.trim_start_matches(LOCK_MARK).as_bytes().to_vec(),
                ))),
                ..Seen::default()
            }),
        }
    }

    fn apply(&self, change: &Change, account: &str) -> Outcome {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut lines = match self.read() {
            Ok(l) => l,
            Err(e) => return Outcome::RetryLater(e),
        };
        let at = lines
            .iter()
            .position(|l| apache_entry(l).is_some_and(|(n, _)| n == account));
        let current = at.and_then(|i| apache_entry(&lines[i]).map(|(_, h)| h.to_string()));
        let new_line = match (change.op, &current) {
            (Op::Replace | Op::Add, _) => {
                let Some(value) = change.values.first() else {
                    return Outcome::Failed(format!("{} without a value", change.op));
                };
                match self.hash(value.expose()) {
                    Ok(h) => Some(format!("{account}:{h}")),
                    Err(e) => return Outcome::Failed(e),
                }
            }
            // The line is gone already (a redelivery after a crash): removed.
            (Op::Remove, None) => return Outcome::Applied,
            (_, None) => {
                return Outcome::NoSuchUser(format!(
                    "no line for {account} in {}",
                    self.path.display()
                ))
            }
            (Op::Delete, Some(hash)) => {
                let hash = hash.trim_start_matches(LOCK_MARK);
                // No value: every password goes.
                let matches = change.values.is_empty()
                    || change
                        .values
                        .iter()
                        .any(|v| bcrypt::non_truncating_verify(v.expose(), hash).unwrap_or(false));
                if !matches {
                    return Outcome::Applied; // not the current password: nothing to delete
                }
                Some(format!("{account}:{LOCK_MARK}{hash}"))
            }
            (Op::Revoke, Some(hash)) => Some(format!(
                "{account}:{LOCK_MARK}{}",
                hash.trim_start_matches(LOCK_MARK)
            )),
            (Op::Resume, Some(hash)) => {
                Some(format!("{account}:{}", hash.trim_start_matches(LOCK_MARK)))
            }
            (Op::Remove, Some(_)) => None,
            (Op::Lost, _) => return Outcome::Applied,
        };
        match (at, new_line) {
            (Some(i), Some(l)) => lines[i] = l,
            (Some(i), None) => {
                lines.remove(i);
            }
            (None, Some(l)) => lines.push(l),
            (None, None) => return Outcome::Applied,
        }
        match self.write(&lines) {
            Ok(()) => Outcome::Applied,
            Err(e) => Outcome::RetryLater(e),
        }
    }

    fn check(&self) -> Result<(), Unusable> {
        let dir = self.dir();
        if !dir.is_dir() {
            return Err(Unusable::Config(format!(
                "folder {} of the htpasswd file does not exist",
                dir.display()
            )));
        }
        if !(4..=31).contains(&self.cost) {
            return Err(Unusable::Config(format!(
                "bcrypt cost {} is outside 4..=31",
                self.cost
            )));
        }
        Ok(())
    }

    fn limits(&self) -> Limits {
        Limits {
            max_password_bytes: 71,
            longer_passwords:
                "use a target that stores another scheme (LDAP crypt or ssha, PostgreSQL argon2id)",
            password_utf8: false,
            // htpasswd reads a line into 256 bytes: name, `:`, `!` (a lock), the 60-byte hash
            // and the newline must fit, or that line and the ones after it are misread.
            max_account_bytes: 192,
            account_forbidden: &[':'],
            account_edge_spaces: false,
            account_forbidden_first: &['#'],
            ..Limits::text("bcrypt (htpasswd)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::Secret;

    fn target(dir: &Path) -> Htpasswd {
        Htpasswd::new(
            HtpasswdConfig {
                path: dir.join("htpasswd"),
                cost: 4,
            },
            &dir.join("consumer.toml"),
        )
    }

    fn change(op: Op, v: Option<&str>) -> Change {
        Change::new(
            "alice",
            "src",
            op,
            v.map(|v| vec![Secret::from(v)]).unwrap_or_default(),
        )
    }

    fn verifies(t: &Htpasswd, user: &str, pw: &str) -> bool {
        let lines = t.read().unwrap();
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("{user}:")))
            .unwrap();
        bcrypt::verify(pw, &line[user.len() + 1..]).unwrap_or(false)
    }

    #[test]
    fn the_line_changed_is_the_one_apache_reads() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path());
        let old = bcrypt::hash("old", 4).unwrap();
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("# alice:{old}\n  alice:{old}  \n"),
        )
        .unwrap();
        assert_eq!(
            t.apply(&change(Op::Replace, Some("new")), "alice"),
            Outcome::Applied
        );
        let lines = t.read().unwrap();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0], format!("# alice:{old}"), "comments are kept");
        let (name, hash) = apache_entry(&lines[1]).unwrap();
        assert_eq!(name, "alice");
        assert!(bcrypt::verify("new", hash).unwrap());
    }

    #[test]
    fn a_bare_file_name_is_in_the_current_folder() {
        let t = Htpasswd::new(
            HtpasswdConfig {
                path: "htpasswd".into(),
                cost: 4,
            },
            Path::new("consumer.toml"),
        );
        assert_eq!(t.path, Path::new("./htpasswd"));
        assert_eq!(t.dir(), Path::new("."));
        assert!(t.check().is_ok());
        let missing = Htpasswd::new(
            HtpasswdConfig {
                path: "/nonexistent-folder/htpasswd".into(),
                cost: 4,
            },
            Path::new("consumer.toml"),
        );
        assert!(matches!(missing.check(), Err(Unusable::Config(_))));
    }

    #[test]
    fn every_op() {
        let dir = tempfile::tempdir().unwrap();
        let t = target(dir.path());
        std::fs::write(dir.path().join("htpasswd"), "bob:keepme\n").unwrap();
        assert_eq!(
            t.apply(&change(Op::Revoke, None), "alice"),
            Outcome::NoSuchUser(format!(
                "no line for alice in {}",
                dir.path().join("htpasswd").display()
            ))
        );
        assert_eq!(
            t.apply(&change(Op::Replace, Some("one")), "alice"),
            Outcome::Applied
        );
        assert!(verifies(&t, "alice", "one"));
        assert!(t.read().unwrap()[0].starts_with("$2y$") || t.read().unwrap()[1].contains(":$2y$"));
        assert_eq!(
            t.apply(&change(Op::Revoke, None), "alice"),
            Outcome::Applied
        );
        assert!(!verifies(&t, "alice", "one"));
        assert_eq!(
            t.apply(&change(Op::Resume, None), "alice"),
            Outcome::Applied
        );
        assert!(verifies(&t, "alice", "one"));
        assert_eq!(
            t.apply(&change(Op::Delete, Some("other")), "alice"),
            Outcome::Applied
        );
        assert!(verifies(&t, "alice", "one"));
        assert_eq!(
            t.apply(&change(Op::Delete, Some("one")), "alice"),
            Outcome::Applied
        );
        assert!(!verifies(&t, "alice", "one"));
        assert_eq!(
            t.apply(&change(Op::Remove, None), "alice"),
            Outcome::Applied
        );
        assert_eq!(t.read().unwrap(), vec!["bob:keepme".to_string()]);
        // Removing again (a redelivery) is done, not a missing user.
        assert_eq!(
            t.apply(&change(Op::Remove, None), "alice"),
            Outcome::Applied
        );
    }
}
