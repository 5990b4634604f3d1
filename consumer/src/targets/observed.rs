//! What a target says it holds of an account's password now, for the account audit
//! ([`crate::audit`]): its change time, who made the change, and what identifies the stored
//! password. It is part of the [`super::Target`] vocabulary ([`super::Target::observe`]); never
//! a password, and a stored hash only long enough to be fingerprinted.

use zeroize::Zeroizing;

/// What identifies the password a target stores, as it reads it.
pub enum Verifier {
    /// The stored hash or verifier, as the target stores it (fingerprinted, then dropped: a
    /// stored hash can be cracked offline, so it is never kept, printed or logged).
    Stored(Zeroizing<Vec<u8>>),
    /// A version that goes up with every password set (Kerberos' and AD's key version number).
    Version(u64),
}

/// What a target records of an account's password now. Never a password.
#[derive(Default)]
pub struct Seen {
    /// When the target recorded its last password change (ms since the epoch, its own clock).
    pub changed_at_ms: Option<u64>,
    /// Who made it, where the target records that.
    pub changed_by: Option<String>,
    pub verifier: Option<Verifier>,
}

/// A target's answer about one account.
pub enum Observed {
    /// This kind of target keeps nothing an audit could compare.
    Unsupported,
    /// No such account there.
    Missing,
    Present(Seen),
    /// The target could not be read now (why, in words).
    Unreadable(String),
}
