//! pwsync-proto: everything two pwsync components must agree on.
//!
//! This crate owns the wire format and the cryptography of pwsync. Nothing in it does I/O except
//! reading and writing key files. Every other crate depends on it and none of them encodes,
//! encrypts or signs anything by itself.
//!
//! The invariants it guarantees to the rest of the system:
//! - an [`envelope::Envelope`] can only be opened through [`envelope::Opener::open`], which checks
//!   the agent's signature before any private-key operation or decryption;
//! - every decoder rejects unknown versions by name, trailing bytes and oversized input before
//!   allocating anything large ([`limits`]);
//! - a password is only ever held in a [`secret::Secret`], which zeroizes on drop and never prints;
//! - a string a peer chose reaches a log line only through [`untrusted::Untrusted`]: escaped, and
//!   bounded in length.

pub mod agents;
pub mod batch;
pub mod certificate;
pub mod change;
pub mod codec;
pub mod envelope;
pub mod error;
pub mod export;
pub mod hlc;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod policy;
pub mod reloaded;
pub mod secret;
pub mod signed;
pub mod topics;
pub mod untrusted;
pub mod window;

pub use change::{Change, Op};
pub use envelope::{Envelope, Header, Opener, Sealer};
pub use error::{DecodeError, KeyError, OpenError};
pub use hlc::{Hlc, HybridClock};
pub use ids::{AgentId, GroupName, KeyId, Offset, Seq};
pub use keys::{DecryptionKey, EncryptionKey, SigningKey, VerifyingKey};
pub use secret::Secret;
pub use signed::{Ack, Commit, Delivery};
pub use untrusted::{Untrusted, UntrustedBytes};
