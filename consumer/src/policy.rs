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
//!
//! The consumer also reads its group's policy topic, and what agents would hold instead of its
//! own policy it replaces at once ([`on_seen`]): a newer version with other rules (signed by
//! mistake with the group key, made by a consumer whose clock ran ahead, or from a state folder
//! restored from an older backup) is superseded by a version above it; a newer one with the
//! same rules (another instance of the group) is adopted. So a mistaken policy lasts seconds,
//! with no new key and no hand-editing; only a leaked key needs a new one.
//!
//! A target whose own system has password rules (an AD domain's policy and its fine-grained
//! policies, a KDC's policies) has them read by its [`PolicyReader`] at start and every
//! `[policy] refresh_secs` ([`Sources::refresh`]); what the system says replaces the target's
//! declared [`crate::targets::Quality`], and rules of some accounts only are published scoped to
//! the users those accounts are (after the target's `map`). A read that fails keeps the last
//! one. Rules no agent can check (history, minimum age) stay the system's own: a change they
//! refuse is a dead letter in the system's words.

use crate::targets::{Accounts, Configured, Limits, PolicyReader, Routing, SystemRule};
use pwsync_proto::policy::{PasswordPolicy, Rule, Scope, SourcedRule};
use pwsync_proto::GroupName;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a running consumer publishes its policy again.
pub const REPUBLISH: Duration = Duration::from_secs(10);

/// The shortest time between two supersedings: two consumers of one group with different
/// rules would otherwise supersede each other without end.
pub const SUPERSEDE_EVERY: Duration = Duration::from_secs(60);

/// What a consumer holding `ours` does on seeing `seen` on its group's policy topic (verified
/// with the group's key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSeen {
    /// Nothing: its own (echoed), an older one, or one no agent takes.
    Nothing,
    /// Agents would hold this newer version with our rules: publish ours as that version.
    Adopt(u64),
    /// Agents would hold other rules than ours: make this version, above the one seen.
    Supersede(u64),
}

/// The rule of [`OnSeen`]: what agents would do with `seen` while they hold `ours` decides
/// ([`PasswordPolicy::acceptance`], the rule agents and relays follow).
pub fn on_seen(seen: &PasswordPolicy, ours: &PasswordPolicy, now_ms: u64) -> OnSeen {
    use pwsync_proto::policy::Acceptance;
    if seen.group != ours.group {
        return OnSeen::Nothing;
    }
    let above = seen.version.saturating_add(1).max(now_ms);
    match seen.acceptance(Some(ours), now_ms) {
        Acceptance::Taken if seen.rules == ours.rules => OnSeen::Adopt(seen.version),
        Acceptance::Taken => OnSeen::Supersede(above),
        // The same version with other rules: agents that saw it first hold it.
        Acceptance::Replayed if seen.version == ours.version && seen.rules != ours.rules => {
            OnSeen::Supersede(above)
        }
        _ => OnSeen::Nothing,
    }
}

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
    /// Seconds between reads of the targets' own systems' rules. Default 300.
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
}

fn default_refresh() -> u64 {
    300
}

/// What the policy needs of one target: its limits, its routing (to name the users a rule of
/// some accounts binds), and what its own system says once read.
pub struct Source {
    pub name: String,
    pub limits: Limits,
    pub routing: Routing,
    reader: Option<Box<dyn PolicyReader>>,
    /// What the reader last read (kept when a later read fails).
    pub read: Option<Vec<SystemRule>>,
}

/// Every target's [`Source`].
pub struct Sources(pub Vec<Source>);

impl Sources {
    pub fn of(targets: &[Configured]) -> Sources {
        Sources(
            targets
                .iter()
                .map(|t| Source {
                    name: t.name.clone(),
                    limits: t.limits.clone(),
                    routing: t.routing.clone(),
                    reader: t.target.policy_reader(),
                    read: None,
                })
                .collect(),
        )
    }

    /// Forgets what the systems said: their targets' declared rules stand in again (when what
    /// they said cannot make a policy).
    pub fn forget_reads(&mut self) {
        for s in &mut self.0 {
            s.read = None;
        }
    }

    /// Reads every target system's rules again: the targets it could not read, with why (their
    /// last read stands).
    pub fn refresh(&mut self) -> Vec<(String, String)> {
        let mut failed = vec![];
        for s in &mut self.0 {
            let Some(reader) = &s.reader else { continue };
            match reader.read() {
                Ok(rules) => s.read = Some(rules),
                Err(e) => failed.push((s.name.clone(), e)),
            }
        }
        failed
    }
}

/// The users `accounts` names on a target with `routing`: each account's own name (unless the
/// `map` sends that user elsewhere) and every user the `map` sends to it, under the target's
/// name folding.
fn users(routing: &Routing, limits: &Limits, accounts: &[String]) -> Vec<String> {
    let mut out = vec![];
    for a in accounts {
        if limits.folding.same(&routing.account(a), a) {
            out.push(a.clone());
        }
        out.extend(
            routing
                .mapped()
                .filter(|(_, to)| limits.folding.same(to, a))
                .map(|(user, _)| user.clone()),
        );
    }
    out
}
/// The rules of the group: every target's, then the operator's. An error names what is wrong.
pub fn rules(
    group: &GroupName,
    cfg: &PolicyConfig,
    targets: &Sources,
) -> Result<Vec<SourcedRule>, String> {
    let mut out = vec![];
    let mut push = |rule: Rule, source: String| out.push(SourcedRule { rule, source });
    for t in &targets.0 {
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
        if let Some(read) = &t.read {
            for r in read {
                let rule = match &r.accounts {
                    Accounts::All => r.rule.clone(),
                    Accounts::Only(a) => Rule::Scoped {
                        scope: Scope::only(users(&t.routing, l, a)),
                        rule: Box::new(r.rule.clone()),
                    },
                    Accounts::AllBut(a) => Rule::Scoped {
                        scope: Scope::all_but(users(&t.routing, l, a)),
                        rule: Box::new(r.rule.clone()),
                    },
                };
                push(rule, format!("{name}: {}", r.source));
            }
            continue;
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

/// `rules`, made to fit one signed policy ([`pwsync_proto::policy::MAX_RULES`] rules, the
/// list bytes): when they do not, every scoped rule is put in its unscoped form (binding every
/// user: stricter, never laxer), and of those the strictest minimum length and number of
/// classes of each source are kept. A domain with many fine-grained policies or users under
/// them, or a realm with many KDC policies, then still has a policy, warned about.
pub fn fit(group: &GroupName, rules: Vec<SourcedRule>) -> Vec<SourcedRule> {
    use pwsync_proto::signed::SignedMessage;
    let probe = |rules: &[SourcedRule]| PasswordPolicy {
        group: group.clone(),
        version: 0,
        issued_ms: 0,
        published_ms: 0,
        rules: rules.to_vec(),
    };
    let Err(why) = probe(&rules).validate() else {
        return rules;
    };
    tracing::warn!(error = %why, "the targets' systems' rules do not fit one policy: rules of some users are published for every user");
    let mut out: Vec<SourcedRule> = vec![];
    for r in rules {
        let (rule, scope) = r.rule.unscoped();
        if scope.is_none() {
            out.push(r);
            continue;
        }
        // The source without the fine-grained part's own name: one entry per target.
        let source = format!(
            "{} (for some users)",
            r.source.split(':').next().unwrap_or_default()
        );
        let stricter = |old: &Rule| match (old, rule) {
            (Rule::MinChars(a), Rule::MinChars(b)) => Some(Rule::MinChars(*a.max(b))),
            (Rule::Classes(a), Rule::Classes(b)) => Some(Rule::Classes(*a.max(b))),
            (a, b) if a == b => Some(a.clone()),
            _ => None,
        };
        match out
            .iter_mut()
            .find(|o| o.source == source && stricter(&o.rule).is_some())
        {
            Some(o) => o.rule = stricter(&o.rule).unwrap_or_else(|| o.rule.clone()),
            None => out.push(SourcedRule {
                rule: rule.clone(),
                source,
            }),
        }
    }
    out
}

/// The policy to publish: the last one made, when its rules are these, else a new version
/// (kept in `state_dir/policy.last` before it is returned). Rules that do not fit one policy
/// are coarsened first ([`fit`]); contradictions are an error.
pub fn current(
    state_dir: &Path,
    group: &GroupName,
    rules: Vec<SourcedRule>,
    now_ms: u64,
) -> Result<PasswordPolicy, String> {
    let rules = fit(group, rules);
    if let Some(why) = unsatisfiable(group, &rules) {
        return Err(why);
    }
    {
        use pwsync_proto::signed::SignedMessage;
        let probe = PasswordPolicy {
            group: group.clone(),
            version: 0,
            issued_ms: 0,
            published_ms: 0,
            rules: rules.clone(),
        };
        probe.validate().map_err(|e| {
            format!("the password policy cannot be published: {e}; shorten [policy] forbidden_words or forbidden_list")
        })?;
    }
    let last: Option<PasswordPolicy> = std::fs::read(state_dir.join("policy.last"))
        .ok()
        .and_then(|b| postcard::from_bytes(&b).ok());
    // A last version made with a clock far ahead would make every later one "from the future"
    // to agents and relays: start again from this clock (a version the agents hold above it
    // is superseded when it is seen, `MqttSide`).
    let ahead = |p: &PasswordPolicy| {
        p.version > now_ms.saturating_add(pwsync_proto::policy::AHEAD_TOLERANCE_MS)
    };
    match last {
        Some(p) if p.group == *group && p.rules == rules && !ahead(&p) => Ok(p),
        last => {
            let after = match &last {
                Some(p) if ahead(p) => {
                    tracing::warn!(%group, version = p.version, "the last password policy version was made with a clock more than 10 minutes ahead of this one; versions start again from this clock");
                    0
                }
                Some(p) => p.version,
                None => 0,
            };
            let p = remake(
                state_dir,
                group,
                rules,
                after.saturating_add(1).max(now_ms),
                now_ms,
            )?;
            tracing::info!(%group, version = p.version, rules = p.rules.len(), "a new password policy version");
            Ok(p)
        }
    }
}

/// Makes `version` of the group's policy with `rules`, kept in `state_dir/policy.last` before
/// it is returned (so a restart publishes it again, and later versions follow it).
pub fn remake(
    state_dir: &Path,
    group: &GroupName,
    rules: Vec<SourcedRule>,
    version: u64,
    now_ms: u64,
) -> Result<PasswordPolicy, String> {
    let p = PasswordPolicy {
        group: group.clone(),
        version,
        issued_ms: now_ms,
        published_ms: now_ms,
        rules,
    };
    let bytes = postcard::to_allocvec(&p).map_err(|e| e.to_string())?;
    let path = state_dir.join("policy.last");
    // Unique: the refresher thread and the MQTT side may both make a version.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = state_dir.join(format!("policy.last.tmp{n}"));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(p)
}

/// The thread that reads the targets' systems again every `refresh_secs` and sends a new
/// policy version when their rules changed. It ends when the returned guard is dropped or
/// nobody receives any more.
pub fn keep_refreshing(
    mut sources: Sources,
    group: GroupName,
    cfg: PolicyConfig,
    state_dir: PathBuf,
    tx: tokio::sync::watch::Sender<PasswordPolicy>,
) -> std::io::Result<Refresher> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let every = Duration::from_secs(cfg.refresh_secs.max(1));
    let readers = sources.0.iter().any(|s| s.reader.is_some());
    std::thread::Builder::new()
        .name("policy-refresh".into())
        .spawn(move || {
            let mut failing: std::collections::BTreeSet<String> = Default::default();
            while readers && !tx.is_closed() {
                let started = std::time::Instant::now();
                while started.elapsed() < every {
                    if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200).min(every));
                }
                let failed = sources.refresh();
                for (target, why) in &failed {
                    if failing.insert(target.clone()) {
                        tracing::warn!(%target, error = %why, "cannot read the target system's password rules; the last ones read stand");
                    }
                }
                failing.retain(|t| failed.iter().any(|(f, _)| f == t));
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis() as u64;
                match rules(&group, &cfg, &sources)
                    .and_then(|r| current(&state_dir, &group, r, now_ms))
                {
                    // A reload may have replaced this thread while it read: then its rules
                    // are the old config's, and the new thread's stand.
                    Ok(_) if stopped.load(std::sync::atomic::Ordering::Relaxed) => return,
                    Ok(p) if p.version != tx.borrow().version => {
                        let _ = tx.send(p);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "the group's password policy as the targets' systems now say cannot be made; the last one stands")
                    }
                }
            }
        })?;
    Ok(Refresher(stop))
}

/// Stops the [`keep_refreshing`] thread when dropped.
pub struct Refresher(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Refresher {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
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
            rules: rules(&g, &cfg, &Sources(vec![])).unwrap(),
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
            rules: rules(&g, &short_list, &Sources(vec![])).unwrap(),
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
        assert!(rules(&g, &missing, &Sources(vec![]))
            .unwrap_err()
            .contains("nope.txt"));
        let bad = PolicyConfig {
            classes: Some(5),
            ..PolicyConfig::default()
        };
        assert!(rules(&g, &bad, &Sources(vec![]))
            .unwrap_err()
            .contains("1 to 4"));
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
        // A version made while the clock ran far ahead does not drag later ones into the
        // future: they start again from the clock.
        let now = 1_800_000_000_000;
        let tolerance = pwsync_proto::policy::AHEAD_TOLERANCE_MS;
        let ahead = current(dir.path(), &g, r(10), now + 2 * tolerance).unwrap();
        assert_eq!(ahead.version, now + 2 * tolerance);
        assert_eq!(current(dir.path(), &g, r(10), now).unwrap().version, now);
        assert_eq!(
            current(dir.path(), &g, r(10), now + 5).unwrap().version,
            now
        );
        let near = current(dir.path(), &g, r(11), now + tolerance).unwrap();
        assert_eq!(
            current(dir.path(), &g, r(12), now).unwrap().version,
            near.version + 1
        );
    }

    #[test]
    fn a_policy_agents_would_hold_instead_of_ours_is_superseded_or_adopted() {
        let g = GroupName::new("g1").unwrap();
        let now = 1_800_000_000_000;
        let at = |version: u64, n: u32| PasswordPolicy {
            group: g.clone(),
            version,
            issued_ms: version.min(now),
            published_ms: now,
            rules: vec![SourcedRule {
                rule: Rule::MinChars(n),
                source: "x".into(),
            }],
        };
        let ours = at(now - 1000, 10);
        assert_eq!(on_seen(&ours, &ours, now), OnSeen::Nothing, "our own echo");
        assert_eq!(on_seen(&at(now - 2000, 30), &ours, now), OnSeen::Nothing);
        let mistaken = now + 5 * 60 * 1000;
        assert_eq!(
            on_seen(&at(mistaken, 30), &ours, now),
            OnSeen::Supersede(mistaken + 1)
        );
        assert_eq!(
            on_seen(&at(now - 500, 30), &ours, now),
            OnSeen::Supersede(now)
        );
        assert_eq!(
            on_seen(&at(now - 500, 10), &ours, now),
            OnSeen::Adopt(now - 500)
        );
        assert_eq!(
            on_seen(&at(now - 1000, 30), &ours, now),
            OnSeen::Supersede(now),
            "the same version with other rules"
        );
        // What no agent takes needs no answer.
        assert_eq!(on_seen(&at(u64::MAX, 30), &ours, now), OnSeen::Nothing);
        let mut impossible = at(now, 50);
        impossible.rules.push(SourcedRule {
            rule: Rule::MaxChars(8),
            source: "x".into(),
        });
        assert_eq!(on_seen(&impossible, &ours, now), OnSeen::Nothing);
        let other = PasswordPolicy {
            group: GroupName::new("g2").unwrap(),
            ..at(now, 30)
        };
        assert_eq!(on_seen(&other, &ours, now), OnSeen::Nothing);
    }

    #[test]
    fn rules_too_big_for_one_policy_are_published_for_every_user_stricter() {
        use pwsync_proto::signed::SignedMessage;
        let g = GroupName::new("g1").unwrap();
        let many: Vec<String> = (0..20_000).map(|i| format!("user-{i:05}")).collect();
        let scoped = |n, users: &[String], source: &str| SourcedRule {
            rule: Rule::Scoped {
                scope: Scope::only(users.iter().cloned()),
                rule: Box::new(Rule::MinChars(n)),
            },
            source: source.into(),
        };
        let rules = vec![
            SourcedRule {
                rule: Rule::MaxBytes(71),
                source: "web stores bcrypt".into(),
            },
            scoped(14, &many[..10_000], "ad: fine-grained password policy a"),
            scoped(16, &many[10_000..], "ad: fine-grained password policy b"),
        ];
        let fitted = fit(&g, rules.clone());
        let p = PasswordPolicy {
            group: g.clone(),
            version: 1,
            issued_ms: 0,
            published_ms: 0,
            rules: fitted.clone(),
        };
        assert!(p.validate().is_ok());
        assert_eq!(fitted.len(), 2, "{fitted:?}");
        assert_eq!(
            fitted[1].rule,
            Rule::MinChars(16),
            "the strictest, for everyone"
        );
        assert!(p.check("anyone", b"fifteen-chars-x").is_err());
        // Rules that fit are left as they are.
        let small = vec![scoped(14, &many[..3], "ad: x")];
        assert_eq!(fit(&g, small.clone()), small);
        // And a policy is made of them.
        let dir = tempfile::tempdir().unwrap();
        assert!(current(dir.path(), &g, rules, 1).is_ok());
    }
}
