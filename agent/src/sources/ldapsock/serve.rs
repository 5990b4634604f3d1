//! The serving loop: slapd's connections to the overlay's socket, one message each.
//!
//! Only slapd may speak here: every connection's peer (`SO_PEERCRED`) must be root, this
//! process's own user, or `[ldap_sock] slapd_user`; anyone else is refused and logged by uid,
//! whatever the socket file's mode allows, so no local user can send a MODIFY and its RESULT
//! and have a change forwarded as committed. A message is read bounded in size and time; one
//! that cannot be read is refused when it is a change, let through otherwise.

use super::capture::{Answer, Capture, COUNTED};
use super::message::{Message, MAX_MESSAGE_BYTES};
use super::LdapSockConfig;
use super::SockError;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// Reads one message from slapd (bounded in size and time).
fn read_message(stream: &mut UnixStream) -> Result<Zeroizing<Vec<u8>>, SockError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(1024));
    let mut chunk = Zeroizing::new([0u8; 4096]);
    while !buf.ends_with(b"\n\n") {
        let n = stream
            .read(&mut chunk[..])
            .map_err(|e| SockError::Message(format!("reading: {e}")))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_MESSAGE_BYTES {
            return Err(SockError::Message("larger than 1 MiB".into()));
        }
    }
    Ok(buf)
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large; the file
    // descriptor is the stream's own and open for the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn serve_one(capture: &Capture, allowed: &[u32], mut stream: UnixStream) {
    match peer_uid(&stream) {
        Ok(uid) if uid == 0 || allowed.contains(&uid) => {}
        Ok(uid) => {
            tracing::warn!(
                uid,
                "refused a connection to the overlay's socket: only slapd's user may send changes ([ldap_sock] slapd_user)"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a connection whose peer cannot be told");
            return;
        }
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let raw = match read_message(&mut stream) {
        Ok(raw) => raw,
        Err(e) => {
            tracing::error!(error = %e, "a message from slapd that cannot be read");
            let _ = stream.write_all(&capture.cannot("?", &e.to_string()).bytes());
            return;
        }
    };
    let answer = match Message::parse(&raw) {
        Ok(msg) => capture.handle(&msg),
        // Only a change can be refused for being unreadable: a bind (whose password slapd
        // writes raw, so a line break in it breaks the message) or a result never blocks.
        Err(e) if !(raw.starts_with(b"MODIFY\n") || raw.starts_with(b"EXTENDED\n")) => {
            tracing::warn!(error = %e, "a message from slapd that cannot be read: let through");
            if raw.starts_with(b"RESULT\n") {
                Answer::Nothing
            } else {
                Answer::Continue
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "a change from slapd that cannot be read");
            capture.cannot("?", &e.to_string())
        }
    };
    let _ = stream.write_all(&answer.bytes());
}

/// Serves slapd's sock overlay on `[ldap_sock] socket` until the process is stopped, settling
/// pending changes every second.
pub fn serve(cfg: LdapSockConfig, agent_socket: &Path) -> Result<(), SockError> {
    let path = cfg.socket.clone();
    let socket_mode = cfg.socket_mode;
    // SAFETY: geteuid has no preconditions.
    let mut allowed = vec![unsafe { libc::geteuid() }];
    allowed.push(crate::unix_users::user_id(&cfg.slapd_user).map_err(|e| {
        SockError::Config(format!(
            "[ldap_sock] slapd_user: {e} (name the user slapd runs as)"
        ))
    })?);
    // The stores first: the socket appears only once slapd can be served (its existence is what
    // a supervisor or a test waits for).
    let capture = Arc::new(Capture::open(cfg, agent_socket)?);
    if let Some(listen) = capture.cfg.metrics_listen {
        let c = capture.clone();
        pwsync_runtime::observe::serve(listen, Arc::new(move || c.health()));
        for what in COUNTED {
            metrics::counter!("pwsync_ldapsock_events_total", "event" => what).increment(0);
        }
    }
    let sock_err = |source| SockError::Socket {
        path: path.clone(),
        source,
    };
    if std::fs::symlink_metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        std::fs::remove_file(&path).map_err(sock_err)?;
    }
    let listener = UnixListener::bind(&path).map_err(sock_err)?;
    std::fs::set_permissions(
        &path,
        std::os::unix::fs::PermissionsExt::from_mode(socket_mode),
    )
    .map_err(sock_err)?;
    let settler = capture.clone();
    std::thread::spawn(move || loop {
        settler.settle();
        settler.write_status();
        std::thread::sleep(Duration::from_secs(1));
    });
    tracing::info!(socket = %path.display(), "serving slapd's sock overlay");
    let allowed = Arc::new(allowed);
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let (c, a) = (capture.clone(), allowed.clone());
                std::thread::spawn(move || serve_one(&c, &a, s));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection from slapd");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}
