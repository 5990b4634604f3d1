//! Size limits. Every decoder checks its input against these before it allocates, and every
//! encoder refuses to produce anything larger, so a peer can never make us allocate more than a
//! little over a hundred kilobytes per message.

/// A user name, in bytes.
pub const MAX_USER_BYTES: usize = 256;
/// The origin system's name, in bytes.
pub const MAX_ORIGIN_BYTES: usize = 128;
/// Password values in one change (LDAP `userPassword` is multi-valued).
pub const MAX_VALUES: usize = 8;
/// One password value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Attributes carried with one change.
pub const MAX_ATTRIBUTES: usize = 32;
/// One attribute name, in bytes.
pub const MAX_ATTRIBUTE_NAME_BYTES: usize = 64;
/// One attribute value, in bytes.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 1024;
/// The encoded change inside an envelope (the plaintext), in bytes.
pub const MAX_PLAINTEXT_BYTES: usize = 48 * 1024;
/// A wrapped data key: RSA-OAEP output of up to an 8192-bit key.
pub const MAX_WRAPPED_KEY_BYTES: usize = 1024;
/// An encoded header, in bytes.
pub const MAX_HEADER_BYTES: usize = 2560;
/// An encoded envelope, in bytes: the largest message an agent ever publishes.
pub const MAX_ENVELOPE_BYTES: usize = 56 * 1024;
/// The envelopes of one batch together (an agent's [`crate::batch`], a relay's
/// [`crate::Delivery`]), in bytes. One envelope of any allowed size always fits.
pub const MAX_BATCH_BYTES: usize = 128 * 1024;
/// Envelopes in one batch.
pub const MAX_BATCH_RECORDS: usize = 256;
/// A signed relay or consumer message (ack, commit, a delivery of up to [`MAX_BATCH_BYTES`]
/// of envelopes with their framing and journal times); also bounds an agent's batch.
pub const MAX_SIGNED_BYTES: usize = MAX_BATCH_BYTES + 16 * MAX_BATCH_RECORDS + 1024;
/// The MQTT packet size every pwsync client and broker must accept.
pub const MAX_MQTT_PACKET_BYTES: usize = MAX_SIGNED_BYTES + 1024;
/// Envelopes sealed under one data key before the sealer draws a new one (an epoch).
pub const DATA_KEY_MAX_USES: u32 = 4096;
/// Seconds one data key is used before the sealer draws a new one.
pub const DATA_KEY_MAX_AGE_SECS: u64 = 3600;
/// Unwrapped data keys an opener keeps.
pub const DATA_KEY_CACHE_ENTRIES: usize = 1024;
