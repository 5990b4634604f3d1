//! The envelope: one change, encrypted for the consumers and signed by its agent.
//!
//! ```text
//! wire      = version:u8 · postcard(bytes header · bytes ciphertext · bytes signature)
//! header    = postcard(Header { agent, seq, hlc, key_id, wrapped_key, nonce, certificate })
//! aad       = version · header
//! ciphertext= AES-256-GCM(data_key, nonce, postcard(Change) · [postcard(previous)], aad)
//! signature = Ed25519(agent key, "pwsync envelope v1\0" · version · len(header):u32le · header · ciphertext)
//! ```
//!
//! Invariants:
//! - The signature and the AAD cover the header *as received*, byte for byte, so a header that
//!   decodes the same from different bytes still fails: any change to any byte is detected.
//! - [`Opener::open`] verifies the signature before it looks up a private key, unwraps a data key
//!   or decrypts anything: a forged envelope never reaches RSA or AES.
//! - A data key is used for at most [`DATA_KEY_MAX_USES`] envelopes or [`DATA_KEY_MAX_AGE_SECS`]
//!   seconds (an epoch). Each envelope carries its wrapped key; the opener caches unwrapped keys,
//!   so the RSA private-key operation is paid once per epoch.
//! - The cleartext change exists only in zeroizing buffers.

use crate::change::Change;
use crate::codec;
use crate::error::{DecodeError, OpenError};
use crate::hlc::Hlc;
use crate::ids::{AgentId, KeyId, Seq};
use crate::keys::{DecryptionKey, EncryptionKey, SigningKey, VerifyingKey, SIGNATURE_BYTES};
use crate::limits::*;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The envelope format this build reads and writes.
pub const ENVELOPE_VERSION: u8 = 2;
const SIGNING_DOMAIN: &[u8] = b"pwsync envelope v1\0";
const TAG_BYTES: usize = 16;

/// What the relay and consumers may read without decrypting.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub agent: AgentId,
    pub seq: Seq,
    pub hlc: Hlc,
    /// The consumer public key the data key was wrapped for.
    pub key_id: KeyId,
    #[serde(with = "serde_bytes")]
    pub wrapped_key: Vec<u8>,
    pub nonce: [u8; 12],
    /// The agent's [`crate::certificate::AgentCertificate`] as issued, or empty when the agent
    /// is enrolled by its key file alone.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Frame<'a> {
    #[serde(borrow, with = "serde_bytes")]
    header: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    ciphertext: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    signature: &'a [u8],
}

/// A sealed change. Construct with [`Sealer::seal`] or [`Envelope::decode`].
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    header: Header,
    header_bytes: Vec<u8>,
    ciphertext: Vec<u8>,
    signature: [u8; SIGNATURE_BYTES],
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("header", &self.header)
            .field("ciphertext_bytes", &self.ciphertext.len())
            .finish()
    }
}

fn malformed(reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        what: "envelope",
        reason: reason.into(),
    }
}

impl Envelope {
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn agent(&self) -> &AgentId {
        &self.header.agent
    }

    pub fn seq(&self) -> Seq {
        self.header.seq
    }

    /// The certificate the agent attached, if any (not yet checked: see
    /// [`crate::certificate::Trust::check`]).
    pub fn certificate(&self) -> Option<&[u8]> {
        (!self.header.certificate.is_empty()).then_some(&self.header.certificate[..])
    }

    pub fn ciphertext_len(&self) -> usize {
        self.ciphertext.len()
    }

    pub fn encode(&self) -> Vec<u8> {
        let frame = Frame {
            header: &self.header_bytes,
            ciphertext: &self.ciphertext,
            signature: &self.signature,
        };
        let mut out = vec![ENVELOPE_VERSION];
        // Encoding borrowed byte slices cannot fail.
        out.extend(postcard::to_allocvec(&frame).unwrap_or_default());
        out
    }

    /// Decodes and checks the structure and limits; does not verify the signature.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
        let body = codec::check_frame("envelope", bytes, MAX_ENVELOPE_BYTES, ENVELOPE_VERSION)?;
        let (frame, rest) =
            postcard::take_from_bytes::<Frame<'_>>(body).map_err(|e| malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes {
                what: "envelope",
                extra: rest.len(),
            });
        }
        if frame.header.len() > MAX_HEADER_BYTES {
            return Err(malformed("header too large"));
        }
        let header: Header = codec::decode_exact("envelope header", frame.header)?;
        if header.seq.0 == 0 {
            return Err(malformed("sequence number 0"));
        }
        if header.certificate.len() > crate::certificate::MAX_CERTIFICATE_BYTES {
            return Err(malformed("certificate too large"));
        }
        if header.wrapped_key.is_empty() || header.wrapped_key.len() > MAX_WRAPPED_KEY_BYTES {
            return Err(malformed("wrapped key of impossible length"));
        }
        if frame.ciphertext.len() < TAG_BYTES
            || frame.ciphertext.len() > MAX_PLAINTEXT_BYTES + TAG_BYTES
        {
            return Err(malformed("ciphertext of impossible length"));
        }
        let signature: [u8; SIGNATURE_BYTES] = frame
            .signature
            .try_into()
            .map_err(|_| malformed(format!("signature must be {SIGNATURE_BYTES} bytes")))?;
        Ok(Envelope {
            header,
            header_bytes: frame.header.to_vec(),
            ciphertext: frame.ciphertext.to_vec(),
            signature,
        })
    }

    fn aad(header_bytes: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(1 + header_bytes.len());
        aad.push(ENVELOPE_VERSION);
        aad.extend_from_slice(header_bytes);
        aad
    }

    fn signed_message(header_bytes: &[u8], ciphertext: &[u8]) -> Vec<u8> {
        let mut m =
            Vec::with_capacity(SIGNING_DOMAIN.len() + 5 + header_bytes.len() + ciphertext.len());
        m.extend_from_slice(SIGNING_DOMAIN);
        m.push(ENVELOPE_VERSION);
        m.extend_from_slice(&(header_bytes.len() as u32).to_le_bytes());
        m.extend_from_slice(header_bytes);
        m.extend_from_slice(ciphertext);
        m
    }

    /// Whether the envelope carries `key`'s valid signature.
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        key.verify(
            &Self::signed_message(&self.header_bytes, &self.ciphertext),
            &self.signature,
        )
    }
}

struct Epoch {
    cipher: Aes256Gcm,
    wrapped: Vec<u8>,
    uses: u32,
    started: Instant,
}

/// The agent side: seals changes for one consumer public key and signs them.
pub struct Sealer {
    agent: AgentId,
    signing: SigningKey,
    recipient: EncryptionKey,
    certificate: Vec<u8>,
    epoch: Option<Epoch>,
    max_uses: u32,
    max_age: Duration,
}

impl Sealer {
    pub fn new(agent: AgentId, signing: SigningKey, recipient: EncryptionKey) -> Self {
        Sealer {
            agent,
            signing,
            recipient,
            certificate: Vec::new(),
            epoch: None,
            max_uses: DATA_KEY_MAX_USES,
            max_age: Duration::from_secs(DATA_KEY_MAX_AGE_SECS),
        }
    }

    /// Attaches the agent's certificate to every envelope sealed from now on.
    pub fn with_certificate(mut self, certificate: Vec<u8>) -> Self {
        self.certificate = certificate;
        self
    }

    pub fn agent(&self) -> &AgentId {
        &self.agent
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// Switches to a new consumer public key; the next envelope starts a new epoch.
    pub fn set_recipient(&mut self, recipient: EncryptionKey) {
        self.recipient = recipient;
        self.epoch = None;
    }

    fn epoch(&mut self) -> Result<&mut Epoch, OpenError> {
        let expired = match &self.epoch {
            Some(e) => e.uses >= self.max_uses || e.started.elapsed() >= self.max_age,
            None => true,
        };
        if expired {
            let mut key = Zeroizing::new([0u8; 32]);
            aws_lc_rs::rand::fill(&mut key[..]).map_err(|e| OpenError::Seal(e.to_string()))?;
            let wrapped = self
                .recipient
                .wrap_data_key(&key)
                .map_err(|e| OpenError::Seal(format!("RSA-OAEP wrap: {e}")))?;
            let cipher =
                Aes256Gcm::new_from_slice(&key[..]).map_err(|e| OpenError::Seal(e.to_string()))?;
            self.epoch = Some(Epoch {
                cipher,
                wrapped,
                uses: 0,
                started: Instant::now(),
            });
        }
        self.epoch
            .as_mut()
            .ok_or_else(|| OpenError::Seal("no data key".into()))
    }

    /// Seals one change as envelope `seq` of this agent.
    pub fn seal(&mut self, seq: Seq, hlc: Hlc, change: &Change) -> Result<Envelope, OpenError> {
        change.validate()?;
        // Sized once so that neither serializing nor appending the tag reallocates (a
        // reallocation would leave a cleartext copy behind in freed memory).
        let bound = change.encoded_len_bound().min(MAX_PLAINTEXT_BYTES);
        let mut plaintext = Zeroizing::new(Vec::with_capacity(bound + TAG_BYTES));
        plaintext.resize(bound, 0);
        let used = change.encode_into(&mut plaintext[..]).map_err(|_| {
            OpenError::Seal(format!("change larger than {MAX_PLAINTEXT_BYTES} bytes"))
        })?;
        plaintext.truncate(used);

        let mut nonce = [0u8; 12];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|e| OpenError::Seal(e.to_string()))?;
        let recipient_id = self.recipient.key_id();
        let agent = self.agent.clone();
        let certificate = self.certificate.clone();
        let epoch = self.epoch()?;
        epoch.uses += 1;
        let header = Header {
            agent,
            seq,
            hlc,
            key_id: recipient_id,
            wrapped_key: epoch.wrapped.clone(),
            nonce,
            certificate,
        };
        let header_bytes = codec::encode("envelope header", &header)?;
        epoch
            .cipher
            .encrypt_in_place(
                &Nonce::from(nonce),
                &Envelope::aad(&header_bytes),
                &mut *plaintext,
            )
            .map_err(|e| OpenError::Seal(e.to_string()))?;
        let ciphertext = plaintext.to_vec();
        let signature = self
            .signing
            .sign(&Envelope::signed_message(&header_bytes, &ciphertext));
        Ok(Envelope {
            header,
            header_bytes,
            ciphertext,
            signature,
        })
    }
}

/// Unwrapped data keys, bounded, oldest evicted first.
struct KeyCache {
    keys: HashMap<[u8; 32], Zeroizing<[u8; 32]>>,
    order: VecDeque<[u8; 32]>,
}

impl KeyCache {
    fn get(&self, id: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        self.keys.get(id).cloned()
    }

    fn insert(&mut self, id: [u8; 32], key: Zeroizing<[u8; 32]>) {
        if self.keys.insert(id, key).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > DATA_KEY_CACHE_ENTRIES {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }
}

/// The consumer side: holds the consumer's private keys (several during a rotation) and opens
/// envelopes whose signature verifies.
pub struct Opener {
    keys: HashMap<KeyId, DecryptionKey>,
    cache: Mutex<KeyCache>,
    private_key_ops: AtomicU64,
}

impl Opener {
    pub fn new(keys: impl IntoIterator<Item = DecryptionKey>) -> Self {
        Opener {
            keys: keys.into_iter().map(|k| (k.key_id(), k)).collect(),
            cache: Mutex::new(KeyCache {
                keys: HashMap::new(),
                order: VecDeque::new(),
            }),
            private_key_ops: AtomicU64::new(0),
        }
    }

    /// How many RSA private-key operations this opener has done.
    pub fn private_key_operations(&self) -> u64 {
        self.private_key_ops.load(Ordering::Relaxed)
    }

    /// Forgets cached data keys (a cold cache, for benchmarks and tests).
    pub fn clear_cache(&self) {
        if let Ok(mut c) = self.cache.lock() {
            c.keys.clear();
            c.order.clear();
        }
    }

    /// Verifies `agent_key`'s signature, then unwraps the data key (cached per epoch), decrypts
    /// and validates the change. Nothing is decrypted unless the signature verifies.
    pub fn open(&self, envelope: &Envelope, agent_key: &VerifyingKey) -> Result<Change, OpenError> {
        if !envelope.verify(agent_key) {
            return Err(OpenError::BadSignature);
        }
        let header = &envelope.header;
        let key = self.data_key(header)?;
        let cipher = Aes256Gcm::new_from_slice(&key[..]).map_err(|_| OpenError::Decrypt)?;
        let mut buf = Zeroizing::new(Vec::with_capacity(envelope.ciphertext.len()));
        buf.extend_from_slice(&envelope.ciphertext);
        cipher
            .decrypt_in_place(
                &Nonce::from(header.nonce),
                &Envelope::aad(&envelope.header_bytes),
                &mut *buf,
            )
            .map_err(|_| OpenError::Decrypt)?;
        let change = Change::decode(&buf)?;
        change.validate()?;
        Ok(change)
    }

    fn data_key(&self, header: &Header) -> Result<Zeroizing<[u8; 32]>, OpenError> {
        let private = self
            .keys
            .get(&header.key_id)
            .ok_or_else(|| OpenError::UnknownKey(header.key_id.to_string()))?;
        let mut id_input = header.key_id.0.to_vec();
        id_input.extend_from_slice(&header.wrapped_key);
        let mut cache_id = [0u8; 32];
        cache_id.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &id_input).as_ref(),
        );
        if let Some(key) = self.cache.lock().ok().and_then(|c| c.get(&cache_id)) {
            return Ok(key);
        }
        self.private_key_ops.fetch_add(1, Ordering::Relaxed);
        let key = private
            .unwrap_data_key(&header.wrapped_key)
            .ok_or_else(|| OpenError::KeyUnwrap(header.key_id.to_string()))?;
        if let Ok(mut c) = self.cache.lock() {
            c.insert(cache_id, key.clone());
        }
        Ok(key)
    }
}
