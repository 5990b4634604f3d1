//! The relay's decisions, without I/O: what each commit means, whom to ack after a journal
//! transaction, when a group is sent everything again, and what to deliver to a group from what
//! the journal holds. [`crate::service`] is its shell: it moves bytes between the broker and the
//! journal, signs, and asks this node what to do; the simulator drives the same node over an
//! in-memory journal ([`crate::journal::MemoryJournal`]).
//!
//! Per group, delivery is a go-back-N window over journal offsets ([`SenderWindow`], acked = the
//! group's committed offset): records after the cursor go out in offset order, in batches of
//! consecutive records; when no commit moves the cursor within the group's redelivery time, or
//! the group commits at or below its cursor (a "hello": a consumer saying where it stands),
//! everything after the cursor is sent again. A group whose cursor is below the first record
//! the journal holds is told so ([`Step::pruned`]) before delivery goes on from there; a record
//! missing or unreadable anywhere else is never skipped: delivery waits at it.
//!
//! Times are milliseconds of a monotonic clock the caller passes in.

use crate::journal::{Applied, JournalEntry};
use pwsync_proto::signed::Delivery;
use pwsync_proto::window::{AckEffect, SenderWindow};
use pwsync_proto::{AgentId, GroupName, Offset, Seq};
use std::collections::BTreeMap;

/// What a verified commit from a group means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitKind {
    /// Beyond the group's cursor: for the journal to move it.
    Advance,
    /// At or below it: the group says where it stands, and is sent what is outstanding again.
    Hello,
}

/// One group's delivery window.
#[derive(Debug)]
struct GroupWindow {
    offsets: SenderWindow,
    redelivery_ms: u64,
    /// Where delivery last stopped at a missing or unreadable record, or the last pruned
    /// notice: each logged once, not at every turn.
    noticed: Option<Offset>,
}

/// What to send a group now, from records the journal gave ([`RelayNode::plan`]).
#[derive(Debug, Default)]
pub struct Step {
    /// Tell the group first that the journal holds nothing below this offset
    /// (`proto::signed::Pruned`).
    pub pruned: Option<Offset>,
    /// Deliveries to send in order; after each one sent, [`RelayNode::sent`].
    pub deliveries: Vec<Delivery>,
    /// Delivery waits here (a record missing or unreadable): read no further this turn.
    pub stop: bool,
}

#[derive(Debug, Default)]
pub struct RelayNode {
    groups: BTreeMap<GroupName, GroupWindow>,
    /// The highest seq acked to each agent (durable in the journal): what an agent whose batch
    /// the journal could not take is told again.
    acked: BTreeMap<AgentId, Seq>,
}

impl RelayNode {
    pub fn new() -> RelayNode {
        RelayNode::default()
    }

    /// Declares a group (or replaces it), delivered from after `committed`.
    pub fn declare(
        &mut self,
        group: GroupName,
        committed: Offset,
        window: u16,
        redelivery_ms: u64,
        now: u64,
    ) {
        self.groups.insert(
            group,
            GroupWindow {
                offsets: SenderWindow::new(committed.0, u64::from(window), now),
                redelivery_ms,
                noticed: None,
            },
        );
    }

    /// Stops delivering to `group`.
    pub fn forget(&mut self, group: &GroupName) {
        self.groups.remove(group);
    }

    pub fn groups(&self) -> impl Iterator<Item = &GroupName> {
        self.groups.keys()
    }

    /// The group's committed offset, if it is declared.
    pub fn committed(&self, group: &GroupName) -> Option<Offset> {
        self.groups.get(group).map(|g| Offset(g.offsets.acked()))
    }

    /// What a commit of `offset` from `group` means (`None`: the group is not declared).
    pub fn commit_kind(&self, group: &GroupName, offset: Offset) -> Option<CommitKind> {
        let committed = self.committed(group)?;
        Some(if offset > committed {
            CommitKind::Advance
        } else {
            CommitKind::Hello
        })
    }

    /// (Re)connected to the broker: every group is sent what is outstanding again.
    pub fn on_connected(&mut self, now: u64) {
        for g in self.groups.values_mut() {
            g.offsets.go_back(now);
        }
    }

    /// A journal transaction committed: the agents of the batch are acked (returned: agent and
    /// the highest seq journaled), the cursors it moved move the windows, and each group that
    /// said hello is sent what is outstanding again. `end` is the journal's next offset.
    pub fn on_journaled(
        &mut self,
        applied: &Applied,
        hellos: &[GroupName],
        end: Offset,
        now: u64,
    ) -> Vec<(AgentId, Seq)> {
        let mut acks = Vec::with_capacity(applied.ack.len());
        for (agent, seq) in &applied.ack {
            acks.push((agent.clone(), *seq));
            let known = self.acked.entry(agent.clone()).or_insert(*seq);
            *known = (*known).max(*seq);
        }
        // The journal moved only cursors below its end, so every advance is one the window can
        // have.
        for (group, offset) in &applied.advanced {
            if let Some(g) = self.groups.get_mut(group) {
                g.offsets.on_ack(offset.0, end.0, now, 0);
            }
        }
        for group in hellos {
            if let Some(g) = self.groups.get_mut(group) {
                let at = g.offsets.acked();
                if g.offsets.on_ack(at, end.0, now, 0) == AckEffect::Resend {
                    g.offsets.go_back(now);
                }
            }
        }
        acks
    }

    /// A journal transaction failed: nothing of it is acked. Each of its `agents` this relay
    /// acked before is told again where it stands (returned), which makes it send what is
    /// outstanding at once (`AckEffect::Resend`) rather than after its ack timeout.
    pub fn on_journal_failed<'a>(
        &self,
        agents: impl IntoIterator<Item = &'a AgentId>,
    ) -> Vec<(AgentId, Seq)> {
        let agents: std::collections::BTreeSet<&AgentId> = agents.into_iter().collect();
        agents
            .into_iter()
            .filter_map(|a| self.acked.get(a).map(|s| (a.clone(), *s)))
            .collect()
    }

    /// Cursors another relay sharing the journal moved.
    pub fn on_shared_cursors(
        &mut self,
        cursors: &BTreeMap<GroupName, Offset>,
        end: Offset,
        now: u64,
    ) {
        for (group, offset) in cursors {
            if let Some(g) = self.groups.get_mut(group) {
                if offset.0 > g.offsets.acked() {
                    g.offsets.on_ack(offset.0, end.0, now, 0);
                }
            }
        }
    }

    /// Groups whose commit is overdue are sent what is outstanding again; returned with where
    /// they are sent from and how much was outstanding.
    pub fn redeliver_overdue(&mut self, now: u64) -> Vec<(GroupName, Offset, u64)> {
        let mut again = Vec::new();
        for (name, g) in &mut self.groups {
            if g.offsets.overdue(now, g.redelivery_ms) {
                again.push((
                    name.clone(),
                    Offset(g.offsets.acked() + 1),
                    g.offsets.outstanding(),
                ));
                g.offsets.go_back(now);
            }
        }
        again
    }

    /// When [`RelayNode::redeliver_overdue`] next has something to do, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.groups
            .values()
            .filter(|g| g.offsets.outstanding() > 0)
            .map(|g| g.offsets.deadline_ms(g.redelivery_ms))
            .min()
    }

    /// What to read from the journal for `group` next, as (from, at most how many): `None`
    /// when its window is full or it has everything before `end`.
    pub fn wants(&self, group: &GroupName, end: Offset) -> Option<(Offset, usize)> {
        let g = self.groups.get(group)?;
        (g.offsets.room() > 0 && g.offsets.next() < end.0)
            .then(|| (Offset(g.offsets.next()), g.offsets.room() as usize))
    }

    /// What to send `group`, given `records` the journal read from `from` (as
    /// [`RelayNode::wants`] said) and `held_from` (asked only when the first record is beyond
    /// `from`: the first offset the journal holds).
    pub fn plan(
        &mut self,
        group: &GroupName,
        from: Offset,
        records: Vec<JournalEntry>,
        held_from: impl FnOnce() -> Option<Offset>,
    ) -> Step {
        let mut step = Step::default();
        let Some(g) = self.groups.get_mut(group) else {
            step.stop = true;
            return step;
        };
        let Some(&(first, _)) = records.first() else {
            step.stop = true;
            return step;
        };
        if first > from {
            // Nothing is held below `first`: the records between were deleted while this group
            // was not declared, and it is told so. Otherwise a record is missing in the middle
            // of what the journal holds: delivery waits there.
            if held_from() != Some(first) {
                g.hold_at(group, from, "journal record missing");
                step.stop = true;
                return step;
            }
            if g.noticed != Some(first) {
                g.noticed = Some(first);
                tracing::warn!(%group, from = g.offsets.acked() + 1, to = first.0 - 1, "the journal no longer holds these records for the group (deleted while it was not declared here: every relay sharing a journal must declare the same groups); the group is told to take up after them");
            }
            step.pruned = Some(first);
        }
        let mut expected = first;
        for (offset, rec) in records {
            if offset != expected {
                g.hold_at(group, expected, "journal record missing");
                step.stop = true;
                break;
            }
            expected = Offset(offset.0 + 1);
            let record = match rec {
                Ok(r) => r,
                Err(e) => {
                    g.hold_at(group, offset, &format!("journal record unreadable ({e})"));
                    step.stop = true;
                    break;
                }
            };
            match step.deliveries.last_mut() {
                Some(d) if d.has_room_for(record.envelope.len()) => {
                    d.push(record.received_ms, record.envelope)
                }
                _ => step.deliveries.push(Delivery::single(
                    group.clone(),
                    offset,
                    record.received_ms,
                    record.envelope,
                )),
            }
        }
        step
    }

    /// `delivery` was sent to its group: the window moves past it.
    pub fn sent(&mut self, delivery: &Delivery, now: u64) {
        if let Some(g) = self.groups.get_mut(&delivery.group) {
            g.offsets
                .sent_up_to(delivery.first.0 + delivery.records.len() as u64, now);
        }
    }
}

impl GroupWindow {
    /// Delivery to this group waits at `offset`, which it cannot send; logged once per offset.
    fn hold_at(&mut self, group: &GroupName, offset: Offset, why: &str) {
        if self.noticed != Some(offset) {
            self.noticed = Some(offset);
            tracing::warn!(%group, %offset, "{why}; delivery to this group waits here");
        }
    }
}
