//! `tests/fuzz.sh` (nightly): a message on ldap-sock's socket (slapd's, or anyone's the peer
//! check let through) is read or refused, and what it modifies is modelled or refused, never a
//! panic; the same for a Password Modify request's BER.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pwsync_agent::sources::ldapsock::{message::Message, modification, parse_passwd_modify};

fuzz_target!(|data: &[u8]| {
    let _ = parse_passwd_modify(data);
    if let Ok(m) = Message::parse(data) {
        let _ = m.op_id();
        if let Ok(mods) = m.password_mods() {
            if let Ok(effect) = modification::effect(&mods) {
                let _ = effect.carry();
            }
        }
    }
});
