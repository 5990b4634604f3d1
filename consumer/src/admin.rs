//! The operator's commands on a running consumer, and the one check every configuration
//! passes before it runs or is reloaded.
//!
//! `pwsync-consumer deadletter …`, `owner …` and `reload` reach the running consumer through
//! its admin socket (`STATE_DIR/admin.sock`, [`pwsync_runtime::admin`]): the pipeline thread,
//! which owns the state, answers them between two deliveries, so nothing stops and nothing is
//! written by two processes. With no consumer running, the same commands work on the state
//! folder directly ([`offline`]).
//!
//! A reload ([`checked`], then [`crate::pipeline::Pipeline::reconfigure`]) takes a config only
//! when it passes everything `pwsync-consumer check` checks and changes nothing that needs a
//! restart (group, keys, broker, transport, metrics, state); otherwise it is refused in words
//! and the running config stays.

use crate::config::ConsumerConfig;
use crate::pipeline::Pipeline;
use crate::policy::Sources;
use crate::state::ALL_TARGETS;
use crate::state::{DeadLetter, State};
use crate::targets::Configured;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{DecryptionKey, SigningKey, VerifyingKey};
use pwsync_runtime::admin::Reply;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What an operator asks of the running consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    DeadLetters,
    RetryDeadLetters {
        ids: Vec<u64>,
    },
    DropDeadLetters {
        ids: Vec<u64>,
        all: bool,
    },
    Owners {
        target: Option<String>,
    },
    ReleaseOwner {
        user: String,
        target: String,
    },
    Reload,
    /// The account audit, now ([`crate::audit::service`]).
    Audit {
        scope: crate::audit::Scope,
        json: bool,
    },
}

/// A configuration that passed [`checked`]: its targets built and checked, and its policy
/// rules read from the targets' systems.
pub struct Checked {
    pub targets: Vec<Configured>,
    pub sources: Sources,
    pub rules: Vec<pwsync_proto::policy::SourcedRule>,
}

/// Everything `pwsync-consumer check` checks: keys readable and of the right mode, transport,
/// every target built and usable, no two users one target takes for one account, the targets'
/// own password rules readable and the policy satisfiable. Blocking (targets connect).
pub fn checked(cfg: &ConsumerConfig, config_path: &Path) -> anyhow::Result<Checked> {
    for k in &cfg.keys.decryption_keys {
        DecryptionKey::load(k)?;
    }
    SigningKey::load(&cfg.keys.group_signing_key)?;
    VerifyingKey::load(&cfg.keys.relay_public_key)?;
    cfg.transport().validate()?;
    let targets = crate::build_targets(cfg, config_path)?;
    if targets.is_empty() {
        anyhow::bail!("no [targets.NAME] sections: this consumer would apply nothing");
    }
    for t in &targets {
        t.target
            .check()
            .map_err(|e| anyhow::anyhow!("target {}: {e}", t.name))?;
        if let Some((a, b, account)) = t.map_collisions().into_iter().next() {
            anyhow::bail!(
                "target {}: users {a:?} and {b:?} would both change account {account:?} (the target takes the names for one); map them apart",
                t.name
            );
        }
    }
    let mut sources = Sources::of(&targets);
    if let Some((target, why)) = sources.refresh().into_iter().next() {
        anyhow::bail!("target {target}: reading its system's password rules: {why}");
    }
    let rules =
        crate::policy::rules(&cfg.group, &cfg.policy, &sources).map_err(anyhow::Error::msg)?;
    if let Some(why) = crate::policy::unsatisfiable(&cfg.group, &rules) {
        anyhow::bail!(why);
    }
    Ok(Checked {
        targets,
        sources,
        rules,
    })
}

/// Why `new` cannot be taken by a reload of a consumer running `old`: a section only a
/// restart changes.
pub fn needs_restart(old: &ConsumerConfig, new: &ConsumerConfig) -> Option<&'static str> {
    pwsync_runtime::admin::first_change(&[
        ("group", &old.group, &new.group),
        ("[keys]", &old.keys, &new.keys),
        ("[broker]", &old.broker, &new.broker),
        ("[transport]", &old.transport, &new.transport),
        ("[metrics]", &old.metrics, &new.metrics),
        ("[state]", &old.state, &new.state),
    ])
}

/// One dead letter as `deadletter ls` shows it: id, time, target, user, op, agent and seq,
/// and the reason, whole. Never a password (the letter keeps the change sealed).
pub fn dead_letter_line(id: u64, d: &DeadLetter) -> String {
    let op = if d.target == ALL_TARGETS {
        "(not opened)".to_string()
    } else {
        d.op.to_string()
    };
    format!(
        "{id}\t{}\t{}\t{}\t{op}\t{} seq {}\t{}",
        pwsync_runtime::wall_time(d.time_ms),
        d.target,
        d.user,
        d.agent,
        d.seq,
        d.error
    )
}

/// Answers `request` on the pipeline thread, between two deliveries. (A reload is built off
/// this thread and handed over ready, [`crate::service::PipelineCommand::Reconfigure`].)
pub fn answer(p: &mut Pipeline, request: AdminRequest, reply: Reply) {
    let result = match request {
        AdminRequest::DeadLetters => list_dead_letters(&mut p.state, &mut |l| reply.line(l)),
        AdminRequest::RetryDeadLetters { ids } => p
            .retry_dead_letters(&ids, &mut |l| reply.line(l), &mut |d, t| {
                reply.progress(d, t)
            })
            .map_err(|e| e.to_string()),
        AdminRequest::DropDeadLetters { ids, all } => {
            if ids.is_empty() && !all {
                Err("give the ids to drop, or --all".to_string())
            } else {
                p.drop_dead_letters(&ids, all)
                    .map(|n| reply.line(format!("dropped {n} dead letters")))
                    .map_err(|e| e.to_string())
            }
        }
        AdminRequest::Owners { target } => {
            list_owners(&mut p.state, target.as_deref(), &mut |l| reply.line(l))
        }
        AdminRequest::ReleaseOwner { user, target } => {
            release_owner(&mut p.state, &user, &target, &mut |l| reply.line(l))
        }
        AdminRequest::Reload | AdminRequest::Audit { .. } => {
            Err("not a command for the pipeline thread".into())
        }
    };
    reply.end(result);
}

pub fn list_dead_letters(state: &mut State, say: &mut dyn FnMut(String)) -> Result<(), String> {
    state.flush().map_err(|e| e.to_string())?;
    for (id, d) in state.dead_letters().map_err(|e| e.to_string())? {
        say(dead_letter_line(id, &d));
    }
    Ok(())
}

pub fn list_owners(
    state: &mut State,
    target: Option<&str>,
    say: &mut dyn FnMut(String),
) -> Result<(), String> {
    state.flush().map_err(|e| e.to_string())?;
    for (t, account, user) in state.owners().map_err(|e| e.to_string())? {
        if target.is_none_or(|want| want == t) {
            say(format!("{t}\t{account}\t{user}"));
        }
    }
    Ok(())
}

pub fn release_owner(
    state: &mut State,
    user: &str,
    target: &str,
    say: &mut dyn FnMut(String),
) -> Result<(), String> {
    state.flush().map_err(|e| e.to_string())?;
    let released = state
        .release_owner(target, user)
        .map_err(|e| e.to_string())?;
    state.flush().map_err(|e| e.to_string())?;
    if released.is_empty() {
        return Err(format!(
            "user {user:?} holds no account at target {target:?} (see `pwsync-consumer owner ls`)"
        ));
    }
    for account in released {
        say(format!(
            "released account {account:?} at {target} (held by {user}): the next user whose change applies there holds it"
        ));
    }
    Ok(())
}

/// The commands with no consumer running: on the state folder itself (which the folder's
/// lock keeps from a consumer starting meanwhile).
pub mod offline {
    use super::*;

    /// Puts dead letters back in their retry queues for the consumer to apply when it runs
    /// (it refuses then, as a new dead letter saying why, any that would overwrite a newer
    /// change).
    pub fn retry(cfg: &ConsumerConfig, ids: &[u64]) -> anyhow::Result<String> {
        let mut state = State::open_existing(&cfg.state.dir)?;
        let target_names: Vec<String> = cfg.targets.keys().cloned().collect();
        let n = state.requeue_dead(ids, &target_names, wall_ms())?;
        Ok(format!("{n} dead letters back in their retry queues; the consumer (not running now) applies them when it starts"))
    }
}
