//! `tests/fuzz.sh` (nightly): a decrypted change body that is not a valid change is refused
//! cleanly (the opener decodes with exactly this call after AES-GCM).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_proto::codec::decode_exact;
use pwsync_proto::Change;

fuzz_target!(|data: &[u8]| {
    if let Ok(change) = decode_exact::<Change>("change", data) {
        let _ = change.validate();
    }
});
