//! `pam_pwsync.so`: pwsync's password synchronizer for Linux hosts.
//!
//! Every password change through the PAM password stack (`passwd`, `chpasswd`, SSH password
//! expiry, display managers) runs `pam_sm_chauthtok` twice:
//!
//! - **preliminary check** (`PAM_PRELIM_CHECK`): the module asks the agent whether it can take a
//!   change for this user now (socket reachable, spool not full, user in scope). In strict mode a
//!   "no" fails the change with "password synchronization is unavailable; try again later", so
//!   the local password does not move ahead of the others.
//! - **update** (`PAM_UPDATE_AUTHTOK`): placed after `pam_unix`, the module gets the new
//!   password with `pam_get_authtok` (which prompts when no earlier module set it), submits it
//!   as a replace (with the old password, when the person typed it: PAM's old authentication
//!   token) and waits for the agent's durable answer. When the agent refuses the change by
//!   rule (not a valid change, a bad request), the person reads "password change rejected:
//!   REASON"; "unavailable; try again later" is kept for the agent being down, not answering, or
//!   unable to make the change durable, where trying again later may work.
//!
//! With `check`, placed *before* `pam_unix` in the password stack, the module takes the new
//! password (prompting for it, so `pam_unix use_authtok` sets the same one) and asks the agent
//! whether the password policy of every consumer group takes it; a refusal shows the rule and
//! where it came from ("password change rejected: at most 71 bytes: web stores bcrypt") and
//! fails the change before anything is set.
//!
//! In the `auth` stack with `backfill`, a successful login's password is sent as a backfill
//! (see `authenticate`).
//!
//! Options: `socket=PATH` (default `/run/pwsync/agent.sock`), `strict` (default) or `lenient`,
//! `timeout=SECONDS` (default 10), `backfill`, `check`. In lenient mode every failure is logged to syslog and the
//! change goes ahead. The module never logs the password; its copy is a zeroizing `Secret`.

#![forbid(unsafe_code)]

use pamsm::{LogLvl, Pam, PamError, PamFlags, PamLibExt, PamMsgStyle, PamServiceModule};
use pwsync_agent_api::blocking::request as request_blocking;
use pwsync_agent_api::{Request, Response};
use pwsync_proto::{Op, Secret};
use std::path::PathBuf;
use std::time::Duration;

/// Linux-PAM's flag values (not named by pamsm).
const PAM_PRELIM_CHECK: i32 = 0x4000;
const PAM_UPDATE_AUTHTOK: i32 = 0x2000;

/// What the person sees when a strict module refuses a change because the agent could not take
/// it now (down, not answering, spool full).
pub const UNAVAILABLE: &str = "password synchronization is unavailable; try again later";

/// What the person sees when the agent rejected the change itself: this, then the agent's reason.
pub const REJECTED: &str = "password change rejected: ";

/// The person's message for an agent's refusal `reason` (escaped and bounded: the agent's
/// words, not the terminal's control sequences).
pub fn rejected_message(reason: &str) -> String {
    format!("{REJECTED}{}", pwsync_proto::Untrusted(reason))
}

/// The module's options from the PAM service file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub socket: PathBuf,
    pub strict: bool,
    pub timeout: Duration,
    /// In the `auth` stack: send the password of a successful login as a backfill.
    pub backfill: bool,
    /// In the `password` stack before `pam_unix`: check the new password against the password
    /// policy, and refuse it before anything is set.
    pub check: bool,
}

impl Options {
    /// Parses `socket=PATH`, `strict`, `lenient`, `timeout=SECONDS`; unknown options are
    /// reported (and ignored) so a typo does not silently change behaviour.
    pub fn parse(args: &[String]) -> (Options, Vec<String>) {
        let mut o = Options {
            socket: PathBuf::from("/run/pwsync/agent.sock"),
            strict: true,
            timeout: Duration::from_secs(10),
            backfill: false,
            check: false,
        };
        let mut unknown = Vec::new();
        for a in args {
            match a.split_once('=') {
                Some(("socket", p)) => o.socket = PathBuf::from(p),
                Some(("timeout", t)) => match t.parse::<u64>() {
                    Ok(t) if t > 0 => o.timeout = Duration::from_secs(t),
                    _ => unknown.push(a.clone()),
                },
                None if a == "strict" => o.strict = true,
                None if a == "lenient" => o.strict = false,
                None if a == "backfill" => o.backfill = true,
                None if a == "check" => o.check = true,
                _ => unknown.push(a.clone()),
            }
        }
        (o, unknown)
    }
}

struct PamPwsync;

fn log(pamh: &Pam, lvl: LogLvl, msg: &str) {
    let _ = pamh.syslog(lvl, &format!("pam_pwsync: {msg}"));
}

/// The outcome for a failure: strict refuses (and tells the person `tell`), lenient logs and
/// goes on.
fn fail_with(pamh: &Pam, o: &Options, why: &str, tell: &str, strict_error: PamError) -> PamError {
    if o.strict {
        log(
            pamh,
            LogLvl::ERR,
            &format!("refusing the password change: {why}"),
        );
        let _ = pamh.conv(Some(tell), PamMsgStyle::ERROR_MSG);
        strict_error
    } else {
        log(
            pamh,
            LogLvl::ERR,
            &format!("LENIENT: password changed locally but NOT synchronized: {why}"),
        );
        PamError::SUCCESS
    }
}

/// [`fail_with`] for an agent that cannot take the change now: the person reads [`UNAVAILABLE`].
fn fail(pamh: &Pam, o: &Options, why: &str, strict_error: PamError) -> PamError {
    fail_with(pamh, o, why, UNAVAILABLE, strict_error)
}

/// [`fail_with`] for a change the agent refused by rule: the person reads its reason.
fn rejected(pamh: &Pam, o: &Options, reason: &str) -> PamError {
    let why = format!("the agent rejected it: {}", pwsync_proto::Untrusted(reason));
    fail_with(
        pamh,
        o,
        &why,
        &rejected_message(reason),
        PamError::AUTHTOK_ERR,
    )
}

/// With `check`, placed before `pam_unix`: gets the new password (prompting, as `pam_unix`
/// would, when no earlier module did; it stays set for `use_authtok`) and asks the agent
/// whether the password policy takes it. A policy refusal always refuses, with its reason (the
/// password would be refused at the targets); an agent that cannot answer follows strict or
/// lenient.
fn check(pamh: &Pam, o: &Options, user: &str) -> PamError {
    let password = match pamh.get_authtok(None) {
        Ok(Some(tok)) => Secret::new(tok.to_bytes().to_vec()),
        Ok(None) => return PamError::AUTHTOK_ERR,
        Err(e) => return e,
    };
    let req = Request::CheckPassword {
        user: user.to_string(),
        password,
    };
    match request_blocking(&o.socket, &req, o.timeout) {
        Ok(Response::Ready) | Ok(Response::Ignored { .. }) => PamError::SUCCESS,
        Ok(Response::Rejected { reason }) => {
            log(
                pamh,
                LogLvl::NOTICE,
                &format!(
                    "the password policy refused {user}'s new password: {}",
                    pwsync_proto::Untrusted(&reason)
                ),
            );
            let _ = pamh.conv(Some(&rejected_message(&reason)), PamMsgStyle::ERROR_MSG);
            PamError::AUTHTOK_ERR
        }
        // The agent cannot answer now (too many checks from this host at once).
        Ok(Response::NotReady { reason }) => fail(pamh, o, &reason, PamError::AUTHTOK_ERR),
        Ok(other) => fail(
            pamh,
            o,
            &format!("unexpected answer {other:?}"),
            PamError::AUTHTOK_ERR,
        ),
        Err(e) => fail(pamh, o, &e.to_string(), PamError::AUTHTOK_ERR),
    }
}

fn user(pamh: &Pam) -> Result<String, PamError> {
    match pamh.get_user(None) {
        Ok(Some(u)) => Ok(u.to_string_lossy().into_owned()),
        _ => Err(PamError::USER_UNKNOWN),
    }
}

impl PamServiceModule for PamPwsync {
    /// With `backfill`, after the module that authenticated the person (placed where only a
    /// success reaches it: after `requisite pam_deny.so` in Debian's common-auth, or after a
    /// `requisite` authenticating module): the password that module verified (PAM_AUTHTOK; this
    /// module never prompts) goes to the agent as a backfill. It never changes the login's
    /// outcome: always `PAM_IGNORE`.
    fn authenticate(pamh: Pam, _flags: PamFlags, args: Vec<String>) -> PamError {
        let (o, _) = Options::parse(&args);
        if !o.backfill {
            return PamError::IGNORE;
        }
        let Ok(user) = user(&pamh) else {
            return PamError::IGNORE;
        };
        let secret = match pamh.get_cached_authtok() {
            Ok(Some(tok)) if !tok.to_bytes().is_empty() => Secret::new(tok.to_bytes().to_vec()),
            _ => return PamError::IGNORE,
        };
        let req = Request::backfill(&user, secret);
        match request_blocking(&o.socket, &req, o.timeout) {
            Ok(Response::Accepted { seq, .. }) => log(
                &pamh,
                LogLvl::INFO,
                &format!("backfill: the password of {user}'s login sent as seq {seq}"),
            ),
            Ok(Response::Ignored { .. }) => {}
            Ok(other) => log(
                &pamh,
                LogLvl::WARNING,
                &format!("backfill of {user} not taken: {other:?}"),
            ),
            Err(e) => log(
                &pamh,
                LogLvl::WARNING,
                &format!("backfill of {user} not sent: {e}"),
            ),
        }
        PamError::IGNORE
    }

    fn chauthtok(pamh: Pam, flags: PamFlags, args: Vec<String>) -> PamError {
        let (o, unknown) = Options::parse(&args);
        if !unknown.is_empty() {
            log(
                &pamh,
                LogLvl::WARNING,
                &format!("unknown options ignored: {}", unknown.join(" ")),
            );
        }
        let user = match user(&pamh) {
            Ok(u) => u,
            Err(e) => return e,
        };
        let bits = flags.bits();
        if bits & PAM_PRELIM_CHECK != 0 {
            return match request_blocking(
                &o.socket,
                &Request::Probe { user: user.clone() },
                o.timeout,
            ) {
                Ok(Response::Ready) | Ok(Response::Ignored { .. }) => PamError::SUCCESS,
                Ok(Response::NotReady { reason }) => fail(&pamh, &o, &reason, PamError::TRY_AGAIN),
                Ok(other) => fail(
                    &pamh,
                    &o,
                    &format!("unexpected answer {other:?}"),
                    PamError::TRY_AGAIN,
                ),
                Err(e) => fail(&pamh, &o, &e.to_string(), PamError::TRY_AGAIN),
            };
        }
        if bits & PAM_UPDATE_AUTHTOK == 0 {
            return PamError::SUCCESS;
        }
        if o.check {
            return check(&pamh, &o, &user);
        }
        let secret = match pamh.get_authtok(None) {
            Ok(Some(tok)) => Secret::new(tok.to_bytes().to_vec()),
            Ok(None) => {
                return fail(
                    &pamh,
                    &o,
                    "no new password was given",
                    PamError::AUTHTOK_ERR,
                )
            }
            Err(e) => return e,
        };
        // Set when the person typed their current password (their own change, after pam_unix);
        // absent for root's `passwd USER`, an administrator's reset.
        let previous = match pamh.get_cached_oldauthtok() {
            Ok(Some(tok)) if !tok.to_bytes().is_empty() => {
                Some(Secret::new(tok.to_bytes().to_vec()))
            }
            _ => None,
        };
        // pam_unix has set it already: refusing it now would leave the local password ahead of
        // every other system, so the policy is checked before, by the `check` line.
        let req = Request::Submit {
            user: user.clone(),
            op: Op::Replace,
            values: vec![secret],
            attributes: pwsync_agent_api::committed_attributes(),
            previous,
        };
        match request_blocking(&o.socket, &req, o.timeout) {
            Ok(Response::Accepted { durable: true, seq }) => {
                log(
                    &pamh,
                    LogLvl::INFO,
                    &format!("password change of {user} taken by the agent as seq {seq}"),
                );
                PamError::SUCCESS
            }
            Ok(Response::Ignored { .. }) => PamError::SUCCESS,
            Ok(Response::Accepted { durable: false, .. }) => {
                log(&pamh, LogLvl::ERR, &format!("the agent took the change of {user} without making it durable (lenient agent)"));
                PamError::SUCCESS
            }
            Ok(Response::Rejected { reason }) => rejected(&pamh, &o, &reason),
            Ok(Response::Error { message }) => rejected(&pamh, &o, &message),
            Ok(Response::Unavailable { reason }) => fail(&pamh, &o, &reason, PamError::AUTHTOK_ERR),
            Ok(other) => fail(
                &pamh,
                &o,
                &format!("unexpected answer {other:?}"),
                PamError::AUTHTOK_ERR,
            ),
            Err(e) => fail(&pamh, &o, &e.to_string(), PamError::AUTHTOK_ERR),
        }
    }
}

pamsm::pam_module!(PamPwsync);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let args = |s: &[&str]| s.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let (o, unknown) =
            Options::parse(&args(&["socket=/tmp/s", "lenient", "timeout=3", "bogus"]));
        assert_eq!(o.socket, PathBuf::from("/tmp/s"));
        assert!(!o.strict);
        assert_eq!(o.timeout, Duration::from_secs(3));
        assert_eq!(unknown, vec!["bogus".to_string()]);
        let (o, _) = Options::parse(&[]);
        assert!(o.strict);
        assert!(!o.check);
        assert!(Options::parse(&args(&["check"])).0.check);
    }

    #[test]
    fn a_rejection_names_the_reason_on_one_line() {
        assert_eq!(
            rejected_message("invalid change: user name must be 1 to 256 bytes"),
            "password change rejected: invalid change: user name must be 1 to 256 bytes"
        );
        assert_eq!(
            rejected_message("a\nb\u{1b}"),
            "password change rejected: a\\nb\\u{1b}"
        );
        assert_eq!(rejected_message("a\nb"), "password change rejected: a\\nb");
    }
}
