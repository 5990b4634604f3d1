//! The consumer groups' password policies, kept by the relay so agents get them while a group's
//! consumers are down (`pwsync_proto::policy`).
//!
//! A group publishes its signed policy on `pwsync/v1/policy/GROUP`; the relay takes one that
//! verifies with that group's key and that agents take too, by the one rule both follow
//! ([`PasswordPolicy::acceptance`]: satisfiable, not ahead of the clock, a higher version or the
//! same one published again later), keeps its signed bytes in `JOURNAL_DIR/policy-GROUP.signed`
//! (mode 0600, verified again at start), and publishes what it holds again every
//! [`REPUBLISH`]. Agents verify each copy themselves: the relay adds availability, not trust.

use pwsync_proto::policy::{Acceptance, PasswordPolicy};
use pwsync_proto::{GroupName, VerifyingKey};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the relay publishes the policies it holds.
pub const REPUBLISH: Duration = Duration::from_secs(10);

struct Held {
    policy: PasswordPolicy,
    bytes: Vec<u8>,
}

pub struct Policies {
    dir: PathBuf,
    held: BTreeMap<GroupName, Held>,
}

fn file(dir: &Path, group: &GroupName) -> PathBuf {
    dir.join(format!("policy-{group}.signed"))
}

impl Policies {
    /// The policies kept in `dir` that still verify with their group's key.
    pub fn open<'a>(
        dir: &Path,
        groups: impl IntoIterator<Item = (&'a GroupName, &'a VerifyingKey)>,
    ) -> Policies {
        let mut held = BTreeMap::new();
        for (group, key) in groups {
            let path = file(dir, group);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match pwsync_proto::signed::verify::<PasswordPolicy>(&bytes, key) {
                Ok(p) if p.group == *group => {
                    held.insert(group.clone(), Held { policy: p, bytes });
                }
                _ => {
                    tracing::warn!(path = %path.display(), "a kept password policy does not verify with its group's key; ignored")
                }
            }
        }
        Policies {
            dir: dir.to_path_buf(),
            held,
        }
    }

    /// The groups changed (a reload): what is kept on disk for `groups` is held again, with
    /// their keys now; a removed group's policy is no longer published.
    pub fn regroup<'a>(
        &mut self,
        groups: impl IntoIterator<Item = (&'a GroupName, &'a VerifyingKey)>,
    ) {
        *self = Policies::open(&self.dir.clone(), groups);
    }

    /// Takes `bytes`, published for `group`, when it verifies with `key` and is newer than the
    /// policy held. Whether it was taken.
    pub fn offer(&mut self, group: &GroupName, key: &VerifyingKey, bytes: &[u8]) -> bool {
        let p = match pwsync_proto::signed::verify::<PasswordPolicy>(bytes, key) {
            Ok(p) if p.group == *group => p,
            _ => {
                metrics::counter!("pwsync_relay_policy_messages_total", "outcome" => "bad_signature")
                    .increment(1);
                tracing::warn!(%group, "a password policy that does not verify with the group's key; ignored");
                return false;
            }
        };
        let acceptance = p.acceptance(
            self.held.get(group).map(|h| &h.policy),
            pwsync_proto::hlc::wall_ms(),
        );
        metrics::counter!("pwsync_relay_policy_messages_total", "outcome" => acceptance.as_str())
            .increment(1);
        if !acceptance.holds() {
            // A replay is routine (another relay's older copy, a late republication) and only
            // counted; what a group's key should never have signed is logged.
            if matches!(
                acceptance,
                Acceptance::Unsatisfiable | Acceptance::FromTheFuture
            ) {
                tracing::warn!(%group, outcome = acceptance.as_str(), "a password policy message ignored");
            }
            return false;
        }
        if let Err(e) = self.keep(group, bytes) {
            tracing::warn!(%group, error = %e, "cannot keep the password policy on disk");
        }
        self.held.insert(
            group.clone(),
            Held {
                policy: p,
                bytes: bytes.to_vec(),
            },
        );
        true
    }

    fn keep(&self, group: &GroupName, bytes: &[u8]) -> std::io::Result<()> {
        pwsync_runtime::replace_private(&file(&self.dir, group), bytes)
    }

    /// What to publish: each held policy's topic and signed bytes.
    pub fn all(&self) -> Vec<(String, Vec<u8>)> {
        self.held
            .iter()
            .map(|(g, h)| (pwsync_proto::topics::policy(g), h.bytes.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::policy::{Rule, SourcedRule};
    use pwsync_proto::SigningKey;

    fn signed(key: &SigningKey, version: u64, published_ms: u64) -> Vec<u8> {
        let p = PasswordPolicy {
            group: GroupName::new("g1").unwrap(),
            version,
            issued_ms: 0,
            published_ms,
            rules: vec![SourcedRule {
                rule: Rule::MinChars(8),
                source: "x".into(),
            }],
        };
        pwsync_proto::signed::sign(&p, key).unwrap()
    }

    #[test]
    fn keeps_the_newest_genuine_policy_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let g = GroupName::new("g1").unwrap();
        let vk = key.verifying_key();
        let mut p = Policies::open(dir.path(), [(&g, &vk)]);
        assert!(p.all().is_empty());
        assert!(!p.offer(&g, &vk, &signed(&SigningKey::generate().unwrap(), 9, 9)));
        assert!(p.offer(&g, &vk, &signed(&key, 2, 100)));
        assert!(!p.offer(&g, &vk, &signed(&key, 1, 500)));
        assert!(!p.offer(&g, &vk, &signed(&key, 2, 100)));
        assert!(p.offer(&g, &vk, &signed(&key, 2, 200)));
        let again = Policies::open(dir.path(), [(&g, &vk)]);
        assert_eq!(
            again.all(),
            vec![("pwsync/v1/policy/g1".to_string(), signed(&key, 2, 200))]
        );
    }
}
