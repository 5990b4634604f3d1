//! pwsync-runtime: the daemons' plumbing, kept apart from the pure protocol crate
//! (`pwsync-proto`): logging, config files, MQTT client options, TLS and the `[transport]`
//! section ([`transport`], [`tls`]), `/metrics` and `/healthz` ([`observe`]), folder locks,
//! reconnect backoff, the monotonic clock and shutdown signals. What every pwsync program does
//! the same way lives here once, so the three daemons cannot drift apart.
//!
//! Logs go to stderr (journald picks them up under systemd); the level comes from `PWSYNC_LOG`
//! (`info` by default; any `tracing` filter such as `pwsync_agent=debug`). Nothing in this
//! process ever formats a `Secret`'s value, so no log line can carry a password.

pub mod admin;
pub mod docs;
pub mod failover;
pub mod fingerprint;
pub mod observe;
pub mod redb_file;
pub mod repeated;
pub mod tls;
pub mod transport;

use pwsync_proto::limits::MAX_MQTT_PACKET_BYTES;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Starts logging for a program. Safe to call more than once (later calls do nothing).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PWSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// An error and its causes on one line, for the command line. A cause whose text its parent's
/// message already includes is not repeated.
pub fn error_report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The last millisecond RFC 3339 can write (9999-12-31T23:59:59.999Z).
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// A wall-clock time (milliseconds since the epoch) as an operator reads it: RFC 3339, UTC, to
/// the second. Times come from outside (a target's change time, an agent's clock): one past
/// year 9999 is said in milliseconds, never a panic.
pub fn wall_time(ms: u64) -> String {
    if ms > LAST_RFC3339_MS {
        return format!("{ms} ms after 1970 (past year 9999)");
    }
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// [`wall_time`] to the millisecond, for logs that order events closer than a second apart.
pub fn wall_time_ms(ms: u64) -> String {
    if ms > LAST_RFC3339_MS {
        return wall_time(ms);
    }
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads a TOML config file. Unknown keys are errors (every config struct denies them), and the
/// message names the file, the line and the key.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Resolves a path from a config file: relative paths are relative to the file's folder, so a
/// folder of configs and keys can be moved as a whole.
pub fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        // A bare file name (`--config consumer.toml`) has the parent "": its folder is ".".
        match config_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.join(p),
            _ => Path::new(".").join(p),
        }
    }
}

/// MQTT client options every pwsync client uses: a fixed client id, a *clean* session, manual
/// acks (a message is acked to the broker only once handled), and packets large enough for the
/// largest envelope.
///
/// Clean sessions, because pwsync never relies on the broker's session: every sender resends
/// from its durable copy after a reconnect, every receiver deduplicates, and subscriptions are
/// made again on every connect. Persistent sessions only added failure modes: measured with
/// rumqttd 0.20, a client taking over its own persistent session while the old connection was
/// still being torn down left the broker routing to a connection it had dropped ("no-connection
/// id N is already gone") and the client stalled on packet-id collisions.
pub fn mqtt_options(client_id: &str, host: &str, port: u16, inflight: u16) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, host, port);
    o.set_clean_session(true)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(15))
        .set_max_packet_size(MAX_MQTT_PACKET_BYTES, MAX_MQTT_PACKET_BYTES)
        .set_inflight(inflight.max(1))
        .set_request_channel_capacity(usize::from(inflight.max(1)) * 2 + 16);
    o
}

/// An MQTT client with [`mqtt_options`]-style options and TCP_NODELAY (small QoS1 messages
/// and their acks must not wait for Nagle's algorithm).
pub fn mqtt_client(
    options: rumqttc::MqttOptions,
    capacity: usize,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
    let mut net = eventloop.network_options();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// What a pwsync MQTT client's event loop reports to the code that owns the client.
#[derive(Debug)]
pub enum BrokerEvent {
    /// Connected to `broker` (`host:port`), one of the failover's endpoints.
    Connected {
        broker: String,
    },
    /// A subscription was confirmed.
    Subscribed,
    Disconnected(String),
    Message(rumqttc::Publish),
}

/// Polls an MQTT event loop until `tx` is closed, reconnecting with jittered backoff (up to
/// `reconnect_max`), and passes on connects, subscriptions, disconnects and publishes. Each
/// reconnect goes to the next of `failover`'s endpoints; `leave` drops the connection at once
/// for the next endpoint (a relay that takes messages and answers none).
pub async fn poll_broker(
    mut eventloop: rumqttc::EventLoop,
    tx: tokio::sync::mpsc::UnboundedSender<BrokerEvent>,
    reconnect_max: Duration,
    mut failover: failover::Failover,
    leave: std::sync::Arc<tokio::sync::Notify>,
) {
    use rumqttc::{Event, Packet};
    let mut backoff = Backoff::new(Duration::from_millis(100), reconnect_max);
    let base_id = eventloop.mqtt_options.client_id();
    let mut reconnects = 0u64;
    loop {
        let polled = tokio::select! {
            polled = eventloop.poll() => polled,
            _ = leave.notified() => {
                let _ = tx.send(BrokerEvent::Disconnected("the relay did not answer in time; leaving it".into()));
                reconnects += 1;
                eventloop.network = None;
                failover.advance(&mut eventloop);
                forget_connection(&mut eventloop, &base_id, reconnects);
                continue;
            }
        };
        let event = match polled {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                let (host, port) = eventloop.mqtt_options.broker_address();
                BrokerEvent::Connected {
                    broker: format!("{host}:{port}"),
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => BrokerEvent::Subscribed,
            Ok(Event::Incoming(Packet::Publish(p))) => BrokerEvent::Message(p),
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(BrokerEvent::Disconnected(e.to_string()));
                reconnects += 1;
                failover.advance(&mut eventloop);
                forget_connection(&mut eventloop, &base_id, reconnects);
                tokio::time::sleep(backoff.next_delay()).await;
                if tx.is_closed() {
                    return;
                }
                continue;
            }
        };
        if tx.send(event).is_err() {
            return;
        }
    }
}

/// Prepares an event loop to reconnect as a new client: pwsync resends from its own durable
/// copies, so rumqttc's replay of old publishes is dropped (it would collide with the resends on
/// packet ids and stall on "waiting to resolve collision"), and the client id gets a fresh
/// suffix, so the broker never mistakes the new connection for one it has not finished tearing
/// down. Both were seen with rumqttd 0.20 after broker restarts.
pub fn forget_connection(eventloop: &mut rumqttc::EventLoop, base_id: &str, reconnects: u64) {
    let _ = eventloop.state.clean();
    eventloop.pending.clear();
    eventloop
        .mqtt_options
        .set_client_id(format!("{base_id}-{reconnects}"));
}

/// Keeps a daemon's secrets out of core files and other processes: no core file (RLIMIT_CORE 0)
/// and not dumpable (PR_SET_DUMPABLE 0, which also stops processes of the same user from
/// attaching with ptrace or reading its memory through /proc). Called first by every `run`.
pub fn harden_process() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit and prctl with these arguments only change this process's own limits
    // and flags; no pointers outlive the calls.
    let (limit, dumpable) = unsafe {
        (
            libc::setrlimit(libc::RLIMIT_CORE, &none),
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0),
        )
    };
    if limit != 0 || dumpable != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not disable core dumps; a crash could write secrets to a core file"
        );
    }
}

/// Raises this process's soft limit of open files to its hard limit (the kernel's `nr_open`
/// when that is unlimited), as a server holding many connections should (a login shell's soft
/// limit is often 1,024); returns the limit now in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write only `limit`, which lives across the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // An unlimited hard limit still stops at the kernel's per-process ceiling.
        let ceiling = if limit.rlim_max == libc::RLIM_INFINITY {
            std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(1 << 20)
        } else {
            limit.rlim_max
        };
        if limit.rlim_cur < ceiling {
            let raised = libc::rlimit {
                rlim_cur: ceiling,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Milliseconds of the process's monotonic clock (since its first call): the time the protocol
/// state machines ([`pwsync_proto::window`]) are driven with.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The async runtime every daemon runs on: two worker threads (the machines are small, and the
/// blocking work runs on threads of its own).
pub fn tokio_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

/// Exponential backoff with full jitter, for reconnects and retries.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The next delay: uniformly random in [base/2, min(cap, base·2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let top = exp.min(self.cap).max(self.base);
        let low = self.base / 2;
        let mut r = [0u8; 4];
        let _ = aws_lc_rs::rand::fill(&mut r);
        let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
        low + (top.saturating_sub(low)).mul_f64(frac)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// An exclusive `flock` on a folder's `LOCK` file (which holds the owner's pid), released when
/// dropped. The spool and the journal each take one, so a second process (or an offline tool
/// while the daemon runs) gets a plain "in use" error instead of an obscure storage error.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

/// The folder is locked by another process.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{dir} is in use by a running {owner}{}; stop it first, or copy the folder and inspect the copy", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse {
        dir: PathBuf,
        owner: &'static str,
        pid: Option<u32>,
    },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DirLock {
    /// Takes the lock of `dir`; `owner` names the program that normally holds it.
    pub fn acquire(dir: &Path, owner: &'static str) -> Result<DirLock, LockError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("LOCK");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(LockError::InUse {
                dir: dir.to_path_buf(),
                owner,
                pid: text.trim().parse().ok(),
            });
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DirLock { _file: file })
    }
}

/// Makes `dir` (and its missing parents) and sets it to mode 0700: a folder of a daemon's state,
/// which no one but its user may list or enter.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Replaces `path` whole with `bytes`, mode 0600: written to `PATH.tmp`, then renamed (no fsync:
/// for copies that are sent again anyway, such as a received password policy).
pub fn replace_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_private(path, bytes, false)
}

/// [`replace_private`], durable: the file and then its folder are fsynced, so after a crash
/// `path` holds either the old bytes or the new ones (a key that records are sealed under).
pub fn replace_private_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_private(path, bytes, true)
}

fn write_private(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) if durable => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

/// Resolves when the process is asked to stop (SIGINT or SIGTERM).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// A progress bar on stderr for a long operator command (`len` steps of `what`). It draws only
/// when stderr is a terminal, so scripts and logs see nothing of it.
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg:>12} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_times_from_outside_never_panic() {
        assert_eq!(wall_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(wall_time_ms(1_500), "1970-01-01T00:00:01.500Z");
        assert_eq!(wall_time(LAST_RFC3339_MS), "9999-12-31T23:59:59Z");
        for ms in [LAST_RFC3339_MS + 1, u64::MAX / 2, u64::MAX] {
            assert!(wall_time(ms).contains("past year 9999"));
            assert!(wall_time_ms(ms).contains("past year 9999"));
        }
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let now = raise_open_files_limit().expect("raise");
        // SAFETY: getrlimit writes only `limit`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(now, limit.rlim_cur);
        assert!(limit.rlim_cur == limit.rlim_max || limit.rlim_max == libc::RLIM_INFINITY);
    }

    #[test]
    fn backoff_stays_within_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn relative_paths_resolve_next_to_the_config() {
        let cfg = Path::new("/etc/pwsync/agent.toml");
        assert_eq!(
            resolve(cfg, Path::new("agent.key")),
            PathBuf::from("/etc/pwsync/agent.key")
        );
        assert_eq!(resolve(cfg, Path::new("/k")), PathBuf::from("/k"));
    }
}
