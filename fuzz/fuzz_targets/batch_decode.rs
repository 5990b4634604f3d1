//! `cargo fuzz run batch_decode` (nightly): an agent's batch of envelopes from a hostile peer is
//! refused cleanly or decodes to envelopes within the limits, which encode to a batch that
//! decodes to the same envelopes (the bytes may differ: postcard reads non-shortest varints).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_proto::batch::{decode, Batch};
use pwsync_proto::limits::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = decode(data) {
        assert!(!list.is_empty() && list.len() <= MAX_BATCH_RECORDS);
        assert!(list.iter().map(|e| e.len()).sum::<usize>() <= MAX_BATCH_BYTES);
        let mut again = Batch::default();
        for e in &list {
            again.push(e.to_vec());
        }
        let wire = again.take_encoded();
        assert_eq!(decode(&wire).ok(), Some(list));
    }
});
