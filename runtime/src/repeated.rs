//! Errors that repeat, logged once with a count rather than at every attempt.
//!
//! A daemon that retries something failing (a journal without a quorum, a relay that cannot be
//! reached) would otherwise write the same line several times a second. A [`Repeated`] stands
//! for one such failing thing: the first failure of a streak is logged as it is; later ones are
//! counted, and at most one summary line per interval says how often it failed again since the
//! last line ("… again 42 times in the last 60 s"), with the latest error; when it works again,
//! one line says after how many failures and how long. So a 20 s outage is two lines, each with
//! its count, however often it was retried.
//!
//! The decisions are pure ([`Repeated::failed_at`], [`Repeated::worked_at`]: time is an input),
//! and [`Repeated::failed`] and [`Repeated::worked`] log them at the level given.

use std::fmt::Display;
use std::time::{Duration, Instant};
use tracing::Level;

/// The default interval between two lines about one failing thing.
pub const EVERY: Duration = Duration::from_secs(60);

/// What to log for one failure ([`Repeated::failed_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The first of a streak: log it as it is.
    First,
    /// Log a summary: it failed `times` times since the last line, which was `over` ago.
    Again { times: u64, over: Duration },
    /// Counted, not logged.
    Counted,
}

/// What to log when it works again ([`Repeated::worked_at`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Failures in the streak, the first included.
    pub failures: u64,
    /// From the first failure to now.
    pub lasted: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Streak {
    since: Instant,
    failures: u64,
    /// Failures since the last line.
    unlogged: u64,
    logged_at: Instant,
}

/// One thing that may fail again and again (see the module docs).
#[derive(Debug, Clone)]
pub struct Repeated {
    what: &'static str,
    level: Level,
    every: Duration,
    streak: Option<Streak>,
}

impl Repeated {
    /// `what` is the line's message ("cannot read the journal"); failures are logged at `level`
    /// and summarised at most once per [`EVERY`].
    pub fn new(what: &'static str, level: Level) -> Repeated {
        Repeated::every(what, level, EVERY)
    }

    /// [`Repeated::new`] with another interval between lines.
    pub fn every(what: &'static str, level: Level, every: Duration) -> Repeated {
        Repeated {
            what,
            level,
            every,
            streak: None,
        }
    }

    /// Whether the last thing heard was a failure.
    pub fn failing(&self) -> bool {
        self.streak.is_some()
    }

    /// One failure at `now`: what to log.
    pub fn failed_at(&mut self, now: Instant) -> Failure {
        let Some(s) = &mut self.streak else {
            self.streak = Some(Streak {
                since: now,
                failures: 1,
                unlogged: 0,
                logged_at: now,
            });
            return Failure::First;
        };
        s.failures += 1;
        s.unlogged += 1;
        let over = now.saturating_duration_since(s.logged_at);
        if over < self.every {
            return Failure::Counted;
        }
        let times = std::mem::take(&mut s.unlogged);
        s.logged_at = now;
        Failure::Again { times, over }
    }

    /// It worked at `now`: the streak it ends, if one was going on.
    pub fn worked_at(&mut self, now: Instant) -> Option<Recovery> {
        self.streak.take().map(|s| Recovery {
            failures: s.failures,
            lasted: now.saturating_duration_since(s.since),
        })
    }

    /// One failure with its error, logged as [`Repeated::failed_at`] decides.
    pub fn failed(&mut self, error: &dyn Display) {
        match self.failed_at(Instant::now()) {
            Failure::First => log(self.level, format_args!("{}", self.what), error),
            Failure::Again { times, over } => log(
                self.level,
                format_args!(
                    "{}: again {times} times in the last {} s",
                    self.what,
                    over.as_secs()
                ),
                error,
            ),
            Failure::Counted => {}
        }
    }

    /// It worked: says so (at info) if it had been failing.
    pub fn worked(&mut self) {
        if let Some(r) = self.worked_at(Instant::now()) {
            tracing::info!(
                failures = r.failures,
                "{}: works again, after {} failures over {:.1} s",
                self.what,
                r.failures,
                r.lasted.as_secs_f64()
            );
        }
    }
}

fn log(level: Level, message: std::fmt::Arguments<'_>, error: &dyn Display) {
    // A tracing event's level is part of its call site, so each level has its own.
    match level {
        Level::ERROR => tracing::error!(error = %error, "{message}"),
        Level::WARN => tracing::warn!(error = %error, "{message}"),
        Level::INFO => tracing::info!(error = %error, "{message}"),
        Level::DEBUG => tracing::debug!(error = %error, "{message}"),
        _ => tracing::trace!(error = %error, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_logged_then_one_summary_per_interval_then_the_recovery() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Repeated::every("x", Level::ERROR, Duration::from_secs(60));
        assert!(!r.failing());
        assert_eq!(r.failed_at(at(0)), Failure::First);
        // Eight a second for 59 s: counted, not logged.
        for i in 1..472 {
            assert_eq!(r.failed_at(at(i * 125)), Failure::Counted, "{i}");
        }
        assert_eq!(
            r.failed_at(at(60_000)),
            Failure::Again {
                times: 472,
                over: Duration::from_secs(60)
            }
        );
        assert_eq!(r.failed_at(at(60_125)), Failure::Counted);
        assert_eq!(
            r.worked_at(at(70_000)),
            Some(Recovery {
                failures: 474,
                lasted: Duration::from_secs(70)
            })
        );
        assert!(!r.failing());
        // Working again says nothing; the next failure starts a new streak.
        assert_eq!(r.worked_at(at(71_000)), None);
        assert_eq!(r.failed_at(at(72_000)), Failure::First);
    }

    #[test]
    fn the_logging_form_runs_at_every_level() {
        for level in [
            Level::ERROR,
            Level::WARN,
            Level::INFO,
            Level::DEBUG,
            Level::TRACE,
        ] {
            let mut r = Repeated::every("y", level, Duration::ZERO);
            r.failed(&"boom");
            r.failed(&"boom");
            assert!(r.failing());
            r.worked();
            assert!(!r.failing());
        }
    }
}
