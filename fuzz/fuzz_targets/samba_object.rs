//! `tests/fuzz.sh` (nightly): an object's LDIF as samba-tool hands it to the hook is read or
//! refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_agent::sources::samba::Object;

fuzz_target!(|data: &[u8]| {
    let _ = Object::parse(data);
});
