//! `cargo fuzz run signed_decode` (nightly): signed acks, commits and deliveries from hostile
//! peers are rejected cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_proto::signed::{verify, Ack, Commit, Delivery};
use pwsync_proto::SigningKey;
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    let key = KEY.get_or_init(|| SigningKey::generate().expect("keygen")).verifying_key();
    assert!(verify::<Ack>(data, &key).is_err());
    assert!(verify::<Commit>(data, &key).is_err());
    assert!(verify::<Delivery>(data, &key).is_err());
});
