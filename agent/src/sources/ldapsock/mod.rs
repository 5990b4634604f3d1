//! Capture on OpenLDAP, through slapd's sock overlay, in two phases.
//!
//! `pwsync-agent ldap-sock` serves slapd-sock(5)'s protocol on a Unix socket of its own
//! (`[ldap_sock] socket`, only slapd's user may connect). slapd, with `overlay sock`,
//! `sockops modify extended`, `sockresps result` and `extensions binddn connid`, connects once
//! per message: before it applies an operation it sends the request and waits for `CONTINUE`
//! (go on) or a `RESULT` (the operation ends with it); after an operation it sends its `RESULT`.
//! Configured after (above) ppolicy, the overlay sees the password as the client sent it,
//! before ppolicy hashes it.
//!
//! **A capture is what the directory will hold, for the account it stores.** A MODIFY's
//! `userPassword` modifications are applied in order with LDAP's semantics by one pure model
//! ([`modification`]), which gives the pwsync operations that leave every target holding what
//! the directory holds after the commit: a delete-old/add-new (either order) is the person's
//! own change, a replace with its previous password; everything deleted is a delete with no
//! value; other mixes are deletes and adds of what changed. A Password Modify (RFC 3062) is a
//! replace with its `newPasswd`, for `userIdentity` or the bound DN, with `oldPasswd` as the
//! previous password when given. The account is the entry's DN as the directory stores it
//! ([`directory`]), mapped by [`naming`], never the request's spelling. Before slapd goes on,
//! the agent vets every operation as it will be submitted (the user name, every value, the
//! password policy on every new value): the source never commits what the agent will refuse.
//! What pwsync cannot carry whole (a value sent already hashed, a generated password, a name
//! or value the agent refuses) is refused in `strict` mode with `constraintViolation` and the
//! reason the person sees; in `lenient` mode it goes through, counted, logged, and listed as
//! not synchronised in the status file ([`capture`]).
//!
//! Two phases, and what they guarantee:
//! - **Pending before slapd goes on.** A captured change is committed, sealed, to
//!   `STATE_DIR/ldap-pending.redb` ([`store`]) before the answer is `CONTINUE`. In `strict`
//!   mode (the default) the agent must also say it takes the change now; when either fails the
//!   answer is a RESULT `unavailable (52)` and slapd refuses the change: nothing changes
//!   anywhere. In `lenient` mode slapd goes on, and the log says whether the change was kept
//!   (it is forwarded when the agent is back) or lost.
//! - **Confirmed by the result.** slapd's RESULT for the operation (matched by connection and
//!   message id) forwards the pending change when its code is 0, and discards it otherwise (a
//!   ppolicy refusal, a wrong old password): a change slapd refused is never forwarded.
//! - **Settled, never guessed.** A pending change with no result after `settle_secs` (slapd or
//!   this process killed in between, or a refusal slapd does not report to overlays, as a wrong
//!   old password in a Password Modify) is checked against the directory: a simple bind as the
//!   entry with a password it sets (or deletes). It says applied: the change is forwarded; not
//!   applied: discarded; anything else: checked again later. A change that deletes every value
//!   leaves nothing to bind with and is discarded, counted and logged. Nothing pending is
//!   forwarded unconfirmed, and nothing confirmed is lost.
//! - **Backfill** (`backfill = true`, off by default; slapd needs `sockops bind` too): a
//!   password proven at a successful simple bind is handed to the agent as a backfill when it
//!   is news ([`binds`]). Consumers apply a backfill only where pwsync never wrote for the user
//!   and never after a real change of theirs, so a login with an old password cannot undo a
//!   change.
//! - **No echo.** Changes made by `ignore_bind_dns` (the directory target's own bind DN) are not
//!   captured: pwsync's own writes do not come back to it.
//!
//! What happened is counted ([`COUNTED`]) in `STATE_DIR/ldap-sock-status.json`, written every
//! second with the accounts not synchronised and since when, and, with `metrics_listen`, on
//! `/metrics` as `pwsync_ldapsock_events_total{event=…}` beside the pending changes' number and
//! oldest age; `/healthz` fails while a change has waited longer than [`STUCK_AFTER_SECS`] (the
//! agent or the directory unreachable).
//!
//! The parts: [`message`] (slapd's messages), [`ber`] (the Password Modify request),
//! [`modification`] (the pure model), [`directory`] and [`naming`] (the account), [`store`]
//! (pending changes), [`capture`] (the decisions), [`binds`] (backfill), [`serve`] (the loop).

pub mod ber;
pub mod binds;
pub mod capture;
pub mod config;
pub mod directory;
pub mod message;
pub mod modification;
pub mod naming;
pub mod serve;
pub mod store;

pub use ber::{parse_passwd_modify, PasswdModify, PASSWD_MODIFY_OID};
pub use capture::{Answer, Capture, COUNTED, STUCK_AFTER_SECS};
pub use config::{LdapSockConfig, SockMode};
pub use message::Message;
pub use naming::{user_of_dn, user_of_dn_by_template, UserNaming};
pub use serve::serve;

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SockError {
    #[error("slapd's message: {0}")]
    Message(String),
    #[error("{0}")]
    Config(String),
    #[error("the pending store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("the socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// For the tests of what a kill in the middle leaves: `PWSYNC_LDAPSOCK_FAILPOINT` set to
/// `exit-after-pending` ends the process (as a SIGKILL would: nothing runs after) once a captured
/// change is committed pending and before slapd is answered; `pause-after-pending` waits 5 s
/// there; `exit-at-result` ends it when slapd's result for a pending change arrives.
fn failpoint(at: &str) {
    static SET: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let set = SET.get_or_init(|| std::env::var("PWSYNC_LDAPSOCK_FAILPOINT").ok());
    match set.as_deref() {
        Some(s) if s == format!("exit-{at}") => {
            // SAFETY: _exit ends the process at once; nothing is left half-written that a
            // SIGKILL would not also leave.
            unsafe { libc::_exit(137) }
        }
        Some(s) if s == format!("pause-{at}") => std::thread::sleep(Duration::from_secs(5)),
        _ => {}
    }
}
