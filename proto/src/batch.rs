//! An agent's envelopes in one MQTT message on its `up` topic.
//!
//! The relay takes a batch or a single bare envelope ([`envelopes_in`]); agents send batches.
//!
//! ```text
//! wire = BATCH_VERSION:u8 · postcard(seq of bytes)   -- each element one encoded Envelope
//! ```
//! The batch itself is not signed: each envelope in it is, and the relay checks each on its own
//! (decoding, agent, certificate or key, signature), exactly as if it had come alone. A batch
//! only saves the per-message cost of MQTT, TLS and the broker, which for one small envelope is
//! most of what the relay spends. At most [`MAX_BATCH_RECORDS`] envelopes and
//! [`MAX_BATCH_BYTES`] of them; one envelope of any allowed size always fits.

use crate::codec;
use crate::error::DecodeError;
use crate::limits::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS, MAX_SIGNED_BYTES};
use serde::{Deserialize, Serialize};

/// The batch format this build reads and writes.
pub const BATCH_VERSION: u8 = 1;
const WHAT: &str = "envelope batch";

#[derive(Serialize, Deserialize)]
struct Wire<'a>(#[serde(borrow)] Vec<&'a serde_bytes::Bytes>);

/// Envelopes being gathered into one batch.
#[derive(Debug, Default)]
pub struct Batch {
    envelopes: Vec<Vec<u8>>,
    bytes: usize,
}

impl Batch {
    /// Whether one more envelope of `len` bytes fits.
    pub fn has_room_for(&self, len: usize) -> bool {
        self.envelopes.is_empty()
            || (self.envelopes.len() < MAX_BATCH_RECORDS && self.bytes + len <= MAX_BATCH_BYTES)
    }

    /// Adds an encoded envelope; the caller asked [`Batch::has_room_for`] first.
    pub fn push(&mut self, envelope: Vec<u8>) {
        self.bytes += envelope.len();
        self.envelopes.push(envelope);
    }

    pub fn is_empty(&self) -> bool {
        self.envelopes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.envelopes.len()
    }

    /// The message to publish; the batch is empty again afterwards.
    pub fn take_encoded(&mut self) -> Vec<u8> {
        let wire = Wire(
            self.envelopes
                .iter()
                .map(|e| serde_bytes::Bytes::new(e))
                .collect(),
        );
        let mut out = vec![BATCH_VERSION];
        // Encoding a list of byte strings cannot fail.
        out.extend(codec::encode(WHAT, &wire).unwrap_or_default());
        self.envelopes.clear();
        self.bytes = 0;
        out
    }
}

// A batch and a bare envelope are told apart by their first byte.
const _: () = assert!(crate::envelope::ENVELOPE_VERSION != BATCH_VERSION);

/// The envelopes an agent published in one message, borrowed from it: a batch, or one bare
/// envelope (the topic's first format, as earlier agents send), told apart by the
/// first byte. A bare envelope is not decoded here; its own decoder judges it.
pub fn envelopes_in(payload: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    if payload.first() == Some(&BATCH_VERSION) {
        decode(payload)
    } else {
        Ok(vec![payload])
    }
}

/// The envelopes of a batch, borrowed from `bytes`, in order. Checks the version, the limits and
/// that every byte is used; the envelopes themselves are not decoded here.
pub fn decode(bytes: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let body = codec::check_frame(WHAT, bytes, MAX_SIGNED_BYTES, BATCH_VERSION)?;
    let (Wire(list), rest) =
        postcard::take_from_bytes::<Wire<'_>>(body).map_err(|e| DecodeError::Malformed {
            what: WHAT,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what: WHAT,
            extra: rest.len(),
        });
    }
    if list.is_empty() || list.len() > MAX_BATCH_RECORDS {
        return Err(DecodeError::Malformed {
            what: WHAT,
            reason: format!(
                "{} envelopes (1 to {MAX_BATCH_RECORDS} allowed)",
                list.len()
            ),
        });
    }
    let total: usize = list.iter().map(|e| e.len()).sum();
    if total > MAX_BATCH_BYTES {
        return Err(DecodeError::TooLarge {
            len: total,
            max: MAX_BATCH_BYTES,
        });
    }
    Ok(list.into_iter().map(|e| &e[..]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::MAX_ENVELOPE_BYTES;

    #[test]
    fn round_trips_in_order_and_keeps_to_the_limits() {
        let mut b = Batch::default();
        let mut expect = Vec::new();
        let mut i = 0u32;
        while b.has_room_for(700) {
            let e = vec![(i % 251) as u8; 700];
            expect.push(e.clone());
            b.push(e);
            i += 1;
        }
        assert!(b.len() == MAX_BATCH_RECORDS || 700 * (b.len() + 1) > MAX_BATCH_BYTES);
        let wire = b.take_encoded();
        assert!(b.is_empty());
        let back = decode(&wire).unwrap();
        assert_eq!(back, expect.iter().map(|e| &e[..]).collect::<Vec<_>>());

        // One envelope of the largest size always fits, even in a batch of its own.
        let mut one = Batch::default();
        assert!(one.has_room_for(MAX_ENVELOPE_BYTES));
        one.push(vec![1; MAX_ENVELOPE_BYTES]);
        assert_eq!(decode(&one.take_encoded()).unwrap().len(), 1);
    }

    #[test]
    fn a_bare_envelope_is_taken_as_a_batch_of_one() {
        let bare = [crate::envelope::ENVELOPE_VERSION, 9, 9];
        assert_eq!(envelopes_in(&bare).unwrap(), vec![&bare[..]]);
        let mut b = Batch::default();
        b.push(bare.to_vec());
        b.push(vec![7]);
        let wire = b.take_encoded();
        assert_eq!(envelopes_in(&wire).unwrap(), vec![&bare[..], &[7u8][..]]);
        assert!(envelopes_in(&wire[..wire.len() - 1]).is_err());
    }

    #[test]
    fn hostile_batches_are_refused_by_reason() {
        let mut b = Batch::default();
        b.push(vec![1, 2, 3]);
        let good = b.take_encoded();
        // Another version, truncated, trailing bytes, empty, a list that claims more than it has.
        let mut other = good.clone();
        other[0] = 0xEE;
        assert!(matches!(
            decode(&other),
            Err(DecodeError::UnknownVersion { .. })
        ));
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::TrailingBytes { .. })
        ));
        assert!(decode(&[]).is_err());
        assert!(decode(&[BATCH_VERSION, 0]).is_err());
        assert!(decode(&[BATCH_VERSION, 0xFF, 0xFF, 0xFF, 0x0F, 1]).is_err());
        // Too many envelopes, too many bytes.
        let many = [BATCH_VERSION]
            .into_iter()
            .chain(
                codec::encode(
                    WHAT,
                    &vec![serde_bytes::Bytes::new(&[1]); MAX_BATCH_RECORDS + 1],
                )
                .unwrap(),
            )
            .collect::<Vec<u8>>();
        assert!(decode(&many).is_err());
        let big = vec![0u8; MAX_ENVELOPE_BYTES];
        let large = [BATCH_VERSION]
            .into_iter()
            .chain(codec::encode(WHAT, &vec![serde_bytes::Bytes::new(&big); 3]).unwrap())
            .collect::<Vec<u8>>();
        assert!(matches!(decode(&large), Err(DecodeError::TooLarge { .. })));
    }
}
