//! pwsync-agent-api: the agent's local socket protocol, spoken by `pwsync-agent submit`, the PAM
//! module and any other source hook, and a blocking client of it ([`blocking`]). Small on
//! purpose: the PAM module links this and `pwsync-proto`, not the agent's daemon (tokio, MQTT,
//! redb).
//!
//! ```text
//! frame = length:u32 (big endian, of what follows) · version:u8 (= 2) · postcard(Request | Response)
//! ```
//! One request, one response, per frame; a connection may carry several in turn. Frames larger
//! than [`MAX_FRAME_BYTES`] are refused before they are read. The request's password values are
//! [`Secret`]s, and every buffer that held a request is zeroized.

#![forbid(unsafe_code)]

use pwsync_proto::codec;
use pwsync_proto::error::DecodeError;
use pwsync_proto::{Op, Secret};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// 2: `Submit` carries `previous`. A peer of another version is refused by version, not
/// misread.
pub const API_VERSION: u8 = 2;
/// Largest frame either side accepts.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Take a change: answered after it is durable (strict) or could not be.
    Submit {
        user: String,
        op: Op,
        values: Vec<Secret>,
        attributes: BTreeMap<String, String>,
        /// The password being replaced, when the source saw it (a person's own change); only
        /// with a replace. See `pwsync_proto::Change::previous`.
        previous: Option<Secret>,
    },
    /// Could a change for `user` be taken right now? Hooks ask before they commit locally.
    Probe {
        user: String,
    },
    Status,
    /// Would `password` pass for `user` now, as a replace would carry it: a valid change (the
    /// name, the value's length) that the password policy takes? Answered `Ready` or
    /// `Rejected { reason }` (the rule, and where it came from). Sources that can refuse ask
    /// before they set anything (PAM's `check`, ldap-sock); `Submit` checks again. (Added last
    /// so the earlier variants keep their encoding.)
    CheckPassword {
        user: String,
        password: Secret,
    },
    /// Would exactly this change be taken now, whole? A source that commits before it submits
    /// (ldap-sock) asks with what it will submit, so it never commits a change the agent then
    /// refuses. Answered `Ready`, `Ignored` (outside the agent's scope), `NotReady` (not now:
    /// the spool is full) or `Rejected { reason }` (never: not a valid change, or the password
    /// policy refuses one of its new values). (Added last so the earlier variants keep their
    /// encoding.)
    Vet {
        user: String,
        op: Op,
        values: Vec<Secret>,
        previous: Option<Secret>,
    },
}

/// In a `Submit`'s attributes: the source has set this password already and cannot take it
/// back (PAM after `pam_unix`, Samba's capture, ldap-sock after slapd's result), so the agent
/// forwards it without the policy check. Taken off before the change is sealed, and honoured
/// only from the peers that commit (root, the agent's own user, `[socket] committers`): from
/// anyone else the policy applies as to any submit.
pub const COMMITTED_ATTRIBUTE: &str = "pwsync.committed";

/// A `Submit`'s attributes for a password the source has set already ([`COMMITTED_ATTRIBUTE`]).
pub fn committed_attributes() -> BTreeMap<String, String> {
    BTreeMap::from([(COMMITTED_ATTRIBUTE.to_string(), "1".to_string())])
}

impl Request {
    /// A backfill: `password`, seen at a successful login of `user`, to fill targets that have
    /// no value from pwsync for them ([`pwsync_proto::change::BACKFILL_ATTRIBUTE`]).
    pub fn backfill(user: &str, password: Secret) -> Request {
        let mut attributes = BTreeMap::new();
        attributes.insert(
            pwsync_proto::change::BACKFILL_ATTRIBUTE.to_string(),
            "1".to_string(),
        );
        Request::Submit {
            user: user.to_string(),
            op: Op::Replace,
            values: vec![password],
            attributes,
            previous: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Response {
    /// The change is in the spool as `seq`; `durable` is false only in lenient mode after a
    /// failure (the change was then not kept).
    Accepted {
        seq: u64,
        durable: bool,
    },
    /// The user is outside this agent's scope: nothing was spooled, nothing will be forwarded.
    Ignored {
        reason: String,
    },
    /// The change was refused by rule (not a valid change: a user name or value out of
    /// bounds, ...): sending it again will not help. The source should refuse the password
    /// change and may show `reason` to the person.
    Rejected {
        reason: String,
    },
    /// Answer to a probe: a change would be taken now.
    Ready,
    /// Answer to a probe: a change would not be taken, and why.
    NotReady {
        reason: String,
    },
    Status(Box<StatusReport>),
    /// The request itself was bad (undecodable, too large, not allowed).
    Error {
        message: String,
    },
    /// Strict mode: the change could not be made durable now (the spool is full or could not
    /// be written), so it was not taken; the same change may succeed later. (Added last so the
    /// earlier variants keep their encoding; a client that does not know it fails to decode the
    /// answer, which it treats as the agent being unavailable, as it is.)
    Unavailable {
        reason: String,
    },
}

/// What `pwsync-agent status` shows.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub agent_id: String,
    pub mode: String,
    pub connected: bool,
    pub spool_records: u64,
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub oldest_age_secs: Option<u64>,
    pub next_seq: u64,
    pub last_acked_seq: u64,
    pub last_ack_age_secs: Option<u64>,
    pub accepted: u64,
    pub rejected: u64,
    pub ignored: u64,
    pub quarantined: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("timed out")]
    Timeout,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
}

pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    frame: &[u8],
) -> Result<T, DecodeError> {
    let body = codec::check_frame(what, frame, MAX_FRAME_BYTES, API_VERSION)?;
    codec::decode_exact(what, body)
}

/// Encodes one whole frame (length, version, body) into a zeroizing buffer.
pub fn encode_frame<T: Serialize>(
    what: &'static str,
    msg: &T,
) -> Result<Zeroizing<Vec<u8>>, FrameError> {
    let body = Zeroizing::new(codec::encode(what, msg)?);
    let len = body.len() + 1;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut frame = Zeroizing::new(Vec::with_capacity(4 + len));
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    frame.push(API_VERSION);
    frame.extend_from_slice(&body);
    Ok(frame)
}

pub mod blocking;
