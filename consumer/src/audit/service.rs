//! The account audit inside the running consumer: a thread of its own, with its own target
//! connections (an audit never waits for a change being applied, nor a change for an audit),
//! that audits every `[audit] every_secs` and whenever `pwsync-consumer audit` asks through the
//! admin socket (the first run a minute after start). What pwsync knows (marks, waiting changes, removals) comes from the pipeline
//! thread, which owns the state, as a [`View`] read between two deliveries; the targets are read
//! here, at `[audit] reads_per_sec`. Each run writes `audit.json` in the state folder (what the
//! last audit found) and sets `pwsync_consumer_audit_accounts{target,state}`.

use super::{run, AuditState, Report, Scope, View};
use crate::config::AuditConfig;
use crate::targets::Configured;
use pwsync_runtime::admin::Reply;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// An audit asked for now: of what, printed how, answered where.
pub struct Asked {
    pub scope: Scope,
    pub json: bool,
    pub reply: Reply,
}

/// What the audit thread is told.
pub enum AuditCommand {
    /// Audit now (`pwsync-consumer audit`).
    Run(Asked),
    /// A reload took a new config: audit these targets, on this timer, from now on.
    Reconfigure {
        cfg: AuditConfig,
        targets: Vec<Configured>,
    },
}

/// Where the last audit's report is kept, in the state folder.
pub const REPORT_FILE: &str = "audit.json";

/// When the timer's next audit is due: a minute from now (or sooner, with a shorter period);
/// never when the timer is off (`every_secs = 0`).
fn first_run(cfg: &AuditConfig) -> Option<Instant> {
    (cfg.every_secs > 0).then(|| Instant::now() + Duration::from_secs(cfg.every_secs.min(60)))
}

/// Starts the audit thread; audits asked for, and reloaded configs, go to the returned
/// sender. `view` asks the pipeline thread what pwsync knows ([`crate::service::audit_view`]).
pub fn spawn(
    cfg: AuditConfig,
    targets: Vec<Configured>,
    view: impl Fn() -> Result<View, String> + Send + 'static,
    state_dir: PathBuf,
) -> std::io::Result<mpsc::Sender<AuditCommand>> {
    for t in &targets {
        set_gauges(&t.name, &Default::default());
    }
    let (tx, rx) = mpsc::channel::<AuditCommand>();
    std::thread::Builder::new()
        .name("audit".into())
        .spawn(move || {
            let (mut cfg, mut targets) = (cfg, targets);
            let mut next = first_run(&cfg);
            loop {
                let wait = next.map_or(Duration::from_secs(3600), |n| {
                    n.saturating_duration_since(Instant::now())
                });
                let asked = match rx.recv_timeout(wait) {
                    Ok(AuditCommand::Run(asked)) => Some(asked),
                    Ok(AuditCommand::Reconfigure {
                        cfg: new,
                        targets: new_targets,
                    }) => {
                        // A target no longer configured is no longer counted; a new one is
                        // counted from 0 until its first audit, as at start.
                        for gone in targets.iter().filter(|t| {
                            !new_targets.iter().any(|n| n.name == t.name)
                        }) {
                            set_gauges(&gone.name, &Default::default());
                        }
                        for added in new_targets
                            .iter()
                            .filter(|n| !targets.iter().any(|t| t.name == n.name))
                        {
                            set_gauges(&added.name, &Default::default());
                        }
                        if new.every_secs != cfg.every_secs {
                            next = first_run(&new);
                        }
                        (cfg, targets) = (new, new_targets);
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                };
                if asked.is_none() && next.is_none_or(|n| Instant::now() < n) {
                    continue;
                }
                let scope = asked.as_ref().map(|a| a.scope.clone()).unwrap_or_default();
                let outcome = view().map(|view| {
                    let mut progress = |done, total| {
                        if let Some(a) = &asked {
                            a.reply.progress(done, total);
                        }
                    };
                    run(&view, &targets, &scope, cfg.reads_per_sec, &mut progress)
                });
                match &outcome {
                    Ok(report) => {
                        // A whole audit stands for every account: gauges and the report file.
                        if scope.users.is_empty() && scope.targets.is_empty() {
                            for (target, counts) in &report.summary {
                                set_gauges(target, counts);
                            }
                            keep(&state_dir, report);
                        }
                        let changed: u64 = report
                            .summary
                            .values()
                            .filter_map(|c| c.get("changed_outside"))
                            .sum();
                        if changed > 0 {
                            tracing::warn!(changed, "account audit: passwords changed outside pwsync (`pwsync-consumer audit` names them)");
                        }
                        tracing::info!(accounts = report.users.values().map(|c| c.len()).sum::<usize>(), "account audit done");
                    }
                    Err(e) => tracing::error!(error = %e, "account audit not run"),
                }
                if asked.is_none() {
                    next = (cfg.every_secs > 0)
                        .then(|| Instant::now() + Duration::from_secs(cfg.every_secs));
                }
                if let Some(a) = asked {
                    match outcome {
                        Ok(report) => {
                            a.reply.line(printed(&report, a.json));
                            a.reply.end(Ok(()));
                        }
                        Err(e) => a.reply.end(Err(e)),
                    }
                }
            }
        })?;
    Ok(tx)
}

/// The report as `pwsync-consumer audit` prints it.
pub fn printed(report: &Report, json: bool) -> String {
    if json {
        serde_json::to_string_pretty(report).unwrap_or_default()
    } else {
        report.table().trim_end().to_string()
    }
}

fn set_gauges(target: &str, counts: &std::collections::BTreeMap<String, u64>) {
    for state in AuditState::NAMES {
        metrics::gauge!("pwsync_consumer_audit_accounts", "target" => target.to_string(), "state" => state)
            .set(counts.get(state).copied().unwrap_or(0) as f64);
    }
}

fn keep(dir: &std::path::Path, report: &Report) {
    let path = dir.join(REPORT_FILE);
    let tmp = dir.join(format!(".{REPORT_FILE}.tmp"));
    let written = serde_json::to_vec_pretty(report)
        .map_err(std::io::Error::other)
        .and_then(|b| std::fs::write(&tmp, b))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the audit report");
    }
}
