//! `tests/fuzz.sh` (nightly): a frame from a local client of the agent's socket (PAM, scripts,
//! anything that can open it) is decoded or refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_agent::api::{decode, Request, Response};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<Request>("request", data);
    let _ = decode::<Response>("response", data);
});
