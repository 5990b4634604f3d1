//! MQTT topic names. Agent ids and group names are valid topic levels by construction
//! ([`crate::ids`]), so building a topic cannot fail; parsing one can, and says why.

use crate::ids::{AgentId, GroupName};

pub const PREFIX: &str = "pwsync/v1";

/// Agent → relay: envelopes.
pub fn up(agent: &AgentId) -> String {
    format!("{PREFIX}/up/{agent}")
}
/// Relay → agent: signed acks.
pub fn ack(agent: &AgentId) -> String {
    format!("{PREFIX}/ack/{agent}")
}
/// Relay → consumer group: signed deliveries.
pub fn down(group: &GroupName) -> String {
    format!("{PREFIX}/down/{group}")
}
/// Consumer group → relay: signed commits.
pub fn commit(group: &GroupName) -> String {
    format!("{PREFIX}/commit/{group}")
}
/// The relay's subscription to every agent's envelopes.
pub const ALL_UP: &str = "pwsync/v1/up/+";
/// The relay's subscription to every group's commits.
pub const ALL_COMMIT: &str = "pwsync/v1/commit/+";
/// Every group's password policy (the relay keeps and republishes them).
pub const ALL_POLICY: &str = "pwsync/v1/policy/+";

/// A group's signed password policy (`crate::policy`): published by the group, read by agents.
pub fn policy(group: &GroupName) -> String {
    format!("{PREFIX}/policy/{group}")
}

/// A parsed pwsync topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    Up(AgentId),
    Ack(AgentId),
    Down(GroupName),
    Commit(GroupName),
    Policy(GroupName),
}

/// Parses a topic name; `None` for anything that is not exactly one of ours.
pub fn parse(topic: &str) -> Option<Topic> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
    let (kind, name) = rest.split_once('/')?;
    match kind {
        "up" => AgentId::new(name).ok().map(Topic::Up),
        "ack" => AgentId::new(name).ok().map(Topic::Ack),
        "down" => GroupName::new(name).ok().map(Topic::Down),
        "commit" => GroupName::new(name).ok().map(Topic::Commit),
        "policy" => GroupName::new(name).ok().map(Topic::Policy),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let a = AgentId::new("host1").unwrap();
        assert_eq!(parse(&up(&a)), Some(Topic::Up(a.clone())));
        assert_eq!(parse(&ack(&a)), Some(Topic::Ack(a)));
        let g = GroupName::new("ldap").unwrap();
        assert_eq!(parse(&down(&g)), Some(Topic::Down(g.clone())));
        assert_eq!(parse(&commit(&g)), Some(Topic::Commit(g.clone())));
        assert_eq!(parse(&policy(&g)), Some(Topic::Policy(g)));
        for bad in [
            "pwsync/v1/up",
            "pwsync/v1/up/a/b",
            "pwsync/v2/up/a",
            "x",
            "pwsync/v1/zz/a",
            "pwsync/v1/up/",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
