//! How fast each socket peer may ask "would this password pass?" (`CheckPassword`), and how
//! often its refusals reach the log.
//!
//! A check reveals no one's password, but it is cheap to ask (tens of thousands a second) and
//! each refusal was a log line, so one client could flood the log and probe the policy at
//! machine speed. Each peer (the uid `SO_PEERCRED` gives) has a token bucket; the checks of
//! root and of the agent's own user have one per account instead, because PAM runs as root for
//! everyone's `passwd` (and ldap-sock vets every directory change): one person flooding through
//! `passwd` must not slow anyone else's change (those two users are trusted anyway):
//!
//! - [`BURST`] checks are answered at once; after that [`PER_SECOND`] a second. A check over
//!   the rate is *slowed*: it is answered when its turn comes (reservations: the bucket goes
//!   into debt, so waiting checks are served in order and the rate holds however many wait).
//! - A check whose turn would come more than [`MAX_WAIT`] from now is *turned away* at once
//!   ("too many password checks"), taking no turn: a flood cannot hold connections open for
//!   ever, and PAM (10 s by default) hears an answer before it gives up.
//! - Each peer's refusals and turn-aways are logged at most once per [`LOG_EVERY`]; the line
//!   says how many were not logged since the last one. Every one is counted in the metrics.
//!
//! People never notice: a password change is one check. A bulk `chpasswd` through PAM's
//! `check` line (root, one peer) runs at [`PER_SECOND`] changes a second after the first
//! [`BURST`]. Time is passed in (`now`), so the rules are tested without waiting.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Checks a peer may make at once, with a full bucket.
pub const BURST: u32 = 50;
/// Checks a second a peer may make after its burst.
pub const PER_SECOND: u32 = 20;
/// The longest a check waits for its turn; later turns are turned away.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// At most one log line per peer in this time.
pub const LOG_EVERY: Duration = Duration::from_secs(60);

/// Peers remembered at most; beyond it, those whose bucket has refilled are forgotten.
const MAX_PEERS: usize = 4096;

/// When a check may be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Now.
    Now,
    /// After this wait (its turn is reserved).
    After(Duration),
    /// Not at all: its turn would come after [`MAX_WAIT`].
    TurnedAway,
}

#[derive(Debug)]
struct Peer {
    /// Tokens at `at`; negative while checks wait for their turn.
    tokens: f64,
    at: Instant,
    /// When this peer's last line was logged.
    logged_at: Option<Instant>,
    /// Log-worthy events since then that were not logged.
    unlogged: u64,
}

impl Peer {
    fn new(now: Instant) -> Peer {
        Peer {
            tokens: f64::from(BURST),
            at: now,
            logged_at: None,
            unlogged: 0,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(PER_SECOND)).min(f64::from(BURST));
        self.at = now.max(self.at);
    }
}

/// Every peer's bucket and log allowance.
#[derive(Debug, Default)]
pub struct CheckThrottle {
    /// Keyed by uid and, for root, the account checked ("" for a peer's log allowance).
    peers: Mutex<HashMap<(u32, String), Peer>>,
}

impl CheckThrottle {
    fn with_peer<T>(&self, peer: (u32, String), now: Instant, f: impl FnOnce(&mut Peer) -> T) -> T {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, p| {
                p.refill(now);
                p.tokens < f64::from(BURST)
                    || p.logged_at
                        .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
            });
        }
        let entry = peers.entry(peer).or_insert_with(|| Peer::new(now));
        entry.refill(now);
        f(entry)
    }

    /// Takes `peer`'s next turn for a check of `account`'s password asked at `now`.
    pub fn turn(&self, peer: u32, account: &str, now: Instant) -> Turn {
        // SAFETY: geteuid has no preconditions.
        let trusted = peer == 0 || peer == unsafe { libc::geteuid() };
        let key = (
            peer,
            if trusted {
                account.into()
            } else {
                String::new()
            },
        );
        self.with_peer(key, now, |p| {
            if p.tokens >= 1.0 {
                p.tokens -= 1.0;
                return Turn::Now;
            }
            let wait = Duration::from_secs_f64((1.0 - p.tokens) / f64::from(PER_SECOND));
            if wait > MAX_WAIT {
                return Turn::TurnedAway;
            }
            p.tokens -= 1.0;
            Turn::After(wait)
        })
    }

    /// Whether something about `peer` may be logged at `now`: `Some(n)` when it may, `n` being
    /// how many were not logged since its last line; `None` (and it is counted) when not.
    pub fn may_log(&self, peer: u32, now: Instant) -> Option<u64> {
        self.with_peer((peer, String::new()), now, |p| match p.logged_at {
            Some(t) if now.saturating_duration_since(t) < LOG_EVERY => {
                p.unlogged += 1;
                None
            }
            _ => {
                p.logged_at = Some(now);
                Some(std::mem::take(&mut p.unlogged))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_then_the_rate_then_turned_away_and_each_peer_on_its_own() {
        let t = CheckThrottle::default();
        let now = Instant::now();
        for _ in 0..BURST {
            assert_eq!(t.turn(7, "ann", now), Turn::Now);
        }
        // Turns are reserved one after another at the rate, up to MAX_WAIT.
        let waiting = (MAX_WAIT.as_secs_f64() * f64::from(PER_SECOND)) as u32;
        let mut last = Duration::ZERO;
        for i in 1..=waiting {
            match t.turn(7, "bob", now) {
                Turn::After(wait) => {
                    let want = Duration::from_secs_f64(f64::from(i) / f64::from(PER_SECOND));
                    assert!(wait.abs_diff(want) < ms(1), "turn {i}: {wait:?}");
                    assert!(wait > last);
                    last = wait;
                }
                other => panic!("turn {i}: {other:?}"),
            }
        }
        assert_eq!(t.turn(7, "ann", now), Turn::TurnedAway);
        assert_eq!(
            t.turn(7, "ann", now),
            Turn::TurnedAway,
            "a turn-away takes no turn"
        );
        // Another peer is not slowed by the first; nor is root's check of one account by a
        // flood of root's checks of another (PAM runs as root for everyone).
        assert_eq!(t.turn(1000, "ann", now), Turn::Now);
        for _ in 0..BURST {
            assert_eq!(t.turn(0, "mallory", now), Turn::Now);
        }
        assert!(matches!(t.turn(0, "mallory", now), Turn::After(_)));
        assert_eq!(t.turn(0, "ann", now), Turn::Now);
        // Time pays the debt back: after MAX_WAIT the queue is gone, one more second gives
        // PER_SECOND turns at once.
        let later = now + MAX_WAIT + Duration::from_secs(1);
        for _ in 0..PER_SECOND {
            assert_eq!(t.turn(7, "x", later), Turn::Now);
        }
        assert!(matches!(t.turn(7, "x", later), Turn::After(_)));
        // A long quiet refills to BURST, never beyond.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..BURST {
            assert_eq!(t.turn(7, "x", much_later), Turn::Now);
        }
        assert!(matches!(t.turn(7, "x", much_later), Turn::After(_)));
    }

    #[test]
    fn at_most_one_line_a_minute_per_peer_saying_how_many_were_not_logged() {
        let t = CheckThrottle::default();
        let now = Instant::now();
        assert_eq!(t.may_log(7, now), Some(0));
        for i in 1..=100 {
            assert_eq!(t.may_log(7, now + ms(i * 100)), None);
        }
        assert_eq!(t.may_log(8, now), Some(0), "another peer logs on its own");
        assert_eq!(t.may_log(7, now + LOG_EVERY - ms(1)), None);
        assert_eq!(t.may_log(7, now + LOG_EVERY), Some(101));
        assert_eq!(t.may_log(7, now + LOG_EVERY + ms(1)), None);
    }

    #[test]
    fn many_peers_are_forgotten_once_their_buckets_are_full_again() {
        let t = CheckThrottle::default();
        let now = Instant::now();
        for uid in 1..=MAX_PEERS as u32 {
            t.turn(uid, "", now);
        }
        assert_eq!(t.turn(1, "", now), Turn::Now);
        let later = now + Duration::from_secs(10);
        assert_eq!(t.turn(u32::MAX, "", later), Turn::Now);
        let peers = t.peers.lock().unwrap();
        assert!(peers.len() < 10, "{} peers kept", peers.len());
    }
}
