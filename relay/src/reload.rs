//! Reloading a running relay's config (`pwsync-relay reload`, or SIGHUP), and the requests its
//! admin socket takes.
//!
//! A reload takes `[groups]`: groups added, removed, or given a new key, window or redelivery
//! time ([`crate::service::Relay`] applies them between two turns of its loop, so nothing in
//! flight is lost). The enrolled logins, agents' keys and revocation list are files the
//! running relay already reads again when they change; everything else (`[broker]`, `[keys]`,
//! `[journal]`, `[transport]`, `[metrics]`) takes a restart. A reload is refused, in words,
//! and the running config kept, when the file does not load or pass the config's checks, when
//! a group's key does not load, or when a section only a restart changes was changed.

use crate::config::RelayConfig;
use crate::inspect::JournalRequest;
use crate::service::{GroupSettings, GroupsChange};
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};

/// What the relay's admin socket (`JOURNAL_DIR/admin.sock`) takes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum AdminRequest {
    Journal(JournalRequest),
    /// Read relay.toml again: `[groups]` is taken without a restart.
    Reload,
}

/// Why `new` cannot be taken by a reload of a relay running `old`: a section only a restart
/// changes.
pub fn needs_restart(old: &RelayConfig, new: &RelayConfig) -> Option<&'static str> {
    pwsync_runtime::admin::first_change(&[
        ("[broker]", &old.broker, &new.broker),
        ("[keys]", &old.keys, &new.keys),
        ("[journal]", &old.journal, &new.journal),
        ("[transport]", &old.transport, &new.transport),
        ("[metrics]", &old.metrics, &new.metrics),
    ])
}

/// The running config and the way to the relay's loop.
pub struct Reloader {
    pub config_path: PathBuf,
    pub running: RelayConfig,
    pub changes: mpsc::UnboundedSender<GroupsChange>,
}

impl Reloader {
    /// Reads the config again and hands its groups to the relay's loop when the whole file
    /// loads and nothing else changed. Says what changed, or why nothing did.
    pub async fn reload(&mut self) -> Result<String, String> {
        let kept = "the running config stays";
        let new = RelayConfig::load(&self.config_path)
            .map_err(|e| format!("{}; {kept}", pwsync_runtime::error_report(&e)))?;
        if let Some(section) = needs_restart(&self.running, &new) {
            return Err(format!(
                "{section} changed, which takes a restart of the relay (systemctl restart pwsync-relay); nothing was reloaded, {kept}"
            ));
        }
        let groups = GroupSettings::load_all(&new).map_err(|e| format!("{e:#}; {kept}"))?;
        let (done, outcome) = oneshot::channel();
        self.changes
            .send(GroupsChange { groups, done })
            .map_err(|_| "the relay is stopping".to_string())?;
        let what = outcome
            .await
            .map_err(|_| "the relay is stopping".to_string())??;
        if new.groups.is_empty() {
            tracing::warn!("no consumer groups declared; nothing will be delivered");
        }
        self.running = new;
        Ok(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn example() -> RelayConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay.toml");
        match RelayConfig::load(&path) {
            Ok(c) => c,
            Err(e) => panic!("the example config: {e}"),
        }
    }

    #[test]
    fn only_groups_are_taken_without_a_restart() {
        let (old, mut new) = (example(), example());
        assert_eq!(needs_restart(&old, &new), None);
        new.groups.clear();
        assert_eq!(needs_restart(&old, &new), None);
        new.journal.retention_secs += 1;
        assert_eq!(needs_restart(&old, &new), Some("[journal]"));
        let mut new = example();
        new.broker.max_connections += 1;
        assert_eq!(needs_restart(&old, &new), Some("[broker]"));
    }
}
