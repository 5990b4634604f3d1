//! The capture sources that run beside a directory server rather than behind the agent's PAM
//! or script socket: each turns what its server committed into the same `Request::Submit` any
//! other client sends, over the agent's local socket ([`crate::api`]). They own reading the
//! server's own record of a change (never what the client typed) and nothing of the daemon's
//! spool, forwarding or signing.
//!
//! - [`samba`]: a Samba AD DC, through `samba-tool user syncpasswords` (its script hook).
//! - [`ldapsock`]: OpenLDAP slapd, as a `back-sock` overlay answering the server's own
//!   password modifications and binds.

pub mod ldapsock;
pub mod samba;
