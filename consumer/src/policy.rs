//! The group's password policy: built from its targets' declared limits and the operator's
//! `[policy]` section, versioned in the state folder, signed with the group key and published
//! for agents (`pwsync_proto::policy` says what a policy is and how agents use it).
//!
//! Each target contributes what it cannot hold (`Limits`: the bytes its scheme reads, UTF-8,
//! forbidden characters) and what its own system refuses as weak (`Limits::quality`); `[policy]`
//! adds the organisation's rules. The version grows only when the rules change: the last one
//! made is kept in `STATE_DIR/policy.last` (postcard), so a restart with the same config
//! republishes the same version, and a config change (a target added, a limit lowered) makes a
//! new one that replaces the old at every agent. The consumer publishes it at every connection
//! and every [`REPUBLISH`] while it runs (agents count its age from the last publication), so an
//! agent or relay that restarts has it again within seconds; the relay keeps the newest one and
//! publishes it too (`pwsync_relay::policies`), for agents that start while no consumer of the
//! group runs.

use crate::targets::Configured;
use pwsync_proto::policy::{PasswordPolicy, Rule, SourcedRule};
use pwsync_proto::GroupName;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a running consumer publishes its policy again.
pub const REPUBLISH: Duration = Duration::from_secs(10);

/// `[policy]`: the organisation's own rules, on top of what the targets need.
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// At least this many characters.
    #[serde(default)]
    pub min_length: Option<u32>,
    /// At most this many characters.
    #[serde(default)]
    pub max_length: Option<u32>,
    /// Characters from at least this many of lower case, upper case, digits, others (1–4).
    #[serde(default)]
    pub classes: Option<u8>,
    /// Refuse passwords that contain the user name.
    #[serde(default)]
    pub forbid_user_name: bool,
    /// Words no password may contain (case aside).
    #[serde(default)]
    pub forbidden_words: Vec<String>,
    /// A file of passwords nobody may use, one a line (case aside; `#` starts a comment line).
    #[serde(default)]
    pub forbidden_list: Option<PathBuf>,
}

/// The rules of the group: every target's, then the operator's. An error names what is wrong.
pub fn rules(
    group: &GroupName,
    cfg: &PolicyConfig,
    targets: &[Configured],
) -> Result<Vec<SourcedRule>, String> {
    let mut out = vec![];
    let mut push = |rule: Rule, source: String| out.push(SourcedRule { rule, source });
    for t in targets {
        let l = &t.limits;
        let name = &t.name;
        push(
            Rule::MaxBytes(l.max_password_bytes as u32),
            format!("{name} stores {}", l.scheme),
        );
        if let Some(units) = l.max_password_utf16_units {
            push(
                Rule::MaxUtf16Units(units as u32),
                format!("{name} stores {}", l.scheme),
            );
        }
        if l.password_utf8 {
            push(
                Rule::Utf8,
                format!("{name} ({}) takes UTF-8 text", l.scheme),
            );
        }
        let (chars, why) = l.password_forbidden;
        if !chars.is_empty() {
            push(
                Rule::ForbiddenChars(chars.to_vec()),
                format!("{name} ({}): {why}", l.scheme),
            );
        }
        let q = l.quality;
        let system = format!("{name} ({})", l.scheme);
        if q.min_chars > 0 {
            push(Rule::MinChars(q.min_chars), system.clone());
        }
        if q.classes > 0 {
            push(Rule::Classes(q.classes), system.clone());
        }
        if q.not_user_name {
            push(Rule::NotUserName, system);
        }
    }
    let ours = format!("the password policy of group {group}");
    if let Some(n) = cfg.min_length {
        push(Rule::MinChars(n), ours.clone());
    }
    if let Some(n) = cfg.max_length {
        push(Rule::MaxChars(n), ours.clone());
    }
    match cfg.classes {
        None => {}
        Some(n @ 1..=4) => push(Rule::Classes(n), ours.clone()),
        Some(n) => return Err(format!("[policy] classes = {n}: give 1 to 4")),
    }
    if cfg.forbid_user_name {
        push(Rule::NotUserName, ours.clone());
    }
    if !cfg.forbidden_words.is_empty() {
        push(
            Rule::ForbiddenWords(
                cfg.forbidden_words
                    .iter()
                    .map(|w| w.to_lowercase())
                    .collect(),
            ),
            ours.clone(),
        );
    }
    if let Some(path) = &cfg.forbidden_list {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "[policy] forbidden_list {}: {e}; give a readable file, one password a line",
                path.display()
            )
        })?;
        let list: Vec<String> = text
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_lowercase)
            .collect();
        push(Rule::ForbiddenPasswords(list), ours);
    }
    Ok(out)
}

/// Why no password could meet `rules` (a minimum above a maximum), when that is so.
pub fn unsatisfiable(group: &GroupName, rules: &[SourcedRule]) -> Option<String> {
    let probe = PasswordPolicy {
        group: group.clone(),
        version: 0,
        issued_ms: 0,
        published_ms: 0,
        rules: rules.to_vec(),
    };
    let contradictions = probe.contradictions();
    (!contradictions.is_empty()).then(|| {
        format!(
            "the password policy cannot be met: {}; change [policy] or the targets",
            contradictions.join("; ")
        )
    })
}

/// The policy to publish: the last one made, when its rules are these, else a new version
/// (kept in `state_dir/policy.last` before it is returned). Contradictions are an error.
pub fn current(
    state_dir: &Path,
    group: &GroupName,
    rules: Vec<SourcedRule>,
    now_ms: u64,
) -> Result<PasswordPolicy, String> {
    if let Some(why) = unsatisfiable(group, &rules) {
        return Err(why);
    }
    let path = state_dir.join("policy.last");
    let last: Option<PasswordPolicy> = std::fs::read(&path)
        .ok()
        .and_then(|b| postcard::from_bytes(&b).ok());
    let policy = match last {
        Some(p) if p.group == *group && p.rules == rules => p,
        last => {
            let version = last.map(|p| p.version + 1).unwrap_or(1).max(now_ms);
            let p = PasswordPolicy {
                group: group.clone(),
                version,
                issued_ms: now_ms,
                published_ms: now_ms,
                rules,
            };
            let bytes = postcard::to_allocvec(&p).map_err(|e| e.to_string())?;
            let tmp = state_dir.join("policy.last.tmp");
            std::fs::write(&tmp, bytes)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            tracing::info!(%group, version, rules = p.rules.len(), "a new password policy version");
            p
        }
    };
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_operators_rules_come_from_policy_and_its_list_file() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("forbidden.txt");
        std::fs::write(&list, "# common ones\nSummer2026!\n\nWinter2026!\n").unwrap();
        let g = GroupName::new("g1").unwrap();
        let cfg = PolicyConfig {
            min_length: Some(12),
            classes: Some(3),
            forbidden_words: vec!["ACME".into()],
            forbidden_list: Some(list),
            ..PolicyConfig::default()
        };
        let p = PasswordPolicy {
            group: g.clone(),
            version: 1,
            issued_ms: 0,
            published_ms: 0,
            rules: rules(&g, &cfg, &[]).unwrap(),
        };
        let why = |pw: &str| p.check("u", pw.as_bytes()).err().unwrap_or_default();
        assert!(why("summer2026!").contains("at least 12"));
        assert!(why("SUMMER2026!xyz").is_empty());
        assert!(why("Winter2026!").contains("at least 12"));
        let short_list = PolicyConfig {
            forbidden_list: Some(dir.path().join("forbidden.txt")),
            ..PolicyConfig::default()
        };
        let p2 = PasswordPolicy {
            rules: rules(&g, &short_list, &[]).unwrap(),
            ..p.clone()
        };
        assert!(p2
            .check("u", b"WINTER2026!")
            .unwrap_err()
            .contains("forbidden passwords"));
        assert!(why("Best-acme-pw-12").contains("forbidden word"));
        let missing = PolicyConfig {
            forbidden_list: Some(dir.path().join("nope.txt")),
            ..PolicyConfig::default()
        };
        assert!(rules(&g, &missing, &[]).unwrap_err().contains("nope.txt"));
        let bad = PolicyConfig {
            classes: Some(5),
            ..PolicyConfig::default()
        };
        assert!(rules(&g, &bad, &[]).unwrap_err().contains("1 to 4"));
    }

    #[test]
    fn the_version_moves_only_when_the_rules_change() {
        let dir = tempfile::tempdir().unwrap();
        let g = GroupName::new("g1").unwrap();
        let r = |n| {
            vec![SourcedRule {
                rule: Rule::MinChars(n),
                source: "x".into(),
            }]
        };
        let a = current(dir.path(), &g, r(8), 1000).unwrap();
        let b = current(dir.path(), &g, r(8), 5000).unwrap();
        assert_eq!(a.version, b.version);
        let c = current(dir.path(), &g, r(9), 900).unwrap();
        assert!(c.version > a.version);
        let bad = vec![
            SourcedRule {
                rule: Rule::MinChars(80),
                source: "ops".into(),
            },
            SourcedRule {
                rule: Rule::MaxBytes(72),
                source: "web stores bcrypt".into(),
            },
        ];
        let e = current(dir.path(), &g, bad, 6000).unwrap_err();
        assert!(e.contains("cannot be met"), "{e}");
    }
}
