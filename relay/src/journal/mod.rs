//! The journal: the relay's durable copy of every envelope until every consumer group has
//! committed it, in one of two stores behind one interface ([`Journal`]):
//!
//! - [`embedded`]: a redb file in the relay's folder (the default; one relay);
//! - [`jetstream`]: streams on a NATS JetStream cluster, shared by any number of relays.
//!
//! # Invariants (both stores)
//! - Offsets are gap-free and increase by one per journaled envelope.
//! - Per agent, seqs are journaled in order and without gaps: an envelope is appended only if
//!   its seq is exactly one past the highest journaled for its agent. One at or below it is a
//!   duplicate (journaled already; acked again); one beyond it is out of order (dropped; the
//!   agent sends it again after the gap is filled). So "acked up to seq N" always means "all of
//!   1..=N", and [`Journal::apply`] returns only once the store holds what it reports (fsynced;
//!   for JetStream, acknowledged by a quorum of the cluster). Acks are sent after it returns.
//! - A group's cursor only moves forward, and never past the journal's end.
//! - A record is deleted only when every *declared* group's cursor is at or past it and it is
//!   older than the retention period. A declared group that never committed holds everything.
//!   The declared groups are one [`DeclaredGroups`] shared by everything that reads them (the
//!   delivery loop, pruning, the tools, /metrics), so a reload that adds or removes a group is
//!   seen by all of them at once: an added group holds records from its cursor on (everything
//!   still journaled if it never committed), a removed one stops holding any.
//! - Delivery to a group whose cursor is below the first record held tells the group so
//!   (`proto::signed::Pruned`, with that first offset) before delivering from there; a record
//!   missing anywhere else is never skipped: delivery waits at it, logged.

pub mod chain;
pub mod embedded;
pub mod jetstream;
pub mod memory;
pub mod rules;
pub mod shared_memory;

use crate::config::JournalConfig;
use pwsync_proto::codec;
use pwsync_proto::error::DecodeError;
use pwsync_proto::hlc::Hlc;
use pwsync_proto::window::{accept, Acceptance};
use pwsync_proto::{AgentId, GroupName, Offset, Seq};
use pwsync_runtime::observe::Check;
use pwsync_runtime::LockError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use embedded::{EmbeddedJournal, DB_FILE};
pub use jetstream::JetStreamJournal;
pub use memory::MemoryJournal;
pub use shared_memory::MemoryStream;

const RECORD_VERSION: u8 = 1;

/// The consumer groups the config declares, as the running relay holds them: cheap to clone,
/// one list behind every clone ([`DeclaredGroups::replace`] is how a reload changes it).
#[derive(Debug, Clone, Default)]
pub struct DeclaredGroups(Arc<std::sync::RwLock<Vec<GroupName>>>);

impl DeclaredGroups {
    pub fn new(groups: Vec<GroupName>) -> DeclaredGroups {
        DeclaredGroups(Arc::new(std::sync::RwLock::new(groups)))
    }

    /// The groups now.
    pub fn get(&self) -> Vec<GroupName> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, groups: Vec<GroupName>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = groups;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JournalRecord {
    pub received_ms: u64,
    pub agent: AgentId,
    pub seq: Seq,
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

impl JournalRecord {
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_versioned("journal record", RECORD_VERSION, self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<JournalRecord, DecodeError> {
        codec::decode_versioned("journal record", RECORD_VERSION, bytes)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("the journal {0}")]
    Lock(#[from] LockError),
    #[error(
        "no journal at {0} (no {DB_FILE} there); check --journal or journal.dir in the config"
    )]
    Missing(PathBuf),
    #[error("journal I/O error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal storage error: {0}")]
    Storage(String),
    #[error("JetStream journal: {0}")]
    JetStream(String),
    #[error("the journal task stopped: {0}")]
    Task(String),
}

pub(crate) fn storage(e: impl std::fmt::Display) -> JournalError {
    JournalError::Storage(e.to_string())
}

/// What became of one incoming envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intake {
    Appended(Offset),
    /// Already journaled (the agent sent it again).
    Duplicate,
    /// Its seq is beyond the next expected one; dropped until the gap is filled.
    OutOfOrder {
        expected: Seq,
    },
}

/// An incoming envelope whose signature has been verified.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub agent: AgentId,
    pub seq: Seq,
    /// The capture time its agent stamped (from the header; not journaled apart from it).
    pub hlc: Hlc,
    pub envelope: Vec<u8>,
}

impl Incoming {
    /// Its journal record, encoded, as received at `received_ms`.
    pub fn encode_record(&self, received_ms: u64) -> Vec<u8> {
        JournalRecord {
            received_ms,
            agent: self.agent.clone(),
            seq: self.seq,
            envelope: self.envelope.clone(),
        }
        .encode()
    }
}

/// The outcome of one [`Journal::apply`].
#[derive(Debug, Default)]
pub struct Applied {
    pub intake: Vec<Intake>,
    /// For every agent in the batch: the highest contiguous seq now journaled (what to ack).
    pub ack: BTreeMap<AgentId, Seq>,
    /// Commits that moved a cursor: group → new offset.
    pub advanced: BTreeMap<GroupName, Offset>,
    pub pruned: u64,
}

/// One record read back: its offset and the record, or why it cannot be read.
pub type JournalEntry = (Offset, Result<JournalRecord, DecodeError>);

/// Per-group standing, for `journal groups` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStanding {
    pub group: String,
    pub committed: u64,
    pub lag_records: u64,
    pub oldest_unconsumed_ms: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct JournalStats {
    pub records: u64,
    pub bytes: u64,
    pub first_offset: Option<u64>,
    pub next_offset: u64,
}

/// Sorts the envelopes of a batch (each one's agent and seq) against the highest seq journaled
/// for each agent: `last` holds it for every agent of the batch (0 for none) and moves on past
/// each envelope taken.
pub(crate) fn sort_batch<'a>(
    batch: impl IntoIterator<Item = (&'a AgentId, Seq)>,
    last: &mut BTreeMap<AgentId, u64>,
) -> Vec<Acceptance> {
    batch
        .into_iter()
        .map(|(agent, seq)| {
            let at = last.entry(agent.clone()).or_insert(0);
            let acceptance = accept(*at, seq.0);
            if acceptance == Acceptance::Next {
                *at = seq.0;
            }
            acceptance
        })
        .collect()
}

/// The relay's journal, in whichever store the config names.
pub enum Journal {
    Embedded(Arc<EmbeddedJournal>),
    JetStream(Arc<JetStreamJournal>),
}

/// What other relays did to the shared journal, as last read ([`Journal::shared`]).
#[derive(Debug, Clone, Default)]
pub struct Shared {
    /// Which reading this is (pass it to the next [`Journal::shared`]).
    pub generation: u64,
    /// Every declared group's committed offset.
    pub cursors: BTreeMap<GroupName, Offset>,
    /// The groups' signed password policies, as kept in the cluster.
    pub policies: Vec<(GroupName, Vec<u8>)>,
}

impl Journal {
    /// Opens the journal `run` uses: the embedded one (creating it, taking its lock), or the
    /// JetStream streams (creating them if missing), waiting for the cluster while it answers
    /// nothing.
    pub async fn open(
        cfg: &JournalConfig,
        declared: &DeclaredGroups,
    ) -> Result<Journal, JournalError> {
        match &cfg.jetstream {
            None => {
                let dir = cfg.dir.clone();
                let j = tokio::task::spawn_blocking(move || EmbeddedJournal::open(&dir))
                    .await
                    .map_err(|e| JournalError::Task(e.to_string()))??;
                Ok(Journal::Embedded(Arc::new(j)))
            }
            Some(js) => Ok(Journal::JetStream(
                JetStreamJournal::open(js, declared, cfg.retention_secs.saturating_mul(1000))
                    .await?,
            )),
        }
    }

    /// Opens the journal for the offline tools: the embedded one in `dir` (which must exist;
    /// the relay must be stopped), or the JetStream streams (relays may be running).
    pub async fn open_for_tools(
        dir: &Path,
        jetstream: Option<&crate::config::JetStreamConfig>,
    ) -> Result<Journal, JournalError> {
        match jetstream {
            None => Ok(Journal::Embedded(Arc::new(EmbeddedJournal::open_existing(
                dir,
            )?))),
            Some(js) => Ok(Journal::JetStream(JetStreamJournal::attach(js).await?)),
        }
    }

    /// Journals a batch of verified envelopes and moves group cursors for verified commits
    /// (see the invariants above).
    pub async fn apply(
        &self,
        incoming: Vec<Incoming>,
        commits: Vec<(GroupName, Offset)>,
        declared: Vec<GroupName>,
        retention_ms: u64,
    ) -> Result<Applied, JournalError> {
        match self {
            Journal::Embedded(j) => {
                let j = j.clone();
                tokio::task::spawn_blocking(move || {
                    j.apply(&incoming, &commits, &declared, retention_ms)
                })
                .await
                .map_err(|e| JournalError::Task(e.to_string()))?
            }
            Journal::JetStream(j) => j.apply(&incoming, &commits).await,
        }
    }

    /// The offset the next record will get (so the last is one below), as last known.
    pub fn next_offset(&self) -> Offset {
        match self {
            Journal::Embedded(j) => j.next_offset(),
            Journal::JetStream(j) => j.next_offset(),
        }
    }

    /// An offset no record below which is held any more (records at or above it may be
    /// missing too): the embedded journal's first record, or the shared stream's first sequence
    /// as last read. `None` when the embedded journal is empty.
    pub fn held_from(&self) -> Result<Option<Offset>, JournalError> {
        match self {
            Journal::Embedded(j) => j.first_offset(),
            Journal::JetStream(j) => Ok(Some(j.first_offset_known())),
        }
    }

    /// The group's committed offset (0 if it never committed).
    pub async fn cursor(&self, group: &GroupName) -> Result<Offset, JournalError> {
        match self {
            Journal::Embedded(j) => j.cursor(group),
            Journal::JetStream(j) => j.cursor(group).await,
        }
    }

    /// Up to `limit` records from `from` on, in offset order.
    pub async fn read_from(
        &self,
        from: Offset,
        limit: usize,
    ) -> Result<Vec<JournalEntry>, JournalError> {
        match self {
            Journal::Embedded(j) => {
                let j = j.clone();
                tokio::task::spawn_blocking(move || j.read_from(from, limit))
                    .await
                    .map_err(|e| JournalError::Task(e.to_string()))?
            }
            Journal::JetStream(j) => j.read_from(from, limit).await,
        }
    }

    /// Records, bytes and offsets (without the per-agent list: see [`Journal::agents`]).
    pub async fn stats(&self) -> Result<JournalStats, JournalError> {
        match self {
            Journal::Embedded(j) => j.stats(),
            Journal::JetStream(j) => j.stats().await,
        }
    }

    /// Every agent with journaled envelopes, and the highest seq journaled for it.
    pub async fn agents(&self) -> Result<BTreeMap<String, u64>, JournalError> {
        match self {
            Journal::Embedded(j) => j.agents(),
            Journal::JetStream(j) => j.agents().await,
        }
    }

    /// Where each group stands: committed offset, records behind, age of the oldest unconsumed.
    pub async fn groups(&self, declared: &[GroupName]) -> Result<Vec<GroupStanding>, JournalError> {
        let last = self.next_offset().0.saturating_sub(1);
        let mut out = Vec::new();
        for g in declared {
            let committed = self.cursor(g).await?.0;
            let oldest = self
                .read_from(Offset(committed + 1), 1)
                .await?
                .into_iter()
                .next()
                .and_then(|(_, r)| r.ok())
                .map(|r| r.received_ms);
            out.push(GroupStanding {
                group: g.to_string(),
                committed,
                lag_records: last.saturating_sub(committed),
                oldest_unconsumed_ms: oldest,
            });
        }
        Ok(out)
    }

    /// Returns when another relay sharing the journal has appended records (never for the
    /// embedded journal).
    pub async fn appended_elsewhere(&self) {
        match self {
            Journal::Embedded(_) => std::future::pending().await,
            Journal::JetStream(j) => j.appended_elsewhere().await,
        }
    }

    /// What other relays sharing the journal did, if read again since the reading
    /// `generation` (JetStream only; about once a second).
    pub fn shared(&self, generation: u64) -> Option<Shared> {
        match self {
            Journal::Embedded(_) => None,
            Journal::JetStream(j) => j.shared(generation),
        }
    }

    /// Keeps a group's signed password policy where every relay sharing the journal reads it.
    pub fn share_policy(&self, group: &GroupName, signed: &[u8]) {
        if let Journal::JetStream(j) = self {
            j.share_policy(group, signed);
        }
    }

    /// For `/healthz`: the store's own checks beyond reading it (JetStream: the connection,
    /// the stream and its quorum).
    pub fn checks(&self) -> Vec<Check> {
        match self {
            Journal::Embedded(_) => Vec::new(),
            Journal::JetStream(j) => j.checks(),
        }
    }

    /// Where the journal is, for logs.
    pub fn describe(&self, dir: &Path) -> String {
        match self {
            Journal::Embedded(_) => dir.display().to_string(),
            Journal::JetStream(j) => j.describe(),
        }
    }
}
