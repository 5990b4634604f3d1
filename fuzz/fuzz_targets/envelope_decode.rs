//! `cargo fuzz run envelope_decode` (nightly): the envelope decoder and the opener must reject
//! any input cleanly; nothing here may panic or allocate beyond the size limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_proto::{Envelope, Opener, SigningKey};
use std::sync::OnceLock;

fuzz_target!(|data: &[u8]| {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    let key = KEY.get_or_init(|| SigningKey::generate().expect("keygen"));
    if let Ok(env) = Envelope::decode(data) {
        assert_eq!(Envelope::decode(&env.encode()).as_ref(), Ok(&env));
        // No private keys: anything that gets past the signature check fails on the key id.
        assert!(Opener::new([]).open(&env, &key.verifying_key()).is_err());
    }
});
