//! `tests/fuzz.sh` (nightly): a spool export file (`pwsync-relay journal import`) is read record
//! by record or refused, however it was damaged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_proto::export::ExportReader;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = ExportReader::new(data) {
        // Each call consumes input or ends: bounded by the input's length.
        for _ in 0..=data.len() {
            match r.next_envelope() {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
