//! The account audit: whose password is no longer the one pwsync wrote, where, and since when.
//!
//! Right after pwsync writes a password at a target, the pipeline asks the target what it now
//! records of that account ([`Target::observe`]: the time of its last password change by its
//! own clock, who made it, and what identifies the stored password — the stored hash or
//! verifier, or a key version) and keeps a [`WriteMark`]: the write time, the target's change
//! time, and a keyed fingerprint of the stored hash (never the hash, never a password). The
//! audit asks the target again and [`judge`]s each account:
//!
//! - **in step**: what the target stores is what pwsync's last write left there;
//! - **changed outside pwsync**: the stored hash (or key version) is another, or the target
//!   recorded a password change after pwsync's — at the target's time, by whom where it says;
//! - **never written**: pwsync never wrote a password for this user there;
//! - **retrying** or **dead letter**: pwsync's last change for this user there waits in the retry
//!   queue, or was set aside as a dead letter (this comes before **missing**: the account may be
//!   missing because that change could not be made);
//! - **missing**: the account is not at the target (**removed** when pwsync removed it);
//! - **unknown**: the target says nothing to compare (or could not be read now).
//!
//! Times are compared on the target's own clock (its change time at the write against its change
//! time now), so no two hosts' clocks meet; only marks of builds before the audit (a write time
//! and no target time) are compared across clocks, with [`CLOCK_TOLERANCE_MS`].
//!
//! [`run`] reads the targets at a bounded rate and makes a [`Report`]; [`service`] runs it in the
//! running consumer, on a timer and when asked (`pwsync-consumer audit`).
//!
//! [`Target::observe`]: crate::targets::Target::observe

pub mod service;

pub use crate::targets::observed::{Observed, Seen, Verifier};
use crate::targets::Configured;
use pwsync_runtime::fingerprint::FingerprintKey;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// How far a target's clock and the consumer's may disagree when a mark has no target time.
pub const CLOCK_TOLERANCE_MS: u64 = 2_000;

/// What a [`Verifier`] is kept as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MarkVerifier {
    /// A keyed fingerprint of the stored hash ([`Verifier::Stored`]).
    Fingerprint([u8; 32]),
    Version(u64),
}

/// What pwsync kept of a target's view of an account right after it wrote a password there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteMark {
    /// When pwsync wrote (the consumer's clock).
    pub written_ms: u64,
    /// The target's own change time then, if it keeps one.
    pub changed_at_ms: Option<u64>,
    pub verifier: Option<MarkVerifier>,
}

impl WriteMark {
    /// The mark for a write at `written_ms` after which the target answered `observed`;
    /// `fingerprint` keys a stored hash.
    pub fn of(
        written_ms: u64,
        observed: &Observed,
        fingerprint: impl Fn(&[u8]) -> [u8; 32],
    ) -> WriteMark {
        let (changed_at_ms, verifier) = match observed {
            Observed::Present(seen) => (
                seen.changed_at_ms,
                seen.verifier
                    .as_ref()
                    .map(|v| mark_verifier(v, &fingerprint)),
            ),
            _ => (None, None),
        };
        WriteMark {
            written_ms,
            changed_at_ms,
            verifier,
        }
    }
}

fn mark_verifier(v: &Verifier, fingerprint: impl Fn(&[u8]) -> [u8; 32]) -> MarkVerifier {
    match v {
        Verifier::Stored(bytes) => MarkVerifier::Fingerprint(fingerprint(bytes)),
        Verifier::Version(n) => MarkVerifier::Version(*n),
    }
}

/// Where one account stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum AuditState {
    InStep,
    ChangedOutside {
        /// When, by the target's clock, if it says.
        at_ms: Option<u64>,
        by: Option<String>,
    },
    NeverWritten,
    /// pwsync's last change for the account waits there, to be tried again.
    Retrying {
        reason: String,
    },
    /// pwsync's last change for the account was set aside there as a dead letter.
    DeadLetter {
        reason: String,
    },
    Missing,
    Removed,
    Unknown {
        reason: String,
    },
}

impl AuditState {
    /// The name the metric and the summary count it under.
    pub fn name(&self) -> &'static str {
        match self {
            AuditState::InStep => "in_step",
            AuditState::ChangedOutside { .. } => "changed_outside",
            AuditState::NeverWritten => "never_written",
            AuditState::Retrying { .. } => "retrying",
            AuditState::DeadLetter { .. } => "dead_letter",
            AuditState::Missing => "missing",
            AuditState::Removed => "removed",
            AuditState::Unknown { .. } => "unknown",
        }
    }

    /// Every [`AuditState::name`], for gauges that must go back to 0.
    pub const NAMES: [&'static str; 8] = [
        "in_step",
        "changed_outside",
        "never_written",
        "retrying",
        "dead_letter",
        "missing",
        "removed",
        "unknown",
    ];
}

/// What the consumer knows of pwsync's own work for one user at one target.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The mark of pwsync's last password write there.
    pub mark: Option<WriteMark>,
    /// A password change of the user waiting there: (dead letter?, why).
    pub pending: Option<(bool, String)>,
    /// pwsync removed the account (the user's account ops ended in remove).
    pub removed: bool,
}

/// Judges one account from what pwsync knows (`known`) and what the target says now
/// (`observed`); `fingerprint` keys a stored hash as [`WriteMark::of`] did.
pub fn judge(
    known: &Known,
    observed: &Observed,
    fingerprint: impl Fn(&[u8]) -> [u8; 32],
) -> AuditState {
    match observed {
        Observed::Unsupported => {
            return AuditState::Unknown {
                reason: "this kind of target keeps nothing to compare".into(),
            }
        }
        Observed::Unreadable(why) => {
            return AuditState::Unknown {
                reason: format!("could not be read: {why}"),
            }
        }
        Observed::Missing if known.removed => return AuditState::Removed,
        Observed::Missing | Observed::Present(_) => {}
    }
    // A change of pwsync's waiting there says more than the account's absence: it may be
    // missing because that change could not be made (and the dead letter says why).
    if let Some((dead_letter, reason)) = &known.pending {
        let reason = reason.clone();
        return if *dead_letter {
            AuditState::DeadLetter { reason }
        } else {
            AuditState::Retrying { reason }
        };
    }
    let Observed::Present(seen) = observed else {
        return AuditState::Missing;
    };
    let Some(mark) = &known.mark else {
        return AuditState::NeverWritten;
    };
    let outside = || AuditState::ChangedOutside {
        at_ms: seen.changed_at_ms,
        by: seen.changed_by.clone(),
    };
    if let (Some(then), Some(now)) = (&mark.verifier, &seen.verifier) {
        return if *then == mark_verifier(now, &fingerprint) {
            AuditState::InStep
        } else {
            outside()
        };
    }
    match (mark.changed_at_ms, seen.changed_at_ms) {
        (Some(then), Some(now)) if now > then => outside(),
        (Some(_), Some(_)) => AuditState::InStep,
        // pwsync's write time against the target's clock (a mark without the target's time).
        (None, Some(now)) if now > mark.written_ms.saturating_add(CLOCK_TOLERANCE_MS) => outside(),
        (None, Some(_)) => AuditState::InStep,
        (_, None) => AuditState::Unknown {
            reason: "the target keeps no change time or stored hash to compare".into(),
        },
    }
}

/// What the consumer knows, for an audit run ([`crate::state::State::audit_view`]).
#[derive(Default)]
pub struct View {
    /// Fingerprints stored hashes as the marks did (stays in the process).
    pub key: Option<FingerprintKey>,
    /// Every user the consumer has seen a change of.
    pub users: BTreeSet<String>,
    /// (target, user) → the mark of pwsync's last password write there.
    pub marks: HashMap<(String, String), WriteMark>,
    /// (target, user) → a password change waiting there: (dead letter?, why).
    pub pending: HashMap<(String, String), (bool, String)>,
    /// Users whose accounts pwsync removed.
    pub removed: BTreeSet<String>,
}

/// One account in a [`Report`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cell {
    /// The account's name at the target.
    pub account: String,
    #[serde(flatten)]
    pub state: AuditState,
    /// When pwsync last wrote its password there.
    pub written_ms: Option<u64>,
}

/// An audit run's findings: per user and target, and counted per target and state. Times,
/// names and states only: never a password, a hash or a fingerprint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub at_ms: u64,
    pub users: BTreeMap<String, BTreeMap<String, Cell>>,
    pub summary: BTreeMap<String, BTreeMap<String, u64>>,
}

/// What to audit: users (all the consumer knows, and these) and targets (all when empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scope {
    pub users: Vec<String>,
    pub targets: Vec<String>,
}

/// Reads every account in `scope` at its target (each target's own include, exclude and map
/// decide which users it has and under which name), at most `reads_per_sec` reads a second in
/// all, and judges each against `view`. `progress` hears (done, total).
pub fn run(
    view: &View,
    targets: &[Configured],
    scope: &Scope,
    reads_per_sec: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Report {
    let users: BTreeSet<&String> = view.users.iter().chain(&scope.users).collect();
    let chosen: Vec<&Configured> = targets
        .iter()
        .filter(|t| scope.targets.is_empty() || scope.targets.contains(&t.name))
        .collect();
    let work: Vec<(&Configured, &String)> = chosen
        .iter()
        .flat_map(|t| {
            users
                .iter()
                .filter(|u| scope.users.is_empty() || scope.users.contains(u))
                .filter(|u| t.routing.takes(u))
                .map(move |u| (*t, *u))
        })
        .collect();
    let mut report = Report {
        at_ms: pwsync_proto::hlc::wall_ms(),
        ..Report::default()
    };
    for t in &chosen {
        let counts = report.summary.entry(t.name.clone()).or_default();
        for name in AuditState::NAMES {
            counts.insert(name.to_string(), 0);
        }
    }
    let pace = Duration::from_secs(1) / reads_per_sec.max(1);
    let started = Instant::now();
    let total = work.len() as u64;
    for (n, (t, user)) in work.into_iter().enumerate() {
        progress(n as u64, total);
        // At most `reads_per_sec` a second: the n-th read not before n / rate.
        if let Some(wait) = (pace * n as u32).checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        let account = t.routing.account(user);
        let key = (t.name.clone(), user.clone());
        let known = Known {
            mark: view.marks.get(&key).cloned(),
            pending: view.pending.get(&key).cloned(),
            removed: view.removed.contains(user),
        };
        let observed = t.target.observe(&account);
        let state = judge(&known, &observed, |stored| {
            view.key
                .as_ref()
                .map_or([0; 32], |k| k.of_verifier(&t.name, &account, stored))
        });
        *report
            .summary
            .entry(t.name.clone())
            .or_default()
            .entry(state.name().to_string())
            .or_default() += 1;
        report.users.entry(user.clone()).or_default().insert(
            t.name.clone(),
            Cell {
                account,
                state,
                written_ms: known.mark.map(|m| m.written_ms),
            },
        );
    }
    progress(total, total);
    report
}

impl Report {
    /// The report as a table (one row a user, one column a target), then a summary per target.
    pub fn table(&self) -> String {
        let targets: Vec<&String> = self.summary.keys().collect();
        let mut rows = vec![std::iter::once("user".to_string())
            .chain(targets.iter().map(|t| t.to_string()))
            .collect::<Vec<_>>()];
        for (user, cells) in &self.users {
            let mut row = vec![pwsync_proto::untrusted::Untrusted(user).to_string()];
            for t in &targets {
                row.push(cells.get(*t).map_or("-".into(), |c| c.short()));
            }
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out.push('\n');
        for (target, counts) in &self.summary {
            let counts: Vec<String> = counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(s, n)| format!("{n} {}", s.replace('_', " ")))
                .collect();
            out.push_str(&format!(
                "{target}: {}\n",
                if counts.is_empty() {
                    "no accounts".to_string()
                } else {
                    counts.join(", ")
                }
            ));
        }
        out
    }
}

impl Cell {
    /// The cell as the table shows it.
    fn short(&self) -> String {
        match &self.state {
            AuditState::ChangedOutside { at_ms, by } => {
                let mut s = "CHANGED OUTSIDE".to_string();
                if let Some(at) = at_ms {
                    s.push_str(&format!(" {}", pwsync_runtime::wall_time(*at)));
                }
                if let Some(by) = by {
                    s.push_str(&format!(" by {}", pwsync_proto::untrusted::Untrusted(by)));
                }
                s
            }
            other => other.name().replace('_', " "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    fn fp(b: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, x) in b.iter().enumerate() {
            out[i % 32] ^= x;
        }
        out
    }

    fn seen(at: Option<u64>, hash: Option<&str>) -> Observed {
        Observed::Present(Seen {
            changed_at_ms: at,
            changed_by: Some("admin".into()),
            verifier: hash.map(|h| Verifier::Stored(Zeroizing::new(h.as_bytes().to_vec()))),
        })
    }

    fn known(mark: &Observed) -> Known {
        Known {
            mark: Some(WriteMark::of(1_000, mark, fp)),
            ..Known::default()
        }
    }

    #[test]
    fn each_account_is_judged_by_the_targets_own_record() {
        // The stored hash decides where there is one, whatever the times say.
        let k = known(&seen(Some(500), Some("$2y$h1")));
        assert_eq!(
            judge(&k, &seen(Some(500), Some("$2y$h1")), fp),
            AuditState::InStep
        );
        assert_eq!(
            judge(&k, &seen(Some(500), Some("$2y$h2")), fp),
            AuditState::ChangedOutside {
                at_ms: Some(500),
                by: Some("admin".into())
            }
        );
        // Without one, the target's change time against its own time at the write.
        let k = known(&seen(Some(500), None));
        assert_eq!(judge(&k, &seen(Some(500), None), fp), AuditState::InStep);
        assert!(matches!(
            judge(&k, &seen(Some(501), None), fp),
            AuditState::ChangedOutside {
                at_ms: Some(501),
                ..
            }
        ));
        // A mark without the target's time: pwsync's write time, with the tolerance.
        let k = known(&seen(None, None));
        assert_eq!(judge(&k, &seen(Some(2_900), None), fp), AuditState::InStep);
        assert!(matches!(
            judge(&k, &seen(Some(3_100), None), fp),
            AuditState::ChangedOutside { .. }
        ));
        assert!(matches!(
            judge(&k, &seen(None, None), fp),
            AuditState::Unknown { .. }
        ));
        // What pwsync knows comes first: waiting, never written, removed.
        let mut k = known(&seen(Some(500), Some("h")));
        k.pending = Some((true, "refused".into()));
        assert_eq!(
            judge(&k, &seen(Some(900), Some("x")), fp).name(),
            "dead_letter"
        );
        // Even when the account is not there: the dead letter may be why.
        assert_eq!(judge(&k, &Observed::Missing, fp).name(), "dead_letter");
        assert_eq!(
            judge(&Known::default(), &seen(Some(1), Some("h")), fp),
            AuditState::NeverWritten
        );
        let removed = Known {
            removed: true,
            ..Known::default()
        };
        assert_eq!(judge(&removed, &Observed::Missing, fp), AuditState::Removed);
        assert_eq!(
            judge(&Known::default(), &Observed::Missing, fp),
            AuditState::Missing
        );
    }
}
