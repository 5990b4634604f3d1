//! Signed control messages: the relay's acks and deliveries, the consumer groups' commits.
//!
//! The broker is not trusted and enforces nothing, so each of these is
//! signed by its sender and a receiver acts only on one whose signature verifies with the key it
//! expects: a forged ack cannot make an agent delete its copy, a forged commit cannot make the
//! relay drop a record, a forged delivery cannot make a consumer commit past real records.
//!
//! ```text
//! wire      = version:u8 · kind:u8 · postcard(bytes body · bytes signature)
//! signature = Ed25519("pwsync signed v1\0" · version · kind · body)
//! ```
//! The body is decoded only after the signature has verified.

use crate::codec;
use crate::error::{DecodeError, OpenError};
use crate::hlc::Hlc;
use crate::ids::{AgentId, GroupName, Offset, Seq};
use crate::keys::{SigningKey, VerifyingKey};
use crate::limits::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS, MAX_ENVELOPE_BYTES, MAX_SIGNED_BYTES};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The signed-message format this build reads and writes.
pub const SIGNED_VERSION: u8 = 1;
const SIGNING_DOMAIN: &[u8] = b"pwsync signed v1\0";

/// A message type that travels signed.
pub trait SignedMessage: Serialize + DeserializeOwned {
    const KIND: u8;
    const NAME: &'static str;
    fn validate(&self) -> Result<(), DecodeError> {
        Ok(())
    }
}

/// Relay → agent: every envelope of `agent` up to and including `seq` is durably journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub agent: AgentId,
    pub seq: Seq,
    /// The relay's hybrid logical clock when it acked; agents merge it into theirs.
    pub relay_hlc: Hlc,
}

impl SignedMessage for Ack {
    const KIND: u8 = 1;
    const NAME: &'static str = "ack";
}

/// Consumer group → relay: every record of the journal up to and including `offset` is applied
/// (or held durably) by `group`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    pub group: GroupName,
    pub offset: Offset,
}

impl SignedMessage for Commit {
    const KIND: u8 = 2;
    const NAME: &'static str = "commit";
}

/// Relay → consumer group: consecutive journal records from offset `first` on, one signature
/// binding each offset to its envelope and to the relay's time of journaling it. A batch is at
/// most [`MAX_BATCH_RECORDS`] envelopes and [`MAX_BATCH_BYTES`] of them (one envelope of any
/// allowed size always fits), so one signature and one MQTT message carry many records.
///
/// Kinds 3 (one record) and 4 (a batch without journal times) were the deliveries of earlier
/// builds; a peer still on one is told "unknown kind" rather than misreading this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub group: GroupName,
    pub first: Offset,
    /// The records at `first`, `first + 1`, …
    pub records: Vec<JournaledRecord>,
}

/// One journal record as the relay delivers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournaledRecord {
    /// When the relay journaled it, in ms since the Unix epoch by the relay's clock. A change
    /// cannot have been captured after this, so consumers bound the envelope's HLC by it
    /// (ordering that does not trust an agent's clock).
    pub journaled_ms: u64,
    /// The encoded [`crate::Envelope`], exactly as the agent sent it.
    pub envelope: serde_bytes::ByteBuf,
}

impl Delivery {
    /// A delivery of the one record at `offset`, journaled at `journaled_ms`.
    pub fn single(
        group: GroupName,
        offset: Offset,
        journaled_ms: u64,
        envelope: Vec<u8>,
    ) -> Delivery {
        let mut d = Delivery {
            group,
            first: offset,
            records: Vec::new(),
        };
        d.push(journaled_ms, envelope);
        d
    }

    /// Appends the record at the next offset; the caller asked [`Delivery::has_room_for`].
    pub fn push(&mut self, journaled_ms: u64, envelope: Vec<u8>) {
        self.records.push(JournaledRecord {
            journaled_ms,
            envelope: serde_bytes::ByteBuf::from(envelope),
        });
    }

    /// Each record with its offset, in order.
    pub fn records(&self) -> impl Iterator<Item = (Offset, &JournaledRecord)> {
        (self.first.0..)
            .zip(&self.records)
            .map(|(o, r)| (Offset(o), r))
    }

    /// Whether one more envelope of `len` bytes still fits in this batch.
    pub fn has_room_for(&self, len: usize) -> bool {
        let used: usize = self.records.iter().map(|r| r.envelope.len()).sum();
        self.records.len() < MAX_BATCH_RECORDS && used + len <= MAX_BATCH_BYTES
    }
}

impl SignedMessage for Delivery {
    const KIND: u8 = 5;
    const NAME: &'static str = "delivery";
    fn validate(&self) -> Result<(), DecodeError> {
        let malformed = |reason: &str| DecodeError::Malformed {
            what: Self::NAME,
            reason: reason.into(),
        };
        if self.records.is_empty() {
            return Err(malformed("no envelopes"));
        }
        if self.records.len() > MAX_BATCH_RECORDS {
            return Err(malformed("too many envelopes"));
        }
        if self.first.0 == 0
            || self
                .first
                .0
                .checked_add(self.records.len() as u64)
                .is_none()
        {
            return Err(malformed("offsets out of range"));
        }
        let mut total = 0;
        for e in self.records.iter().map(|r| &r.envelope) {
            if e.len() > MAX_ENVELOPE_BYTES {
                return Err(DecodeError::TooLarge {
                    len: e.len(),
                    max: MAX_ENVELOPE_BYTES,
                });
            }
            total += e.len();
        }
        if total > MAX_BATCH_BYTES {
            return Err(DecodeError::TooLarge {
                len: total,
                max: MAX_BATCH_BYTES,
            });
        }
        Ok(())
    }
}

/// Relay → consumer group: the journal holds no record below `next` any more, so none will be
/// delivered. The relay sends it before a delivery that starts past the group's cursor: the
/// records between were deleted while the group was not declared (the journal keeps records
/// only for declared groups), so a group declared later, or a consumer whose state was lost,
/// takes up at `next` instead of waiting for records that no longer exist. A consumer moves its
/// committed offset to `next - 1` without applying anything, and says so in its log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pruned {
    pub group: GroupName,
    pub next: Offset,
}

impl SignedMessage for Pruned {
    const KIND: u8 = 7;
    const NAME: &'static str = "pruned";
    fn validate(&self) -> Result<(), DecodeError> {
        if self.next.0 < 2 {
            return Err(DecodeError::Malformed {
                what: Self::NAME,
                reason: "nothing below offset 1 can be pruned".into(),
            });
        }
        Ok(())
    }
}

/// The kind of a signed message (`T::KIND` of the `T` it claims to be), before any check:
/// for a reader that takes more than one kind on one topic.
pub fn kind_of(bytes: &[u8]) -> Option<u8> {
    match bytes {
        [SIGNED_VERSION, kind, ..] => Some(*kind),
        _ => None,
    }
}

#[derive(Serialize, Deserialize)]
struct Frame<'a> {
    #[serde(borrow, with = "serde_bytes")]
    body: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    signature: &'a [u8],
}

fn signed_bytes(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_DOMAIN.len() + 2 + body.len());
    m.extend_from_slice(SIGNING_DOMAIN);
    m.push(SIGNED_VERSION);
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// Encodes and signs `message`.
pub fn sign<T: SignedMessage>(message: &T, key: &SigningKey) -> Result<Vec<u8>, DecodeError> {
    message.validate()?;
    let body = codec::encode(T::NAME, message)?;
    let signature = key.sign(&signed_bytes(T::KIND, &body));
    let mut out = vec![SIGNED_VERSION, T::KIND];
    out.extend(codec::encode(
        T::NAME,
        &Frame {
            body: &body,
            signature: &signature,
        },
    )?);
    Ok(out)
}

/// Decodes a signed message of type `T`, verifies it with `key`, then decodes its body.
pub fn verify<T: SignedMessage>(bytes: &[u8], key: &VerifyingKey) -> Result<T, OpenError> {
    let rest = codec::check_frame(T::NAME, bytes, MAX_SIGNED_BYTES, SIGNED_VERSION)?;
    let (&kind, frame_bytes) = rest.split_first().ok_or(DecodeError::Empty)?;
    if kind != T::KIND {
        return Err(DecodeError::UnknownKind(kind).into());
    }
    let (frame, trailing) = postcard::take_from_bytes::<Frame<'_>>(frame_bytes).map_err(|e| {
        DecodeError::Malformed {
            what: T::NAME,
            reason: e.to_string(),
        }
    })?;
    if !trailing.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what: T::NAME,
            extra: trailing.len(),
        }
        .into());
    }
    if !key.verify(&signed_bytes(kind, frame.body), frame.signature) {
        return Err(OpenError::BadSignature);
    }
    let message: T = codec::decode_exact(T::NAME, frame.body)?;
    message.validate()?;
    Ok(message)
}
