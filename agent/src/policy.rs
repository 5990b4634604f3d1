//! The password policies this agent enforces where the person types the password: one per
//! consumer group named in `[policy] groups`, signed by that group (`pwsync_proto::policy`).
//!
//! A policy arrives on `pwsync/v1/policy/GROUP` ([`Policies::offer`]); it is taken only when it
//! verifies with that group's key from the config and its version is above the one held (an
//! older version is a replay, ignored and counted, as is an earlier publication of the held
//! one; the same version published again only refreshes its age, and a copy of a publication
//! already taken, as the relay republishes it, changes nothing). What is held is kept as the
//! signed bytes in `SPOOL_DIR/policy/` (mode 0600, verified again when read), so a restarted
//! agent enforces at once.
//!
//! [`Policies::check`] passes a password only when every configured group's policy passes it.
//! When a group's policy is missing or older than `max_age_secs` (counted from the group's last
//! publication), the policy is *unavailable*: a deniable user is refused ("password policy
//! unavailable"), an undeniable one (`undeniable` patterns, default `root`) passes and is logged,
//! as Safeguard's password-quality exit does when it gets no answer. No `[policy]` section: no
//! policy is enforced at all (as before policies existed).

use glob::Pattern;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::policy::{Acceptance, PasswordPolicy};
use pwsync_proto::{GroupName, VerifyingKey};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// `[policy]`: which groups' password policies this agent enforces.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Each group whose policy is enforced, with its public key (the consumer's
    /// `group_signing_key`'s `.pub`).
    pub groups: BTreeMap<GroupName, PathBuf>,
    /// A policy not published again within this many seconds is stale. Default 86400 (a day).
    #[serde(default = "default_max_age")]
    pub max_age_secs: u64,
    /// Users (shell patterns) whose password changes go ahead, logged, while a policy is
    /// unavailable; everybody else is refused then. Default `["root"]`.
    #[serde(default = "default_undeniable")]
    pub undeniable: Vec<String>,
}

fn default_max_age() -> u64 {
    86_400
}

fn default_undeniable() -> Vec<String> {
    vec!["root".into()]
}

/// What became of a policy message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// A new version, now enforced.
    Taken,
    /// The version held, published again: its age starts over.
    Refreshed,
    /// A copy of a publication already taken (the group's and the relay's): nothing to do.
    Repeated,
    /// An older version, or the held one with other content: ignored.
    Replayed,
    /// Not signed by the group's key (or not a policy of that group): ignored.
    BadSignature,
    /// A group this agent does not enforce: ignored.
    UnknownGroup,
    /// Rules no password can keep: ignored.
    Unsatisfiable,
    /// A version or time too far ahead of this host's clock: ignored.
    FromTheFuture,
}

impl Offered {
    pub fn as_str(self) -> &'static str {
        match self {
            Offered::Taken => "taken",
            Offered::Refreshed => "refreshed",
            Offered::Repeated => "repeated",
            Offered::Replayed => "replayed",
            Offered::BadSignature => "bad_signature",
            Offered::UnknownGroup => "unknown_group",
            Offered::Unsatisfiable => "unsatisfiable",
            Offered::FromTheFuture => "from_the_future",
        }
    }
}

const OFFERED: [Offered; 8] = [
    Offered::Taken,
    Offered::Refreshed,
    Offered::Repeated,
    Offered::Replayed,
    Offered::BadSignature,
    Offered::UnknownGroup,
    Offered::Unsatisfiable,
    Offered::FromTheFuture,
];

/// A password's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Refused: the reason names the rule and where it came from, never the password.
    Refused(String),
}

pub struct Policies {
    dir: PathBuf,
    /// From `[policy]`; replaced whole by [`Policies::reconfigure`].
    settings: RwLock<Settings>,
    held: Mutex<BTreeMap<GroupName, PasswordPolicy>>,
    counts: [AtomicU64; 8],
}

/// What `[policy]` says, checked.
struct Settings {
    keys: BTreeMap<GroupName, VerifyingKey>,
    max_age_ms: u64,
    undeniable: Vec<Pattern>,
}

impl Settings {
    /// `None` (no `[policy]`): no group, every password passes.
    fn of(cfg: Option<&PolicyConfig>) -> Result<Settings, String> {
        let mut keys = BTreeMap::new();
        let Some(cfg) = cfg else {
            return Ok(Settings {
                keys,
                max_age_ms: default_max_age().saturating_mul(1000),
                undeniable: vec![],
            });
        };
        for (group, path) in &cfg.groups {
            let key = VerifyingKey::load(path)
                .map_err(|e| format!("[policy] groups.{group}: {}: {e}", path.display()))?;
            keys.insert(group.clone(), key);
        }
        let undeniable = cfg
            .undeniable
            .iter()
            .map(|p| Pattern::new(p).map_err(|e| format!("[policy] undeniable {p:?}: {e}")))
            .collect::<Result<_, _>>()?;
        Ok(Settings {
            keys,
            max_age_ms: cfg.max_age_secs.saturating_mul(1000),
            undeniable,
        })
    }
}

impl Policies {
    /// Loads the group keys (none without `[policy]`) and the policies kept in `dir`.
    pub fn open(cfg: Option<&PolicyConfig>, dir: &Path) -> Result<Policies, String> {
        let settings = Settings::of(cfg)?;
        pwsync_runtime::private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let p = Policies {
            dir: dir.to_path_buf(),
            settings: RwLock::new(Settings {
                keys: BTreeMap::new(),
                max_age_ms: 0,
                undeniable: vec![],
            }),
            held: Mutex::new(BTreeMap::new()),
            counts: Default::default(),
        };
        p.take_settings(settings);
        Ok(p)
    }

    /// Takes a reloaded `[policy]`: the groups it names from now on (each group's kept policy
    /// read from the folder when it was not held), their keys, the age limit and the undeniable
    /// users. A section that does not load is refused whole and the running one stays.
    pub fn reconfigure(&self, cfg: Option<&PolicyConfig>) -> Result<(), String> {
        self.take_settings(Settings::of(cfg)?);
        Ok(())
    }

    fn take_settings(&self, settings: Settings) {
        // Always settings before held (as `check` and `held` take them): no deadlock.
        let mut current = self.settings.write().unwrap_or_else(|e| e.into_inner());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // A group's policy is held only under the key that signed it.
        held.retain(|group, _| {
            current.keys.get(group).map(|k| k.key_id())
                == settings.keys.get(group).map(|k| k.key_id())
        });
        for (group, key) in &settings.keys {
            if held.contains_key(group) {
                continue;
            }
            let path = self.dir.join(format!("{group}.signed"));
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match pwsync_proto::signed::verify::<PasswordPolicy>(&bytes, key) {
                Ok(p) if p.group == *group => {
                    held.insert(group.clone(), p);
                }
                _ => {
                    tracing::warn!(path = %path.display(), "a kept password policy does not verify with the group's key; ignored")
                }
            }
        }
        drop(held);
        *current = settings;
    }

    fn settings(&self) -> std::sync::RwLockReadGuard<'_, Settings> {
        self.settings.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The topics to subscribe to: one per enforced group.
    pub fn topics(&self) -> Vec<String> {
        self.settings()
            .keys
            .keys()
            .map(pwsync_proto::topics::policy)
            .collect()
    }

    /// Takes a policy message published for `group` when it is genuine and newer.
    pub fn offer(&self, group: &GroupName, bytes: &[u8]) -> Offered {
        let outcome = self.offer_inner(group, bytes);
        self.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        metrics::counter!("pwsync_agent_policy_messages_total", "outcome" => outcome.as_str())
            .increment(1);
        match outcome {
            Offered::Taken => tracing::info!(%group, "a new password policy taken"),
            Offered::Refreshed | Offered::Repeated => {}
            other => {
                tracing::warn!(%group, outcome = other.as_str(), "a password policy message ignored")
            }
        }
        outcome
    }

    fn offer_inner(&self, group: &GroupName, bytes: &[u8]) -> Offered {
        let Some(key) = self.settings().keys.get(group).cloned() else {
            return Offered::UnknownGroup;
        };
        let p = match pwsync_proto::signed::verify::<PasswordPolicy>(bytes, &key) {
            Ok(p) if p.group == *group => p,
            _ => return Offered::BadSignature,
        };
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        // The one rule the relay follows too (`pwsync_proto::policy`).
        let outcome = match p.acceptance(held.get(group), wall_ms()) {
            Acceptance::Taken => Offered::Taken,
            Acceptance::Refreshed => Offered::Refreshed,
            Acceptance::Repeated => return Offered::Repeated,
            Acceptance::Replayed => return Offered::Replayed,
            Acceptance::Unsatisfiable => return Offered::Unsatisfiable,
            Acceptance::FromTheFuture => return Offered::FromTheFuture,
        };
        if let Err(e) = self.keep(group, bytes) {
            tracing::warn!(%group, error = %e, "cannot keep the password policy on disk");
        }
        held.insert(group.clone(), p);
        outcome
    }

    /// Writes the signed bytes of `group`'s policy (replaced whole, mode 0600).
    fn keep(&self, group: &GroupName, bytes: &[u8]) -> std::io::Result<()> {
        pwsync_runtime::replace_private(&self.dir.join(format!("{group}.signed")), bytes)
    }

    /// Whether `user`'s new `password` may be set now.
    pub fn check(&self, user: &str, password: &[u8], now_ms: u64) -> Verdict {
        let settings = self.settings();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut unavailable = vec![];
        for group in settings.keys.keys() {
            match held.get(group) {
                None => unavailable.push(format!("none received from group {group}")),
                Some(p) if now_ms.saturating_sub(p.published_ms) > settings.max_age_ms => {
                    unavailable.push(format!(
                        "group {group}'s is {} s old (max_age_secs {})",
                        now_ms.saturating_sub(p.published_ms) / 1000,
                        settings.max_age_ms / 1000
                    ))
                }
                Some(p) => {
                    if let Err(why) = p.check(user, password) {
                        return Verdict::Refused(why);
                    }
                }
            }
        }
        if unavailable.is_empty() {
            return Verdict::Pass;
        }
        let why = unavailable.join("; ");
        if settings.undeniable.iter().any(|p| p.matches(user)) {
            tracing::warn!(user = ?pwsync_proto::untrusted::Untrusted(user), why, "password policy unavailable; an undeniable user's change goes ahead unchecked");
            return Verdict::Pass;
        }
        Verdict::Refused(format!(
            "password policy unavailable ({why}); try again later"
        ))
    }

    /// The policies held, by group (`None`: none yet).
    pub fn held(&self) -> Vec<(GroupName, Option<PasswordPolicy>)> {
        let settings = self.settings();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        settings
            .keys
            .keys()
            .map(|g| (g.clone(), held.get(g).cloned()))
            .collect()
    }

    /// What became of policy messages, by outcome.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        OFFERED
            .iter()
            .map(|o| (o.as_str(), self.counts[*o as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::policy::{Rule, SourcedRule};
    use pwsync_proto::SigningKey;

    fn signed(key: &SigningKey, version: u64, published_ms: u64, min: u32) -> Vec<u8> {
        let p = PasswordPolicy {
            group: GroupName::new("g1").unwrap(),
            version,
            issued_ms: 1,
            published_ms,
            rules: vec![SourcedRule {
                rule: Rule::MinChars(min),
                source: "the password policy of group g1".into(),
            }],
        };
        pwsync_proto::signed::sign(&p, key).unwrap()
    }

    #[test]
    fn takes_newer_versions_only_and_refuses_while_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let pubfile = dir.path().join("g1.pub");
        key.verifying_key().save(&pubfile).unwrap();
        let cfg = PolicyConfig {
            groups: [(GroupName::new("g1").unwrap(), pubfile)].into(),
            max_age_secs: 60,
            undeniable: vec!["root".into(), "break-*".into()],
        };
        let store = dir.path().join("policy");
        let p = Policies::open(Some(&cfg), &store).unwrap();
        let g = GroupName::new("g1").unwrap();
        // Nothing yet: deniable refused, undeniable passes.
        assert!(
            matches!(p.check("alice", b"x", 0), Verdict::Refused(r) if r.contains("unavailable"))
        );
        assert_eq!(p.check("break-glass", b"x", 0), Verdict::Pass);
        assert_eq!(
            p.offer(&g, &signed(&other, 5, 1000, 8)),
            Offered::BadSignature
        );
        assert_eq!(
            p.offer(&GroupName::new("g2").unwrap(), &signed(&key, 5, 1000, 8)),
            Offered::UnknownGroup
        );
        assert_eq!(p.offer(&g, &signed(&key, 5, 1000, 8)), Offered::Taken);
        assert!(
            matches!(p.check("alice", b"short", 2000), Verdict::Refused(r) if r == "at least 8 characters: the password policy of group g1")
        );
        assert_eq!(p.check("alice", b"long-enough", 2000), Verdict::Pass);
        assert_eq!(p.offer(&g, &signed(&key, 4, 9000, 2)), Offered::Replayed);
        assert_eq!(p.offer(&g, &signed(&key, 5, 9000, 2)), Offered::Replayed);
        assert_eq!(p.offer(&g, &signed(&key, 5, 30_000, 8)), Offered::Refreshed);
        // The relay's copy of that publication; an earlier publication of the same version.
        assert_eq!(p.offer(&g, &signed(&key, 5, 30_000, 8)), Offered::Repeated);
        assert_eq!(p.offer(&g, &signed(&key, 5, 500, 8)), Offered::Replayed);
        // Stale after max_age_secs from the last publication.
        assert_eq!(p.check("alice", b"long-enough", 90_000), Verdict::Pass);
        assert!(
            matches!(p.check("alice", b"long-enough", 91_000), Verdict::Refused(r) if r.contains("s old"))
        );
        // Kept across a restart.
        let again = Policies::open(Some(&cfg), &store).unwrap();
        assert_eq!(again.held()[0].1.as_ref().map(|p| p.version), Some(5));
        let counts: BTreeMap<_, _> = p.counts().into_iter().collect();
        assert_eq!(counts["replayed"], 3);
        assert_eq!(counts["repeated"], 1);
        assert_eq!(counts["bad_signature"], 1);
    }
}
