//! The local socket server: source hooks submit changes here.
//!
//! Who may connect: the socket file has the configured mode and group, and every connection's
//! peer credentials (`SO_PEERCRED`) are checked as well: root, the agent's own user and members
//! of the configured group are served; anyone else gets an error reply and is logged by uid.
//! A bad request (undecodable, oversized, slow) gets an error reply and that connection is
//! closed; the server keeps serving everyone else.

use crate::admission::{self, Refusal};
use crate::api::{self, FrameError, Request, Response, StatusReport};
use crate::config::Mode;
use crate::scope::Scope;
use crate::unix_users::in_group;
use crate::writer::{Outcome, WriterHandle};
use pwsync_proto::{Change, Untrusted};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};

/// How long a client may take to send a request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters and state the status request reports, shared with the forwarder.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub ignored: AtomicU64,
    pub connected: std::sync::atomic::AtomicBool,
    /// Wall-clock ms of the last verified ack (0: none yet).
    pub last_ack_ms: AtomicU64,
}

pub struct Server {
    pub writer: WriterHandle,
    /// Replaced by a reload.
    pub scope: std::sync::RwLock<Scope>,
    pub mode: Mode,
    pub origin: String,
    pub counters: Arc<Counters>,
    pub status: Arc<dyn Fn() -> StatusReport + Send + Sync>,
    pub allowed_gid: Option<u32>,
    /// Users besides root and the agent's own whose submits may carry
    /// [`api::COMMITTED_ATTRIBUTE`] (`[socket] committers`).
    pub committer_uids: Vec<u32>,
    /// Whether a backfill is news ([`crate::backfill`]).
    pub backfill: Arc<crate::backfill::Gate>,
    /// The password policies enforced here (`[policy]`); none: every password passes.
    pub policies: Option<Arc<crate::policy::Policies>>,
    /// How fast each peer may ask `CheckPassword`, and how often its refusals are logged.
    pub checks: crate::throttle::CheckThrottle,
}

/// Who is asking for a judgement of a change, which decides what is counted and logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    /// A submit: a refusal is a rejected change (counted as such, logged).
    Submit,
    /// A source vetting a change before it commits it (ldap-sock), from this peer: as a check.
    Vet { peer: u32 },
    /// `CheckPassword` from this peer: refusals logged at most once a minute per peer.
    Check { peer: u32 },
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Binds the socket: removes a stale socket file, sets mode and group.
pub fn bind(path: &Path, mode: u32, gid: Option<u32>) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another process is serving {}; is an agent already running with this config?",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .with_context(|| format!("setting group {gid} on {}", path.display()))?;
    }
    Ok(listener)
}

impl Server {
    /// Whether a change could be made durable now: the answer to a probe.
    fn room(&self) -> Response {
        let status = (self.status)();
        if status.spool_bytes + 4096 > status.spool_max_bytes {
            Response::NotReady {
                reason: crate::writer::SPOOL_FULL.into(),
            }
        } else {
            Response::Ready
        }
    }

    /// Serves connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let me = self.clone();
                        tokio::spawn(async move { me.handle(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a socket connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Whether this agent's scope takes changes for `user`.
    fn admits(&self, user: &str) -> bool {
        self.scope
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .admits(user)
    }

    /// The peer's uid when it may submit.
    fn allowed(&self, stream: &UnixStream) -> Result<u32, String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("cannot read peer credentials: {e}"))?;
        let (uid, gid) = (cred.uid(), cred.gid());
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if uid == 0 || uid == me || self.allowed_gid.is_some_and(|g| in_group(uid, gid, g)) {
            return Ok(uid);
        }
        Err(format!(
            "permission denied: uid {uid} is not root, not the agent's user and not in the agent's socket group"
        ))
    }

    /// Whether a submit from `uid` may say the source has committed the password already.
    fn may_commit(&self, uid: u32) -> bool {
        // SAFETY: geteuid has no preconditions.
        admission::may_commit(uid, unsafe { libc::geteuid() }, &self.committer_uids)
    }

    async fn handle(&self, mut stream: UnixStream) {
        let peer = match self.allowed(&stream) {
            Ok(uid) => uid,
            Err(message) => {
                tracing::warn!(%message, "refused a socket client");
                // Take the client's request first (bounded like any other), so it is not cut
                // off mid-write and actually reads why it was refused.
                let _ = api::read_frame(&mut stream, REQUEST_TIMEOUT).await;
                let _ =
                    api::write_frame(&mut stream, "response", &Response::Error { message }).await;
                return;
            }
        };
        loop {
            let frame = match api::read_frame(&mut stream, REQUEST_TIMEOUT).await {
                Ok(f) => f,
                Err(FrameError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "bad request on the socket");
                    let _ = api::write_frame(
                        &mut stream,
                        "response",
                        &Response::Error {
                            message: e.to_string(),
                        },
                    )
                    .await;
                    return;
                }
            };
            let response = match api::decode::<Request>("request", &frame) {
                Ok(request) => self.answer(request, peer).await,
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable request on the socket");
                    let message = format!("bad request: {e}");
                    let _ = api::write_frame(&mut stream, "response", &Response::Error { message })
                        .await;
                    return;
                }
            };
            if api::write_frame(&mut stream, "response", &response)
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Logs `what` (a refusal), unless `asker` is a peer's `CheckPassword` or `Vet` and that
    /// peer logged within the last minute ([`crate::throttle`]): then it is only counted, and
    /// the next line says how many were not logged.
    fn log_refusal(&self, asker: Asker, what: impl FnOnce(u64)) {
        match asker {
            Asker::Check { peer } | Asker::Vet { peer } => {
                if let Some(unlogged) = self.checks.may_log(peer, std::time::Instant::now()) {
                    what(unlogged);
                }
            }
            Asker::Submit => what(0),
        }
    }

    /// The change a request describes, if [`admission::judge`] admits it; else the answer
    /// that refuses it, counted and logged by who asked (a refused submit is counted as
    /// rejected, a refused vet or check in its own metric; checks and vets are logged at most
    /// once a minute per peer).
    fn judge(&self, change: Change, skip_policy: bool, asker: Asker) -> Result<Change, Response> {
        let refusal = {
            let scope = self.scope.read().unwrap_or_else(|e| e.into_inner());
            admission::judge(
                &change,
                &scope,
                self.policies.as_deref(),
                skip_policy,
                wall_ms(),
            )
        };
        let Err(refusal) = refusal else {
            return Ok(change);
        };
        let submit = asker == Asker::Submit;
        let (user, op) = (Untrusted(&change.user), change.op);
        match &refusal {
            Refusal::OutOfScope if submit => {
                self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::info!(user = ?user, %op, "ignored: user outside scope");
            }
            Refusal::OutOfScope | Refusal::Internal => {}
            Refusal::Invalid(reason) => {
                if submit {
                    self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("pwsync_agent_rejected_total", "reason" => "invalid")
                        .increment(1);
                }
                self.log_refusal(asker, |unlogged| {
                    tracing::warn!(
                        user = ?user, %op, %reason, ?asker,
                        not_logged_since_the_last_line = unlogged,
                        "rejected: not a valid change"
                    )
                });
            }
            Refusal::Policy(reason) => {
                match asker {
                    Asker::Submit => {
                        self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("pwsync_agent_rejected_total", "reason" => "policy")
                            .increment(1);
                    }
                    Asker::Vet { .. } => {
                        metrics::counter!("pwsync_agent_policy_checks_refused_total").increment(1);
                    }
                    Asker::Check { .. } => {}
                }
                self.log_refusal(asker, |unlogged| {
                    tracing::info!(
                        user = ?user, reason, ?asker,
                        not_logged_since_the_last_line = unlogged,
                        "refused by the password policy"
                    )
                });
            }
        }
        Err(refusal.response(&change.user))
    }

    /// A change from this agent's origin.
    fn change(
        &self,
        user: String,
        op: pwsync_proto::Op,
        values: Vec<pwsync_proto::Secret>,
        attributes: std::collections::BTreeMap<String, String>,
        previous: Option<pwsync_proto::Secret>,
    ) -> Change {
        Change {
            user,
            origin: self.origin.clone(),
            op,
            values,
            attributes,
            previous,
        }
    }

    /// Waits for `peer`'s turn to have a password checked ([`crate::throttle`]); the answer
    /// that turns the check away when its turn would come too late.
    async fn wait_for_a_check_turn(&self, peer: u32, user: &str) -> Option<Response> {
        match self.checks.turn(peer, user, std::time::Instant::now()) {
            crate::throttle::Turn::Now => None,
            crate::throttle::Turn::After(wait) => {
                metrics::counter!("pwsync_agent_password_checks_slowed_total").increment(1);
                tokio::time::sleep(wait).await;
                None
            }
            crate::throttle::Turn::TurnedAway => {
                metrics::counter!("pwsync_agent_password_checks_total", "outcome" => "turned_away")
                    .increment(1);
                self.log_refusal(Asker::Check { peer }, |unlogged| {
                    tracing::warn!(
                        uid = peer,
                        not_logged_since_the_last_line = unlogged,
                        "too many password checks from one peer: turned away (at most {} a second after {} at once)",
                        crate::throttle::PER_SECOND,
                        crate::throttle::BURST
                    )
                });
                Some(Response::NotReady {
                    reason: format!(
                        "too many password checks from uid {peer} (at most {} a second); try again in a few seconds",
                        crate::throttle::PER_SECOND
                    ),
                })
            }
        }
    }

    async fn answer(&self, request: Request, peer: u32) -> Response {
        match request {
            Request::Status => Response::Status(Box::new((self.status)())),
            Request::Probe { user } => {
                if !self.admits(&user) {
                    return Response::Ignored {
                        reason: format!("user {user:?} is outside this agent's scope"),
                    };
                }
                self.room()
            }
            // The password as a replace would carry it: a valid change (name, length) that the
            // policy takes. A source that asks before it sets the password (PAM's `check` line)
            // then never sets one its submit would have refused.
            Request::CheckPassword { user, password } => {
                if let Some(turned_away) = self.wait_for_a_check_turn(peer, &user).await {
                    return turned_away;
                }
                let change = self.change(
                    user,
                    pwsync_proto::Op::Replace,
                    vec![password],
                    Default::default(),
                    None,
                );
                let answer = match self.judge(change, false, Asker::Check { peer }) {
                    Ok(_) => Response::Ready,
                    Err(refusal) => refusal,
                };
                let outcome = match answer {
                    Response::Ready => "passed",
                    Response::Ignored { .. } => "outside_scope",
                    _ => "refused",
                };
                metrics::counter!("pwsync_agent_password_checks_total", "outcome" => outcome)
                    .increment(1);
                answer
            }
            // The same question as CheckPassword for a source's change: the same limit.
            Request::Vet {
                user,
                op,
                values,
                previous,
            } => match self.wait_for_a_check_turn(peer, &user).await {
                Some(turned_away) => turned_away,
                None => match self.judge(
                    self.change(user, op, values, Default::default(), previous),
                    false,
                    Asker::Vet { peer },
                ) {
                    Ok(_) => self.room(),
                    Err(refusal) => refusal,
                },
            },
            Request::Submit {
                user,
                op,
                values,
                mut attributes,
                previous,
            } => {
                let marked = attributes.remove(api::COMMITTED_ATTRIBUTE).is_some();
                let backfill = attributes.contains_key(pwsync_proto::change::BACKFILL_ATTRIBUTE);
                let trusted = self.may_commit(peer);
                if (marked || backfill) && !trusted {
                    tracing::warn!(
                        user = ?Untrusted(&user),
                        uid = peer,
                        "a submit says the password is set already (or was seen at a login), but uid {peer} is not a committer ([socket] committers): the password policy applies"
                    );
                }
                let change = self.change(user, op, values, attributes, previous);
                let change =
                    match self.judge(change, trusted && (marked || backfill), Asker::Submit) {
                        Ok(change) => change,
                        Err(refusal) => return refusal,
                    };
                let user = change.user.clone();
                let backfill = change.is_backfill();
                if backfill {
                    let why = match (change.op, change.values.as_slice()) {
                        (pwsync_proto::Op::Replace, [v]) => {
                            self.backfill.refuses(&change.user, v.expose(), wall_ms())
                        }
                        _ => Some("backfill: only a replace with one value".into()),
                    };
                    if let Some(reason) = why {
                        self.counters.ignored.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(user = ?Untrusted(&change.user), reason, "backfill not forwarded");
                        return Response::Ignored { reason };
                    }
                }
                // What is forwarded (a replace's or an add's password) is no news for a backfill.
                let forwarded = match (change.op, change.values.first()) {
                    (pwsync_proto::Op::Replace | pwsync_proto::Op::Add, Some(v)) => {
                        Some(zeroize::Zeroizing::new(v.expose().to_vec()))
                    }
                    _ => None,
                };
                match self.writer.submit(change).await {
                    Outcome::Durable(seq) => {
                        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                        if let Some(pw) = &forwarded {
                            if let Err(e) = self.backfill.record(&user, pw, backfill, wall_ms()) {
                                tracing::warn!(error = %e, "recording a forwarded password's fingerprint");
                            }
                        }
                        if backfill {
                            metrics::counter!("pwsync_agent_backfill_total").increment(1);
                            tracing::info!(user = ?Untrusted(&user), %seq, "backfill accepted: a password seen at a login");
                        }
                        tracing::debug!(user = ?Untrusted(&user), %op, %seq, "accepted");
                        Response::Accepted {
                            seq: seq.0,
                            durable: true,
                        }
                    }
                    Outcome::Failed(reason) => match self.mode {
                        crate::config::Mode::Strict => {
                            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("pwsync_agent_rejected_total", "reason" => "not_durable")
                                .increment(1);
                            tracing::warn!(user = ?Untrusted(&user), %op, %reason, "not taken: the change could not be made durable");
                            Response::Unavailable { reason }
                        }
                        crate::config::Mode::Lenient => {
                            self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("pwsync_agent_accepted_not_durable_total")
                                .increment(1);
                            tracing::error!(
                                user = ?Untrusted(&user), %op, %reason,
                                "LENIENT MODE: change accepted but NOT spooled; it will not reach other systems"
                            );
                            Response::Accepted {
                                seq: 0,
                                durable: false,
                            }
                        }
                    },
                }
            }
        }
    }
}
