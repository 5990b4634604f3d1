//! Unsealing: everything about a delivery that needs no state, done ahead of the pipeline.
//!
//! For each delivery from the relay: its signature (the relay's key, binding group and offsets),
//! then for each envelope in it the agent's certificate or key file (and the revocation list),
//! the agent's signature, and decryption ([`Opener::open`] checks the signature before it touches
//! a private key). This is nearly all of a record's CPU and depends on nothing but the keys and
//! the data-key cache, so [`crate::service`] runs it on a thread of its own, in arrival order,
//! while the pipeline thread applies and makes durable what came before. The pipeline decides
//! everything that depends on order or state (offsets, replays, HLC order, echoes, routing).
//!
//! What fails here is not dropped here: it travels on as the reason, and the pipeline counts,
//! logs and (for an unknown agent or an undecryptable envelope) keeps it, in offset order.

use crate::config::ConsumerConfig;
use pwsync_proto::agents::{AgentDirectory, AgentKeys, Refusal};
use pwsync_proto::hlc::Hlc;
use pwsync_proto::signed::{self, Delivery, Pruned};
use pwsync_proto::{Change, Envelope, GroupName, Offset, OpenError, Opener, VerifyingKey};

/// An opened envelope: who sent it, its seq and capture time, its change, and the scope its
/// agent's certificate grants (if any).
#[derive(Debug)]
pub struct Opened {
    pub agent: String,
    pub seq: u64,
    pub hlc: Hlc,
    pub change: Change,
    pub certified: Option<Vec<String>>,
}

/// What opens an envelope kept sealed (a retry, a dead letter) again: [`Unsealer`] in the
/// daemon; the simulator opens its own plain envelopes.
pub trait Open: Send + Sync {
    fn open(&self, bytes: &[u8]) -> OpenResult;
}

impl Open for Unsealer {
    fn open(&self, bytes: &[u8]) -> OpenResult {
        Unsealer::open(self, bytes)
    }
}

/// Why an envelope could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unopened {
    Malformed,
    Refused(Refusal),
    BadSignature,
    /// Sealed for a key this consumer does not hold (yet).
    Undecryptable,
}

impl Unopened {
    /// The counter it is counted under.
    pub fn counter(self) -> &'static str {
        match self {
            Unopened::Malformed => "malformed",
            Unopened::Refused(r) => r.as_str(),
            Unopened::BadSignature => "bad_signature",
            Unopened::Undecryptable => "undecryptable",
        }
    }

    /// Whether it may be genuine and open later (the agent enrolled, the key added): then it is
    /// kept sealed as a dead letter rather than dropped.
    pub fn may_open_later(self) -> bool {
        matches!(
            self,
            Unopened::Refused(Refusal::UnknownAgent) | Unopened::Undecryptable
        )
    }
}

/// An envelope opened, or why not and a detail without any secret.
pub type OpenResult = Result<Opened, (Unopened, String)>;

/// One record of a delivery whose signature verified.
pub struct UnsealedRecord {
    pub offset: Offset,
    /// When the relay journaled it, by the relay's clock (signed with the delivery).
    pub journaled_ms: u64,
    /// The envelope's bytes as they arrived.
    pub bytes: Vec<u8>,
    pub opened: OpenResult,
}

/// One delivery from the relay, as far as it could be taken without state.
pub enum Unsealed {
    /// The relay's signature verified for this group: its records in offset order.
    Records(Vec<UnsealedRecord>),
    /// The relay's signed word that it holds no record below this offset any more
    /// ([`pwsync_proto::signed::Pruned`]).
    Pruned(Offset),
    /// Not a delivery the relay made for this group: the reason, for the log.
    Forged(String),
}

/// The keys a consumer opens deliveries with.
pub struct Unsealer {
    pub opener: Opener,
    pub agents: AgentKeys,
    pub relay_key: VerifyingKey,
    pub group: GroupName,
}

impl Unsealer {
    /// The keys `cfg` names, opening with `opener` and checking the relay's `relay_key`.
    pub fn new(
        cfg: &ConsumerConfig,
        opener: Opener,
        relay_key: VerifyingKey,
    ) -> anyhow::Result<Unsealer> {
        Ok(Unsealer {
            opener,
            agents: AgentKeys::new(
                AgentDirectory::new(&cfg.keys.agents_dir),
                cfg.keys
                    .enrolment_public_key
                    .as_deref()
                    .map(VerifyingKey::load)
                    .transpose()?,
                cfg.keys.revocation_list.as_deref(),
            ),
            relay_key,
            group: cfg.group.clone(),
        })
    }

    /// Checks the relay's signature on `payload` and opens every envelope in it.
    pub fn unseal(&self, payload: &[u8]) -> Unsealed {
        if signed::kind_of(payload) == Some(<Pruned as signed::SignedMessage>::KIND) {
            return match signed::verify::<Pruned>(payload, &self.relay_key) {
                Ok(p) if p.group == self.group => Unsealed::Pruned(p.next),
                Ok(p) => Unsealed::Forged(format!("pruned notice for group {}", p.group)),
                Err(e) => Unsealed::Forged(e.to_string()),
            };
        }
        let d = match signed::verify::<Delivery>(payload, &self.relay_key) {
            Ok(d) if d.group == self.group => d,
            Ok(d) => return Unsealed::Forged(format!("delivery for group {}", d.group)),
            Err(e) => return Unsealed::Forged(e.to_string()),
        };
        let first = d.first.0;
        Unsealed::Records(
            d.records
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let bytes = r.envelope.into_vec();
                    UnsealedRecord {
                        offset: Offset(first + i as u64),
                        journaled_ms: r.journaled_ms,
                        opened: self.open(&bytes),
                        bytes,
                    }
                })
                .collect(),
        )
    }

    /// Opens an envelope: the agent's certificate or key file (and the revocation list), its
    /// signature, then decryption. Returns the certified scope, if the agent has a certificate.
    pub fn open(&self, bytes: &[u8]) -> OpenResult {
        let env = Envelope::decode(bytes).map_err(|e| (Unopened::Malformed, e.to_string()))?;
        let speaker = self
            .agents
            .speaker(&env)
            .map_err(|e| (Unopened::Refused(e.refusal()), e.to_string()))?;
        match self.opener.open(&env, &speaker.key) {
            Ok(change) => Ok(Opened {
                agent: env.agent().to_string(),
                seq: env.seq().0,
                hlc: env.header().hlc,
                change,
                certified: speaker.certificate.map(|c| c.scope),
            }),
            Err(OpenError::BadSignature) => Err((
                Unopened::BadSignature,
                format!("envelope {} of agent {}", env.seq(), env.agent()),
            )),
            Err(e) => Err((
                Unopened::Undecryptable,
                format!("envelope {} of agent {}: {e}", env.seq(), env.agent()),
            )),
        }
    }
}
