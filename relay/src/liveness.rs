//! Which agents are alive: the relay's record of when each agent was last seen, so a host whose
//! agent is down shows up before its users complain.
//!
//! An agent is seen whenever its authenticated connection sends anything: envelopes, acks of
//! nothing, and when idle the MQTT keep-alive ping every 15 s (the agent's heartbeat). The
//! gateway reports connects, disconnects and packets here; the relay writes the record to
//! `agents-seen.json` in the journal folder every few seconds (and reads it back at start, so
//! "last seen" survives restarts); `pwsync-relay agents` reads that file, also while the relay
//! runs. Times are milliseconds since the Unix epoch.
//!
//! It also keeps how far ahead of the relay's clock each agent's newest journaled change was
//! captured: a host whose clock runs ahead shows as `AHEAD` in the table's `CLOCK` column (and in
//! the gauge `pwsync_relay_agent_clock_ahead_seconds`) until a change from it is on time again.

use pwsync_proto::hlc::MAX_FORWARD_DRIFT_MS;
use pwsync_proto::AgentId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

pub const FILE: &str = "agents-seen.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seen {
    /// Open connections now (0 in a record read back from an earlier run).
    pub connections: u32,
    pub last_seen_ms: u64,
    /// How far its newest journaled change's capture time was ahead of the relay's clock, in
    /// ms (0: not ahead); none if no change of it was journaled yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_ahead_ms: Option<u64>,
}

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record {
    /// When the running relay last wrote the file: a stale time means no relay is running.
    pub written_ms: u64,
    /// Written by a relay that stopped cleanly (one killed leaves a record that just ages).
    #[serde(default)]
    pub stopped: bool,
    pub agents: BTreeMap<String, Seen>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
pub struct Liveness {
    agents: Mutex<BTreeMap<String, Seen>>,
}

impl Liveness {
    /// Starts from what an earlier run recorded (connections reset to 0).
    pub fn resume(path: &Path) -> Liveness {
        let mut agents = read(path).map(|r| r.agents).unwrap_or_default();
        for s in agents.values_mut() {
            s.connections = 0;
        }
        Liveness {
            agents: Mutex::new(agents),
        }
    }

    fn with(&self, agent: &AgentId, f: impl FnOnce(&mut Seen)) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let seen = agents.entry(agent.to_string()).or_default();
        seen.last_seen_ms = now_ms();
        f(seen);
    }

    pub fn connected(&self, agent: &AgentId) {
        self.with(agent, |s| s.connections += 1);
    }

    pub fn disconnected(&self, agent: &AgentId) {
        self.with(agent, |s| s.connections = s.connections.saturating_sub(1));
    }

    /// Every agent seen, by id.
    pub fn snapshot(&self) -> BTreeMap<String, Seen> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The agent sent something.
    pub fn seen(&self, agent: &AgentId) {
        self.with(agent, |_| {});
    }

    /// A change of the agent's was journaled, captured `ahead_ms` ahead of the relay's clock.
    pub fn clock(&self, agent: &AgentId, ahead_ms: u64) {
        self.with(agent, |s| s.clock_ahead_ms = Some(ahead_ms));
    }

    /// Writes the record (atomically: a reader never sees half a file); `stopped` for the last
    /// write of a relay that is stopping.
    pub fn write(&self, path: &Path, stopped: bool) -> std::io::Result<()> {
        let record = Record {
            written_ms: now_ms(),
            stopped,
            agents: self.snapshot(),
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
        std::fs::rename(&tmp, path)
    }
}

pub fn read(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// "12s", "5m", "3h", "2d".
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The `pwsync-relay agents` table: every agent enrolled (by key or login) or ever seen.
pub fn table(enrolled: &[String], path: &Path) -> String {
    let record = read(path);
    let now = now_ms();
    let relay_running = record
        .as_ref()
        .is_some_and(|r| !r.stopped && now.saturating_sub(r.written_ms) < 15_000);
    let mut names: Vec<String> = enrolled.to_vec();
    if let Some(r) = &record {
        names.extend(r.agents.keys().cloned());
    }
    names.sort();
    names.dedup();
    let mut out = String::from("AGENT\tCONNECTED\tLAST SEEN\tCLOCK\n");
    for name in names {
        let seen = record.as_ref().and_then(|r| r.agents.get(&name));
        let connected = match (relay_running, seen) {
            (false, _) => "unknown",
            (true, Some(s)) if s.connections > 0 => "yes",
            (true, _) => "no",
        };
        let last = seen
            .map(|s| format!("{} ago", age(now.saturating_sub(s.last_seen_ms))))
            .unwrap_or_else(|| "never".into());
        let clock = match seen.and_then(|s| s.clock_ahead_ms) {
            None => "-".to_string(),
            Some(ms) if ms > MAX_FORWARD_DRIFT_MS => format!("{} AHEAD", age(ms)),
            Some(_) => "ok".to_string(),
        };
        out += &format!("{name}\t{connected}\t{last}\t{clock}\n");
    }
    if !relay_running {
        out += &match &record {
            Some(r) => format!(
                "(the relay is not running: as of {} ago)\n",
                age(now.saturating_sub(r.written_ms))
            ),
            None => "(no record yet: the relay has not run with this journal)\n".into(),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_restart_without_its_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let l = Liveness::default();
        let a = AgentId::new("host-a").unwrap();
        l.connected(&a);
        l.write(&path, false).unwrap();
        let t = table(&["host-a".into(), "host-b".into()], &path);
        assert!(t.contains("host-a\tyes\t0s ago\t-"), "{t}");
        assert!(t.contains("host-b\tno\tnever\t-"), "{t}");
        // A change captured 400 days ahead of the relay's clock shows; a fixed clock clears it.
        l.clock(&a, 400 * 86_400_000);
        l.write(&path, false).unwrap();
        assert!(table(&[], &path).contains("host-a\tyes\t0s ago\t400d AHEAD"));
        l.clock(&a, 2_000);
        l.write(&path, false).unwrap();
        assert!(table(&[], &path).contains("host-a\tyes\t0s ago\tok"));
        let again = Liveness::resume(&path);
        again.write(&path, false).unwrap();
        assert!(table(&[], &path).contains("host-a\tno\t"));
        assert_eq!(age(90_000), "90s");
        assert_eq!(age(3 * 86_400_000), "3d");
    }
}
