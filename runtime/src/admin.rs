//! The admin socket: how an operator's command reaches a running daemon.
//!
//! Each daemon that keeps state an operator must read or change while it runs (the consumer's
//! dead letters and account holders, its reload) listens on a Unix socket in its own state
//! folder (`admin.sock`, mode 0600). A command connects, sends one request, and reads the
//! answer as it is made: lines of text for the operator, progress of a long piece of work, and
//! one end that says whether it worked. The daemon does the work itself, on the thread that owns
//! the state, so nothing is ever written by two processes and nothing has to stop.
//!
//! Guarantees:
//! - Only root and the daemon's own user may speak here (`SO_PEERCRED`, besides the file mode):
//!   anyone else is answered with a refusal naming their uid and nothing is read.
//! - A request is one JSON line of at most [`MAX_REQUEST_BYTES`], read within
//!   [`REQUEST_TIMEOUT`]; anything else is refused with the reason, and the daemon goes on.
//! - Frames are JSON lines ([`Frame`]); the client reads until [`Frame::End`]. A daemon that
//!   stops mid-answer is reported as such, never as success.
//! - [`call`] tells "no daemon is running here" ([`AdminError::NotRunning`]) apart from every
//!   other failure, so a command can fall back to working on the stopped daemon's files.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// The socket's name in a daemon's state folder.
pub const SOCKET_NAME: &str = "admin.sock";
/// The longest request line taken.
pub const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// How long a client has to send its request once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for the next frame before it gives up on the daemon (a long piece
/// of work sends progress frames, so this is the longest silence, not the longest command).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(300);

/// One piece of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// A line for the operator's terminal.
    Line(String),
    /// `done` of `total` steps of the work.
    Progress { done: u64, total: u64 },
    /// The answer is complete; `Err` says what failed, why, and what to do.
    End(Result<(), String>),
}

/// Where the answer to one request goes; the daemon's worker writes to it from any thread.
/// Dropping it without [`Reply::end`] tells the client the daemon gave no answer.
pub struct Reply {
    frames: mpsc::UnboundedSender<Frame>,
}

impl Reply {
    pub fn line(&self, text: impl Into<String>) {
        let _ = self.frames.send(Frame::Line(text.into()));
    }

    pub fn progress(&self, done: u64, total: u64) {
        let _ = self.frames.send(Frame::Progress { done, total });
    }

    pub fn end(self, result: Result<(), String>) {
        let _ = self.frames.send(Frame::End(result));
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reply")
    }
}

/// A `Write` that sends each complete line to a [`Reply`] (the rest at drop): for tools
/// written against `impl Write` that a daemon runs for its admin socket.
pub struct LineWriter<'a> {
    reply: &'a Reply,
    partial: Vec<u8>,
}

impl<'a> LineWriter<'a> {
    pub fn new(reply: &'a Reply) -> LineWriter<'a> {
        LineWriter {
            reply,
            partial: Vec::new(),
        }
    }
}

impl std::io::Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            self.reply
                .line(String::from_utf8_lossy(&line[..line.len() - 1]).to_string());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.reply
                .line(String::from_utf8_lossy(&self.partial).to_string());
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no daemon is listening on {0}")]
    NotRunning(PathBuf),
    #[error("talking to the daemon on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the daemon on {path} refused: {message}")]
    Refused { path: PathBuf, message: String },
    #[error(
        "the daemon on {0} closed the connection before it answered (did it stop? see its log)"
    )]
    NoAnswer(PathBuf),
    #[error("the daemon on {path} sent something that is not an answer: {why}")]
    Garbled { path: PathBuf, why: String },
    #[error("no {daemon} is running with {} (nothing listens on {}); start it to use this config", config.display(), socket.display())]
    NotRunningWith {
        daemon: &'static str,
        config: PathBuf,
        socket: PathBuf,
    },
}

/// Binds the admin socket at `path` (a stale one from a killed daemon is replaced: the caller
/// holds its state folder's lock, so no other daemon can be listening there) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; move it away",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `listener` until the runtime stops: each request that decodes as `R` is handed to
/// `handle` with its [`Reply`]; the connection writes the frames as they come.
pub fn serve<R, F>(listener: UnixListener, handle: F)
where
    R: DeserializeOwned + Send + 'static,
    F: Fn(R, Reply) + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move { connection::<R, F>(stream, handle).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an admin connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// Whether `uid` may use the admin socket: root and the daemon's own user.
fn may_administer(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

async fn connection<R, F>(mut stream: UnixStream, handle: Arc<F>)
where
    R: DeserializeOwned + Send + 'static,
    F: Fn(R, Reply) + Send + Sync + 'static,
{
    let refuse = |why: String| Frame::End(Err(why));
    let first = match stream.peer_cred() {
        Ok(c) if may_administer(c.uid()) => None,
        Ok(c) => Some(refuse(format!(
            "permission denied: uid {} is neither root nor the daemon's user",
            c.uid()
        ))),
        Err(e) => Some(refuse(format!("cannot read the peer's credentials: {e}"))),
    };
    let (read, mut write) = stream.split();
    let mut line = Vec::new();
    let request = match first {
        Some(refusal) => Err(refusal),
        None => {
            let mut limited = tokio::io::BufReader::new(read.take(MAX_REQUEST_BYTES + 1));
            match tokio::time::timeout(REQUEST_TIMEOUT, limited.read_until(b'\n', &mut line))
                .await
            {
                Err(_) => Err(refuse(format!(
                    "no request within {} s",
                    REQUEST_TIMEOUT.as_secs()
                ))),
                Ok(Err(e)) => Err(refuse(format!("reading the request: {e}"))),
                Ok(Ok(_)) if line.len() as u64 > MAX_REQUEST_BYTES => Err(refuse(format!(
                    "request longer than {MAX_REQUEST_BYTES} bytes"
                ))),
                Ok(Ok(_)) => serde_json::from_slice::<R>(&line).map_err(|e| {
                    refuse(format!(
                        "not a request this daemon knows ({e}); is the command from the same pwsync version?"
                    ))
                }),
            }
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    match request {
        Ok(r) => handle(r, Reply { frames: tx }),
        Err(refusal) => {
            let _ = tx.send(refusal);
            drop(tx);
        }
    }
    while let Some(frame) = rx.recv().await {
        let end = matches!(frame, Frame::End(_));
        let Ok(mut bytes) = serde_json::to_vec(&frame) else {
            break;
        };
        bytes.push(b'\n');
        if write.write_all(&bytes).await.is_err() || end {
            break;
        }
    }
    let _ = write.flush().await;
}

/// Sends `request` to the daemon listening on `path` and hands each line and progress frame to
/// `on_frame` as it arrives. Blocking: for the command line.
pub fn call<R: Serialize>(
    path: &Path,
    request: &R,
    mut on_frame: impl FnMut(&Frame),
) -> Result<(), AdminError> {
    let io = |source| AdminError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AdminError::NotRunning(path.to_path_buf()))
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(FRAME_TIMEOUT)).map_err(io)?;
    let mut bytes = serde_json::to_vec(request).map_err(|e| AdminError::Garbled {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    bytes.push(b'\n');
    stream.write_all(&bytes).map_err(io)?;
    let mut lines = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).map_err(io)? == 0 {
            return Err(AdminError::NoAnswer(path.to_path_buf()));
        }
        let frame: Frame = serde_json::from_str(&line).map_err(|e| AdminError::Garbled {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        match frame {
            Frame::End(Ok(())) => return Ok(()),
            Frame::End(Err(message)) => {
                return Err(AdminError::Refused {
                    path: path.to_path_buf(),
                    message,
                })
            }
            other => on_frame(&other),
        }
    }
}

/// [`call`] for a terminal: lines to stdout, progress as a bar on stderr (drawn only when
/// stderr is a terminal).
pub fn call_printing<R: Serialize>(path: &Path, request: &R, what: &str) -> Result<(), AdminError> {
    let mut bar: Option<indicatif::ProgressBar> = None;
    let result = call(path, request, |frame| match frame {
        // Lines go to stdout, whether or not a bar is drawn on stderr (`println` of a bar
        // would drop them when stderr is no terminal).
        Frame::Line(text) => match &bar {
            Some(b) => b.suspend(|| println!("{text}")),
            None => println!("{text}"),
        },
        Frame::Progress { done, total } => {
            let b = bar.get_or_insert_with(|| crate::progress(*total, what));
            b.set_length(*total);
            b.set_position(*done);
        }
        Frame::End(_) => {}
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    result
}

/// `reload`: asks the `daemon` ("agent", "relay", "consumer") running with `config`, at its admin
/// socket `socket`, to read its config again (`request`), and prints its answer; says plainly
/// when none is running.
pub fn ask_reload<R: Serialize>(
    socket: &Path,
    request: &R,
    daemon: &'static str,
    config: &Path,
) -> Result<(), AdminError> {
    match call_printing(socket, request, "reload") {
        Err(AdminError::NotRunning(_)) => Err(AdminError::NotRunningWith {
            daemon,
            config: config.to_path_buf(),
            socket: socket.to_path_buf(),
        }),
        other => other,
    }
}

/// For a reload: the first of `sections` (name, running, reloaded) that differs, of those only
/// a restart changes. Compared by their `Debug` forms: every config section derives it, and a
/// config holds paths to secrets, never their values.
pub fn first_change(
    sections: &[(&'static str, &dyn std::fmt::Debug, &dyn std::fmt::Debug)],
) -> Option<&'static str> {
    sections
        .iter()
        .find(|(_, running, new)| format!("{running:?}") != format!("{new:?}"))
        .map(|(name, _, _)| *name)
}

/// Where a daemon's reloads are asked for: SIGHUP (no one to answer) and the admin socket's
/// reload command (its [`Reply`]). The receiver gets each request in the order asked.
pub struct ReloadRequests {
    asked: mpsc::UnboundedSender<Option<Reply>>,
    daemon: &'static str,
}

impl ReloadRequests {
    /// Starts taking SIGHUP as a reload request of `daemon` (its name, for "the … is
    /// stopping"); must run inside a tokio runtime.
    pub fn start(
        daemon: &'static str,
    ) -> std::io::Result<(ReloadRequests, mpsc::UnboundedReceiver<Option<Reply>>)> {
        let (asked, requests) = mpsc::unbounded_channel();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let on_signal = asked.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                if on_signal.send(None).is_err() {
                    break;
                }
            }
        });
        Ok((ReloadRequests { asked, daemon }, requests))
    }

    /// The admin socket's reload command; answered at once when the daemon is stopping.
    pub fn ask(&self, reply: Reply) {
        if let Err(e) = self.asked.send(Some(reply)) {
            if let Some(reply) = e.0 {
                reply.end(Err(format!("the {} is stopping", self.daemon)));
            }
        }
    }
}

/// Says how a reload of `config` went: in the log, and to the operator who asked for it over
/// the admin socket (`reply`; none for a SIGHUP).
pub fn report_reload(config: &Path, result: Result<String, String>, reply: Option<Reply>) {
    match &result {
        Ok(what) => tracing::info!(config = %config.display(), "config reloaded: {what}"),
        Err(why) => tracing::error!(config = %config.display(), "config not reloaded: {why}"),
    }
    if let Some(reply) = reply {
        if let Ok(what) = &result {
            reply.line(format!("reloaded {}: {what}", config.display()));
        }
        reply.end(result.map(|_| ()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_with_no_daemon_running_says_which_and_where() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join(SOCKET_NAME);
        let config = dir.path().join("agent.toml");
        let err = ask_reload(&socket, &"reload", "agent", &config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            err,
            format!(
                "no agent is running with {} (nothing listens on {}); start it to use this config",
                config.display(),
                socket.display()
            )
        );
    }

    #[derive(Serialize, Deserialize)]
    enum Ask {
        Echo(String),
        Fail,
        Silent,
    }

    fn daemon(dir: &Path) -> PathBuf {
        let path = dir.join(SOCKET_NAME);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = {
            let _guard = rt.enter();
            bind(&path).expect("bind")
        };
        std::thread::spawn(move || {
            rt.block_on(async move {
                serve(listener, |ask: Ask, reply: Reply| match ask {
                    Ask::Echo(s) => {
                        reply.progress(1, 2);
                        reply.line(s);
                        reply.end(Ok(()));
                    }
                    Ask::Fail => reply.end(Err("no such thing".into())),
                    Ask::Silent => drop(reply),
                });
                tokio::time::sleep(Duration::from_secs(60)).await;
            })
        });
        path
    }

    #[test]
    fn a_request_is_answered_frame_by_frame_and_failures_are_told_apart() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = daemon(dir.path());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut frames = Vec::new();
        call(&path, &Ask::Echo("hello".into()), |f| {
            frames.push(f.clone())
        })
        .expect("echo");
        assert_eq!(
            frames,
            vec![
                Frame::Progress { done: 1, total: 2 },
                Frame::Line("hello".into())
            ]
        );
        match call(&path, &Ask::Fail, |_| {}) {
            Err(AdminError::Refused { message, .. }) => assert_eq!(message, "no such thing"),
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            call(&path, &Ask::Silent, |_| {}),
            Err(AdminError::NoAnswer(_))
        ));
        // Not a request of this daemon's: refused in words, and the daemon goes on.
        match call(&path, &"something else", |_| {}) {
            Err(AdminError::Refused { message, .. }) => {
                assert!(message.contains("not a request"), "{message}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        call(&path, &Ask::Echo("again".into()), |_| {}).expect("still serving");
        assert!(matches!(
            call(&dir.path().join("nobody.sock"), &Ask::Fail, |_| {}),
            Err(AdminError::NotRunning(_))
        ));
    }
}
