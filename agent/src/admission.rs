//! What the agent admits from its socket, decided once and without I/O: whether a change is
//! this agent's to forward (its scope), well formed (`Change::validate`; `lost` is internal),
//! and within the password policy, and whose submit may skip that policy (a committer's, which
//! says the source has set the password already, or a backfill seen at a login). `Submit`,
//! `Vet` and `CheckPassword` all take this one judgement, so a source that vets a change before
//! it commits can never commit one its submit is then refused. The socket server
//! ([`crate::server`]) is its shell: it reads requests, counts, logs and answers.

use crate::api::Response;
use crate::policy::{Policies, Verdict};
use crate::scope::Scope;
use pwsync_proto::{Change, Op};

/// Why a change is not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The user is outside this agent's scope: ignored, not an error.
    OutOfScope,
    /// `lost` is the agent's own op for a spool record it cannot read.
    Internal,
    /// Not a valid change (name, values, attributes), with why.
    Invalid(String),
    /// The password policy refuses one of its passwords, with why (never the password).
    Policy(String),
}

impl Refusal {
    /// The answer the socket gives for it.
    pub fn response(&self, user: &str) -> Response {
        match self {
            Refusal::OutOfScope => Response::Ignored {
                reason: format!("user {user:?} is outside this agent's scope; not forwarded"),
            },
            Refusal::Internal => Response::Error {
                message: "op lost is internal to the agent".into(),
            },
            Refusal::Invalid(reason) | Refusal::Policy(reason) => Response::Rejected {
                reason: reason.clone(),
            },
        }
    }
}

/// Whether `change` is admitted: in `scope`, valid, and (unless `skip_policy`) every password
/// it sets passes `policies` at `now_ms`.
pub fn judge(
    change: &Change,
    scope: &Scope,
    policies: Option<&Policies>,
    skip_policy: bool,
    now_ms: u64,
) -> Result<(), Refusal> {
    if !scope.admits(&change.user) {
        return Err(Refusal::OutOfScope);
    }
    if change.op == Op::Lost {
        return Err(Refusal::Internal);
    }
    change
        .validate()
        .map_err(|e| Refusal::Invalid(e.to_string()))?;
    let (Some(policies), false, Op::Replace | Op::Add) = (policies, skip_policy, change.op) else {
        return Ok(());
    };
    for value in &change.values {
        if let Verdict::Refused(reason) = policies.check(&change.user, value.expose(), now_ms) {
            return Err(Refusal::Policy(reason));
        }
    }
    Ok(())
}

/// Whether a submit from `uid` may say its source has set the password already (or saw it at
/// a login), and so skip the policy: root, the agent's own user (`agent_uid`) and the
/// configured committers only.
pub fn may_commit(uid: u32, agent_uid: u32, committers: &[u32]) -> bool {
    uid == 0 || uid == agent_uid || committers.contains(&uid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pwsync_proto::Secret;

    fn replace(user: &str, pw: &str) -> Change {
        Change::new(
            user,
            "host",
            Op::Replace,
            vec![Secret::new(pw.as_bytes().to_vec())],
        )
    }

    #[test]
    fn scope_validity_and_the_internal_op_are_judged_in_that_order() {
        let scope = Scope::new(&crate::config::ScopeConfig {
            include: vec!["a*".into()],
            exclude: vec![],
        })
        .unwrap();
        assert_eq!(
            judge(&replace("bob", "x"), &scope, None, false, 0),
            Err(Refusal::OutOfScope)
        );
        let mut lost = replace("alice", "x");
        lost.op = Op::Lost;
        assert_eq!(judge(&lost, &scope, None, false, 0), Err(Refusal::Internal));
        assert!(matches!(
            judge(&replace("alice", ""), &scope, None, false, 0),
            Err(Refusal::Invalid(_))
        ));
        assert_eq!(
            judge(&replace("alice", "pw"), &scope, None, false, 0),
            Ok(())
        );
        assert!(matches!(
            Refusal::OutOfScope.response("bob"),
            Response::Ignored { .. }
        ));
    }

    #[test]
    fn only_root_the_agent_and_committers_may_skip_the_policy() {
        assert!(may_commit(0, 1000, &[]));
        assert!(may_commit(1000, 1000, &[]));
        assert!(may_commit(389, 1000, &[389]));
        assert!(!may_commit(1001, 1000, &[389]));
    }
}
