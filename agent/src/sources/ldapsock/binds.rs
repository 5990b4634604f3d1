//! Backfill from binds: a password proven at a successful simple bind, handed to the agent
//! when it is news (`[ldap_sock] backfill = true`).
//!
//! slapd shows overlays only a *failed* bind's result; a later message on the same connection
//! bound as that DN proves success, and a bind with neither within 2 s (a client that binds and
//! leaves) is checked with a bind of this process's own (recognised when the overlay shows it,
//! and not tracked again). The account is the entry's stored name, as for every capture. A
//! bind's password is held in memory only, at most [`MAX_IN_FLIGHT`] of them for at most 60 s.

use super::capture::{now_ms, Capture};
use super::directory::Stored;
use super::message::{Message, OpId, Verb};
use super::modification::Value;
use super::naming::norm_dn;
use crate::api::{Request, Response};
use pwsync_proto::Secret;
use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// Binds waiting for their result, and Password Modify operations waiting for their own
/// MODIFY: at most this many of each at once.
pub const MAX_IN_FLIGHT: usize = 10_000;

/// A bind kept for backfill: when it came, the entry (as the bind spelled it), the password.
type KeptBind = (u64, String, Value);

#[derive(Default)]
pub struct BindWatch {
    /// Binds waiting for their result: (connid, msgid) → the bind.
    kept: Mutex<BTreeMap<OpId, KeptBind>>,
    /// Fingerprints of the passwords this process is checking with a bind of its own: that
    /// bind comes back through the overlay and is not tracked again.
    verifying: Mutex<HashSet<[u8; 32]>>,
}

impl Capture {
    /// A simple bind, kept until its result says whether the password was right.
    pub(super) fn on_bind(&self, msg: &Message) {
        if !self.cfg.backfill || msg.text("method").as_deref().map(str::trim) != Some("128") {
            return;
        }
        let (Some(id), Some(dn)) = (msg.op_id(), msg.text("dn")) else {
            return;
        };
        let Some(cred) = msg.value("cred").cloned() else {
            return;
        };
        if cred.is_empty() || !self.in_scope(&dn) || self.ignored_writer(Some(&dn)) {
            return;
        }
        // Nothing to send (the password pwsync forwarded last, or a backfill went lately), or
        // this process's own check of a bind: not tracked.
        let Some((_, fp)) = self.wants_backfill(&dn, &cred) else {
            return;
        };
        if self
            .binds
            .verifying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&fp)
        {
            return;
        }
        let mut binds = self.binds.kept.lock().unwrap_or_else(|p| p.into_inner());
        let now = now_ms();
        binds.retain(|_, (at, _, _)| now.saturating_sub(*at) < 60_000);
        if binds.len() < MAX_IN_FLIGHT {
            binds.insert(id, (now, dn, cred));
        }
    }

    /// What a message tells of the binds kept here: a later message bound as the DN proves
    /// the bind, and a failed result of the bind itself ends it. `true` when the message was a
    /// bind's result.
    pub(super) fn settle_binds(&self, msg: &Message) -> bool {
        let Some((connid, msgid)) = msg.op_id() else {
            return false;
        };
        let mut binds = self.binds.kept.lock().unwrap_or_else(|p| p.into_inner());
        if msg.verb == Verb::Result && binds.contains_key(&(connid, msgid)) {
            let code = msg.text("code").and_then(|c| c.trim().parse::<u32>().ok());
            if code != Some(0) {
                binds.remove(&(connid, msgid));
                return true;
            }
        }
        let Some(bound) = msg.text("binddn").filter(|b| !b.is_empty()) else {
            return false;
        };
        let proven: Vec<OpId> = binds
            .iter()
            .filter(|((c, m), (_, dn, _))| {
                *c == connid && *m < msgid && norm_dn(dn) == norm_dn(&bound)
            })
            .map(|(k, _)| *k)
            .collect();
        let proven: Vec<_> = proven
            .into_iter()
            .filter_map(|k| binds.remove(&k))
            .collect();
        drop(binds);
        for (_, dn, cred) in proven {
            self.backfill(&dn, &cred);
        }
        false
    }

    /// The user `dn` names (as the bind spelled it: a cheap first filter) and the fingerprint
    /// of `cred`, when a backfill of it is due.
    fn wants_backfill(&self, dn: &str, cred: &[u8]) -> Option<(String, [u8; 32])> {
        let user = self.naming.user_of(dn)?;
        let fp = self.gate.fingerprint(&user, cred);
        match self.gate.refuses(&user, cred, now_ms()) {
            None => Some((user, fp)),
            Some(why) => {
                tracing::debug!(user, why, "no backfill");
                None
            }
        }
    }

    /// Sends `cred`, proven at a bind as `dn`, as a backfill for the account the entry's stored
    /// name gives, when one is due.
    fn backfill(&self, dn: &str, cred: &[u8]) {
        let stored = match self.directory.stored_dn(dn) {
            Stored::Dn(stored) => stored,
            other => {
                tracing::info!(dn, answer = ?other, "backfill not sent: the entry's name cannot be read");
                return;
            }
        };
        if !self.in_scope(&stored) {
            return;
        }
        let Some((user, _)) = self.wants_backfill(&stored, cred) else {
            return;
        };
        let req = Request::backfill(&user, Secret::new(cred.to_vec()));
        match pwsync_agent_api::blocking::request(
            &self.agent_socket(),
            &req,
            Duration::from_secs(10),
        ) {
            Ok(Response::Accepted { seq, .. }) => {
                self.count("backfills");
                tracing::info!(user, seq, "backfill: a password seen at a successful bind, sent to fill targets that have none");
                if let Err(e) = self.gate.record(&user, cred, true, now_ms()) {
                    tracing::error!(error = %e, "recording a backfill");
                }
            }
            Ok(other) => tracing::info!(user, answer = ?other, "backfill not taken"),
            Err(e) => {
                tracing::warn!(user, error = %e, "backfill not sent: the agent is unreachable")
            }
        }
    }

    /// Binds neither proven nor failed within 2 s: checked with a bind of this process's own.
    pub(super) fn check_quiet_binds(&self) {
        let now = now_ms();
        let quiet: Vec<KeptBind> = {
            let mut binds = self.binds.kept.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = binds
                .iter()
                .filter(|(_, (at, _, _))| now.saturating_sub(*at) >= 2_000)
                .map(|(k, _)| *k)
                .collect();
            keys.into_iter().filter_map(|k| binds.remove(&k)).collect()
        };
        for (_, dn, cred) in quiet {
            let Some((_, fp)) = self.wants_backfill(&dn, &cred) else {
                continue;
            };
            let verifying = &self.binds.verifying;
            verifying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(fp);
            let ok = self.directory.binds_as(&dn, &cred) == Some(true);
            verifying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&fp);
            if ok {
                self.backfill(&dn, &cred);
            }
        }
    }
}
