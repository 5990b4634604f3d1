//! The wire format's contract: round trips, key separation, signature-before-decrypt, tamper
//! detection at every byte, hostile input, and golden vectors that pin the encoding.

use proptest::prelude::*;
use pwsync_proto::error::{DecodeError, OpenError};
use pwsync_proto::keys::RsaBits;
use pwsync_proto::signed::{self, Ack, Commit, Delivery};
use pwsync_proto::*;
use std::path::PathBuf;
use std::sync::OnceLock;

struct Keys {
    agent: SigningKey,
    consumer_a: DecryptionKey,
    consumer_b: DecryptionKey,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys {
        agent: SigningKey::generate().unwrap(),
        consumer_a: DecryptionKey::generate_bits(RsaBits::Rsa2048).unwrap(),
        consumer_b: DecryptionKey::generate_bits(RsaBits::Rsa2048).unwrap(),
    })
}

fn agent_id() -> AgentId {
    AgentId::new("host-a").unwrap()
}

fn sealer_for(key: &DecryptionKey) -> Sealer {
    let pem = keys().agent_pem();
    Sealer::new(
        agent_id(),
        SigningKey::from_pem(&pem).unwrap(),
        key.encryption_key().clone(),
    )
}

impl Keys {
    fn agent_pem(&self) -> String {
        // Round-trip the signing key through a file so the sealer owns its own copy.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        self.agent.save(&p).unwrap();
        std::fs::read_to_string(p).unwrap()
    }
}

fn change(op: Op) -> Change {
    let values = if op.carries_values() {
        vec![
            Secret::from("correct horse"),
            Secret::from("battery staple"),
        ]
    } else {
        vec![]
    };
    let mut c = Change::new("alice", "ldap-main", op, values);
    c.attributes.insert("reason".into(), "self-service".into());
    c
}

fn sealed(op: Op) -> Envelope {
    sealer_for(&keys().consumer_a)
        .seal(Seq(1), Hlc::new(1_700_000_000_000, 3), &change(op))
        .unwrap()
}

#[test]
fn every_op_round_trips_through_bytes() {
    let opener = Opener::new([DecryptionKey::from_pkcs8_der(&der_of(&keys().consumer_a)).unwrap()]);
    let mut sealer = sealer_for(&keys().consumer_a);
    for (i, op) in Op::ALL.into_iter().enumerate() {
        let env = sealer
            .seal(Seq(i as u64 + 1), Hlc::new(5, 0), &change(op))
            .unwrap();
        let decoded = Envelope::decode(&env.encode()).unwrap();
        assert_eq!(decoded, env);
        assert_eq!(decoded.seq(), Seq(i as u64 + 1));
        let opened = opener
            .open(&decoded, &keys().agent.verifying_key())
            .unwrap();
        assert_eq!(opened, change(op));
    }
}

fn der_of(key: &DecryptionKey) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k");
    key.save(&p).unwrap();
    pem::parse(std::fs::read(p).unwrap())
        .unwrap()
        .into_contents()
}

#[test]
fn sealed_for_a_cannot_be_opened_with_b() {
    let env = sealed(Op::Replace);
    let opener_b =
        Opener::new([DecryptionKey::from_pkcs8_der(&der_of(&keys().consumer_b)).unwrap()]);
    let err = opener_b
        .open(&env, &keys().agent.verifying_key())
        .unwrap_err();
    assert!(matches!(err, OpenError::UnknownKey(_)), "{err}");
    assert!(
        err.to_string()
            .contains(&keys().consumer_a.key_id().to_string()),
        "{err}"
    );
}

#[test]
fn signature_is_checked_before_any_private_key_operation() {
    let env = sealed(Op::Replace);
    // A forger keeps the header's key id but replaces the wrapped key with garbage and signs with
    // its own key.
    let forger = Sealer::new(
        agent_id(),
        SigningKey::generate().unwrap(),
        keys().consumer_a.encryption_key().clone(),
    );
    let mut forged_bytes = forger_seal_with_garbage_key(forger, &env);
    let opener = Opener::new([DecryptionKey::from_pkcs8_der(&der_of(&keys().consumer_a)).unwrap()]);
    let forged = Envelope::decode(&forged_bytes).unwrap();
    let err = opener
        .open(&forged, &keys().agent.verifying_key())
        .unwrap_err();
    assert!(matches!(err, OpenError::BadSignature), "{err}");
    assert_eq!(
        opener.private_key_operations(),
        0,
        "RSA was touched for a forged envelope"
    );
    // And the genuine one does reach it exactly once.
    opener.open(&env, &keys().agent.verifying_key()).unwrap();
    assert_eq!(opener.private_key_operations(), 1);
    forged_bytes.clear();
}

/// Seals a change under the forger's key, then swaps the wrapped key for garbage of the same length
/// by editing the header bytes and re-signing with the forger's key.
fn forger_seal_with_garbage_key(mut forger: Sealer, genuine: &Envelope) -> Vec<u8> {
    let env = forger
        .seal(Seq(1), Hlc::new(9, 0), &change(Op::Replace))
        .unwrap();
    let mut bytes = env.encode();
    let wrapped = &genuine.header().wrapped_key;
    let forged_wrapped = &env.header().wrapped_key;
    let pos = bytes
        .windows(forged_wrapped.len())
        .position(|w| w == &forged_wrapped[..])
        .unwrap();
    for (i, b) in bytes[pos..pos + wrapped.len()].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31);
    }
    bytes
}

#[test]
fn data_key_is_unwrapped_once_per_epoch() {
    let opener = Opener::new([DecryptionKey::from_pkcs8_der(&der_of(&keys().consumer_a)).unwrap()]);
    let mut sealer = sealer_for(&keys().consumer_a);
    for seq in 1..=50 {
        let env = sealer
            .seal(Seq(seq), Hlc::new(seq, 0), &change(Op::Replace))
            .unwrap();
        opener.open(&env, &keys().agent.verifying_key()).unwrap();
    }
    assert_eq!(opener.private_key_operations(), 1);
    // A new recipient starts a new epoch.
    sealer.set_recipient(keys().consumer_a.encryption_key().clone());
    let env = sealer
        .seal(Seq(51), Hlc::new(51, 0), &change(Op::Add))
        .unwrap();
    opener.open(&env, &keys().agent.verifying_key()).unwrap();
    assert_eq!(opener.private_key_operations(), 2);
}

#[test]
fn unknown_version_is_rejected_by_name() {
    let mut bytes = sealed(Op::Replace).encode();
    bytes[0] = 9;
    let err = Envelope::decode(&bytes).unwrap_err();
    assert_eq!(
        err,
        DecodeError::UnknownVersion {
            what: "envelope",
            version: 9,
            supported: pwsync_proto::envelope::ENVELOPE_VERSION
        }
    );
    assert!(
        err.to_string()
            .contains("unknown envelope format version 9"),
        "{err}"
    );
}

#[test]
fn oversized_truncated_and_trailing_inputs_are_rejected() {
    let bytes = sealed(Op::Replace).encode();
    let huge = vec![1u8; pwsync_proto::limits::MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(
        Envelope::decode(&huge),
        Err(DecodeError::TooLarge { .. })
    ));
    assert_eq!(Envelope::decode(&[]), Err(DecodeError::Empty));
    for len in 0..bytes.len() {
        assert!(
            Envelope::decode(&bytes[..len]).is_err(),
            "truncated to {len} decoded"
        );
    }
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        Envelope::decode(&trailing),
        Err(DecodeError::TrailingBytes { .. })
    ));
    // A length prefix claiming gigabytes is refused without allocating them.
    let claims_huge = [1u8, 0xff, 0xff, 0xff, 0xff, 0x0f];
    assert!(Envelope::decode(&claims_huge).is_err());
}

fn open_bytes(bytes: &[u8], opener: &Opener) -> Result<Change, OpenError> {
    let env = Envelope::decode(bytes)?;
    opener.open(&env, &keys().agent.verifying_key())
}

fn opener_a() -> &'static Opener {
    static OPENER: OnceLock<Opener> = OnceLock::new();
    OPENER.get_or_init(|| {
        Opener::new([DecryptionKey::from_pkcs8_der(&der_of(&keys().consumer_a)).unwrap()])
    })
}

fn reference_envelope() -> &'static Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| sealed(Op::Replace).encode())
}

#[test]
fn flipping_every_single_byte_fails_cleanly() {
    let bytes = reference_envelope();
    assert!(open_bytes(bytes, opener_a()).is_ok());
    for pos in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut b = bytes.clone();
            b[pos] ^= flip;
            assert!(
                open_bytes(&b, opener_a()).is_err(),
                "flip {flip:#x} at {pos} opened"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_byte_replaced_fails_cleanly(pos in any::<prop::sample::Index>(), value in any::<u8>()) {
        let bytes = reference_envelope();
        let pos = pos.index(bytes.len());
        prop_assume!(bytes[pos] != value);
        let mut b = bytes.clone();
        b[pos] = value;
        prop_assert!(open_bytes(&b, opener_a()).is_err());
    }

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Envelope::decode(&data);
        let mut versioned = data.clone();
        versioned.insert(0, 1);
        let _ = Envelope::decode(&versioned);
        let vk = keys().agent.verifying_key();
        let _ = signed::verify::<Ack>(&data, &vk);
        let _ = signed::verify::<Delivery>(&versioned, &vk);
    }

    #[test]
    fn random_envelope_bodies_never_open(data in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut versioned = vec![1u8];
        versioned.extend(data);
        prop_assert!(open_bytes(&versioned, opener_a()).is_err());
    }
}

#[test]
fn signed_messages_verify_only_with_the_right_key() {
    let relay = SigningKey::generate().unwrap();
    let other = SigningKey::generate().unwrap();
    let ack = Ack {
        agent: agent_id(),
        seq: Seq(42),
        relay_hlc: Hlc::new(7, 1),
    };
    let bytes = signed::sign(&ack, &relay).unwrap();
    assert_eq!(
        signed::verify::<Ack>(&bytes, &relay.verifying_key()).unwrap(),
        ack
    );
    assert!(matches!(
        signed::verify::<Ack>(&bytes, &other.verifying_key()),
        Err(OpenError::BadSignature)
    ));
    // An ack is not a commit, even with a good signature.
    assert!(signed::verify::<Commit>(&bytes, &relay.verifying_key()).is_err());
    for pos in 0..bytes.len() {
        let mut b = bytes.clone();
        b[pos] ^= 0x01;
        assert!(
            signed::verify::<Ack>(&b, &relay.verifying_key()).is_err(),
            "flip at {pos}"
        );
    }
}

#[test]
fn a_pruned_notice_is_its_own_kind_and_names_an_offset_above_one() {
    let relay = SigningKey::generate().unwrap();
    let notice = signed::Pruned {
        group: GroupName::new("g1").unwrap(),
        next: Offset(9),
    };
    let bytes = signed::sign(&notice, &relay).unwrap();
    assert_eq!(
        signed::kind_of(&bytes),
        Some(<signed::Pruned as signed::SignedMessage>::KIND)
    );
    assert_eq!(
        signed::verify::<signed::Pruned>(&bytes, &relay.verifying_key()).unwrap(),
        notice
    );
    // Not a delivery, and not a notice when it is one.
    assert!(signed::verify::<Delivery>(&bytes, &relay.verifying_key()).is_err());
    let delivery = signed::sign(
        &Delivery::single(GroupName::new("g1").unwrap(), Offset(1), 1, vec![1; 8]),
        &relay,
    )
    .unwrap();
    assert_ne!(signed::kind_of(&delivery), signed::kind_of(&bytes));
    assert!(signed::verify::<signed::Pruned>(&delivery, &relay.verifying_key()).is_err());
    // Nothing below offset 1 exists to be pruned.
    let nothing = signed::Pruned {
        group: GroupName::new("g1").unwrap(),
        next: Offset(1),
    };
    assert!(signed::sign(&nothing, &relay).is_err());
    assert_eq!(signed::kind_of(&[]), None);
}

#[test]
fn a_delivery_batch_binds_every_offset_and_keeps_to_its_limits() {
    use pwsync_proto::limits::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS, MAX_ENVELOPE_BYTES};
    let relay = SigningKey::generate().unwrap();
    let group = GroupName::new("g1").unwrap();
    let mut d = Delivery::single(
        group.clone(),
        Offset(10),
        1_700_000_000_000,
        sealed(Op::Replace).encode(),
    );
    // The most framing: the longest timestamps, as many records as allowed (two-byte lengths).
    while d.has_room_for(500) {
        d.push(u64::MAX, vec![7u8; 500]);
    }
    assert_eq!(d.records.len(), MAX_BATCH_RECORDS);
    let bytes = signed::sign(&d, &relay).unwrap();
    let back = signed::verify::<Delivery>(&bytes, &relay.verifying_key()).unwrap();
    let offsets: Vec<u64> = back.records().map(|(o, _)| o.0).collect();
    assert_eq!(offsets.first(), Some(&10));
    assert_eq!(offsets.len(), d.records.len());
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(back, d);
    // The most bytes with the most framing: every record and byte allowed, the longest times.
    let mut full = Delivery::single(group.clone(), Offset(1), u64::MAX, vec![3u8; 512]);
    while full.has_room_for(512) {
        full.push(u64::MAX, vec![3u8; 512]);
    }
    assert_eq!(full.records.len() * 512, MAX_BATCH_BYTES);
    assert!(signed::sign(&full, &relay).is_ok());
    // One envelope of the largest allowed size always fits.
    let big = Delivery::single(group.clone(), Offset(1), 5, vec![1u8; MAX_ENVELOPE_BYTES]);
    assert!(signed::sign(&big, &relay).is_ok());
    // Nothing signs (or verifies) past the limits: empty, too many, too large, offset 0 or
    // offsets that would wrap.
    let one = |offset: u64| Delivery::single(group.clone(), Offset(offset), 5, vec![1]);
    let mut too_many = one(1);
    for _ in 0..MAX_BATCH_RECORDS {
        too_many.push(5, vec![1]);
    }
    let mut too_large = one(1);
    for _ in 0..MAX_BATCH_BYTES / MAX_ENVELOPE_BYTES + 1 {
        too_large.push(5, vec![1u8; MAX_ENVELOPE_BYTES]);
    }
    let mut empty = one(1);
    empty.records.clear();
    let zero = one(0);
    let mut wraps = one(u64::MAX);
    wraps.push(5, vec![2u8]);
    for bad in [too_many, too_large, empty, zero, wraps] {
        assert!(
            signed::sign(&bad, &relay).is_err(),
            "{} envelopes from {}",
            bad.records.len(),
            bad.first
        );
    }
    // A delivery signed by another key, or with any bit flipped, does not verify.
    let small = signed::sign(
        &Delivery::single(group, Offset(3), 1_700_000_000_000, vec![9u8; 40]),
        &relay,
    )
    .unwrap();
    assert!(
        signed::verify::<Delivery>(&small, &SigningKey::generate().unwrap().verifying_key())
            .is_err()
    );
    for pos in 0..small.len() {
        let mut b = small.clone();
        b[pos] ^= 0x01;
        assert!(
            signed::verify::<Delivery>(&b, &relay.verifying_key()).is_err(),
            "flip at {pos}"
        );
    }
}

// ---- golden vectors -------------------------------------------------------------------------

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn golden_read(name: &str) -> String {
    std::fs::read_to_string(golden_dir().join(name))
        .unwrap_or_else(|e| panic!("golden/{name}: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() + "\n"
}

fn unhex(s: &str) -> Vec<u8> {
    let s = s.trim();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Set `PWSYNC_BLESS_GOLDEN=1` to write new vectors after a deliberate format change (and bump
/// the version byte).
fn bless() -> bool {
    std::env::var_os("PWSYNC_BLESS_GOLDEN").is_some()
}

fn golden_keys() -> (SigningKey, DecryptionKey, SigningKey, SigningKey) {
    if bless() && !golden_dir().join("agent.key.pem").exists() {
        let d = golden_dir();
        SigningKey::generate()
            .unwrap()
            .save(&d.join("agent.key.pem"))
            .unwrap();
        DecryptionKey::generate()
            .unwrap()
            .save(&d.join("consumer.key.pem"))
            .unwrap();
        SigningKey::generate()
            .unwrap()
            .save(&d.join("relay.key.pem"))
            .unwrap();
        SigningKey::generate()
            .unwrap()
            .save(&d.join("group.key.pem"))
            .unwrap();
    }
    (
        SigningKey::from_pem(&golden_read("agent.key.pem")).unwrap(),
        DecryptionKey::from_pem(&golden_read("consumer.key.pem")).unwrap(),
        SigningKey::from_pem(&golden_read("relay.key.pem")).unwrap(),
        SigningKey::from_pem(&golden_read("group.key.pem")).unwrap(),
    )
}

fn golden_certificate(agent: &SigningKey) -> pwsync_proto::certificate::AgentCertificate {
    pwsync_proto::certificate::AgentCertificate {
        agent: agent_id(),
        key: agent.verifying_key().spki_der(),
        scope: vec!["emp-*".into(), "svc-*".into()],
        serial: 42,
        not_before_ms: 1_700_000_000_000,
        not_after_ms: 1_731_536_000_000,
    }
}

#[test]
fn golden_vectors_decode_to_the_same_values() {
    let (agent, consumer, relay, group) = golden_keys();
    let expected_change = change(Op::Replace);
    let ack = Ack {
        agent: agent_id(),
        seq: Seq(7),
        relay_hlc: Hlc::new(1_700_000_000_123, 2),
    };
    let commit = Commit {
        group: GroupName::new("ldap").unwrap(),
        offset: Offset(99),
    };
    let mut delivery = Delivery::single(
        GroupName::new("ldap").unwrap(),
        Offset(41),
        1_700_000_000_500,
        vec![0xA5; 3],
    );
    delivery.push(1_700_000_000_501, vec![0x5A; 2]);
    if bless() {
        std::fs::write(
            golden_dir().join("delivery.v1.hex"),
            hex(&signed::sign(&delivery, &relay).unwrap()),
        )
        .unwrap();
        let agent_key = SigningKey::from_pem(&golden_read("agent.key.pem")).unwrap();
        let certificate = golden_certificate(&agent_key).issue(&relay).unwrap();
        let mut sealer = Sealer::new(agent_id(), agent_key, consumer.encryption_key().clone())
            .with_certificate(certificate);
        let env = sealer
            .seal(Seq(7), Hlc::new(1_700_000_000_000, 1), &expected_change)
            .unwrap();
        std::fs::write(golden_dir().join("envelope.v2.hex"), hex(&env.encode())).unwrap();
        std::fs::write(
            golden_dir().join("ack.v1.hex"),
            hex(&signed::sign(&ack, &relay).unwrap()),
        )
        .unwrap();
        std::fs::write(
            golden_dir().join("commit.v1.hex"),
            hex(&signed::sign(&commit, &group).unwrap()),
        )
        .unwrap();
    }

    // Envelope: RSA-OAEP and nonces are randomised, so the vector is decoded and opened, and
    // re-encoding must give the same bytes back.
    let env_bytes = unhex(&golden_read("envelope.v2.hex"));
    let env = Envelope::decode(&env_bytes).unwrap();
    assert_eq!(env.encode(), env_bytes);
    // The certificate it carries (the relay key stands in for an enrolment key here).
    let cert: pwsync_proto::certificate::AgentCertificate =
        signed::verify(env.certificate().unwrap(), &relay.verifying_key()).unwrap();
    let agent_public = SigningKey::from_pem(&golden_read("agent.key.pem"))
        .unwrap()
        .verifying_key();
    assert_eq!(
        cert,
        golden_certificate(&SigningKey::from_pem(&golden_read("agent.key.pem")).unwrap())
    );
    assert_eq!(cert.verifying_key().unwrap(), agent_public);
    assert_eq!(env.header().agent, agent_id());
    assert_eq!(env.header().seq, Seq(7));
    assert_eq!(env.header().hlc, Hlc::new(1_700_000_000_000, 1));
    assert_eq!(env.header().key_id, consumer.key_id());
    let opened = Opener::new([consumer])
        .open(&env, &agent.verifying_key())
        .unwrap();
    assert_eq!(opened, expected_change);

    // Ed25519 is deterministic: signing the same ack and commit must reproduce the vectors.
    let ack_bytes = unhex(&golden_read("ack.v1.hex"));
    assert_eq!(
        signed::verify::<Ack>(&ack_bytes, &relay.verifying_key()).unwrap(),
        ack
    );
    assert_eq!(signed::sign(&ack, &relay).unwrap(), ack_bytes);
    let commit_bytes = unhex(&golden_read("commit.v1.hex"));
    assert_eq!(
        signed::verify::<Commit>(&commit_bytes, &group.verifying_key()).unwrap(),
        commit
    );
    assert_eq!(signed::sign(&commit, &group).unwrap(), commit_bytes);
    // A delivery: offsets and the relay's journal times under one signature.
    let delivery_bytes = unhex(&golden_read("delivery.v1.hex"));
    assert_eq!(
        signed::verify::<Delivery>(&delivery_bytes, &relay.verifying_key()).unwrap(),
        delivery
    );
    assert_eq!(signed::sign(&delivery, &relay).unwrap(), delivery_bytes);
}

#[test]
fn a_previous_password_travels_sealed_and_a_change_without_one_encodes_as_before() {
    let k = keys();
    let mut c = change(Op::Replace);
    c.values.truncate(1);
    c.previous = Some(Secret::from("the old one"));
    let env = sealer_for(&k.consumer_a)
        .seal(Seq(1), Hlc::new(1_700_000_000_000, 3), &c)
        .unwrap();
    let opened = Opener::new([DecryptionKey::from_pkcs8_der(&der_of(&k.consumer_a)).unwrap()])
        .open(&env, &k.agent.verifying_key())
        .unwrap();
    assert_eq!(opened.previous.as_ref().unwrap().expose(), b"the old one");
    assert_eq!(opened, c);
    // The ciphertext grew by the appended value only (the golden vector, sealed before the
    // field existed, still opens: golden_vectors_decode_to_the_same_values).
    c.previous = None;
    let plain = sealer_for(&k.consumer_a)
        .seal(Seq(2), Hlc::new(1_700_000_000_000, 4), &c)
        .unwrap();
    assert_eq!(
        env.ciphertext_len() - plain.ciphertext_len(),
        1 + "the old one".len()
    );
}
