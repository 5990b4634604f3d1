//! `tests/fuzz.sh` (nightly): whatever bytes a client sends the relay's MQTT gateway, it parses
//! whole packets or refuses, and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pwsync_relay::gateway::parse_all(data);
});
