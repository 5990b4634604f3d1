//! Signed control messages: the relay's acks and deliveries, the consumer groups' commits.
//!
//! The broker enforces nothing (DESIGN.md "The broker is not trusted"), so each of these is
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
use crate::limits::{MAX_ENVELOPE_BYTES, MAX_SIGNED_BYTES};
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

/// Relay → consumer group: the journal record at `offset`, binding the offset to the envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub group: GroupName,
    pub offset: Offset,
    /// An encoded [`crate::Envelope`], exactly as the agent sent it.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

impl SignedMessage for Delivery {
    const KIND: u8 = 3;
    const NAME: &'static str = "delivery";
    fn validate(&self) -> Result<(), DecodeError> {
        if self.envelope.len() > MAX_ENVELOPE_BYTES {
            return Err(DecodeError::TooLarge {
                len: self.envelope.len(),
                max: MAX_ENVELOPE_BYTES,
            });
        }
        Ok(())
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
