//! The relay's MQTT front door: every client connection passes through here, and only here.
//!
//! The embedded broker (rumqttd) has logins but no topic rules, so it listens on a loopback
//! port of its own with one random internal login that only the relay knows; clients reach it
//! through this gateway, which:
//! 1. terminates TLS (optionally requiring a client certificate signed by `client_ca`);
//! 2. reads the client's CONNECT and checks its login against the enrolled
//!    [`Credentials`](crate::credentials) (refused: CONNACK "bad user name or password", logged
//!    with the client id, the username and the peer address, never the password), and counts
//!    its open sessions: a login past `max_sessions_per_login` is refused (CONNACK "not
//!    authorized", logged and counted as `session_limit`);
//! 3. opens the client's own connection to the broker, with the internal login and the client id
//!    prefixed by the identity (`agent:A~…`), so no client can take over another's session;
//! 4. forwards every packet from the client after checking it against the identity's topic
//!    rules: a PUBLISH, SUBSCRIBE or will outside them ends the connection, logged and counted.
//!    Packets from the broker to the client are passed through unchanged: the broker can only
//!    send what the client was allowed to subscribe to;
//! 5. every [`CREDENTIALS_RELOAD`], checks each open session's login against the credentials
//!    file again, and closes the sessions of a login that was removed (`pwsync-relay unenroll`)
//!    or given a new token: a login is withdrawn from its live sessions too, not only from its
//!    next CONNECT.
//!
//! Everything a client chose (client id, login name, topic, filter) is logged only through
//! [`Untrusted`]: escaped and bounded.
//!
//! Each packet is parsed whole (bounded by [`MAX_MQTT_PACKET_BYTES`]) before a byte of it is
//! forwarded, so a malformed or oversized packet never reaches the broker.

use crate::credentials::{Credentials, Identity, Verified};
use bytes::BytesMut;
use pwsync_proto::limits::MAX_MQTT_PACKET_BYTES;
use pwsync_proto::Untrusted;
use rumqttc::{ConnAck, ConnectReturnCode, Login, Packet};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use zeroize::Zeroizing;

/// How long a new connection may take to finish TLS and send its CONNECT.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the open sessions' logins are checked against the credentials file again (which
/// is re-read only when it changed): a withdrawn login's sessions end within this time.
pub const CREDENTIALS_RELOAD: Duration = Duration::from_secs(2);

/// The broker → client buffer of an agent's session: acks and pings (tens of bytes each), now
/// and then its group's signed policy (a few KiB, passed on in pieces of this size).
const AGENT_DOWNSTREAM_BUFFER: usize = 1024;
/// The broker → client buffer of a consumer's session (deliveries of whole batches).
const CONSUMER_DOWNSTREAM_BUFFER: usize = 64 * 1024;

/// What the gateway refused, by reason.
#[derive(Debug, Default)]
pub struct GatewayCounters {
    pub sessions: AtomicU64,
    pub refused_tls: AtomicU64,
    pub refused_login: AtomicU64,
    pub refused_publish: AtomicU64,
    pub refused_subscribe: AtomicU64,
    pub refused_session_limit: AtomicU64,
    pub malformed: AtomicU64,
    /// Open sessions closed because their login was withdrawn.
    pub withdrawn: AtomicU64,
}

impl GatewayCounters {
    /// The refusals, by reason.
    pub fn by_reason(&self) -> [(&'static str, u64); 6] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("tls", g(&self.refused_tls)),
            ("login", g(&self.refused_login)),
            ("publish", g(&self.refused_publish)),
            ("subscribe", g(&self.refused_subscribe)),
            ("session_limit", g(&self.refused_session_limit)),
            ("malformed", g(&self.malformed)),
        ]
    }

    pub fn summary(&self) -> String {
        let refused: Vec<String> = self
            .by_reason()
            .iter()
            .map(|(why, n)| format!("{}={n}", refused_key(why)))
            .collect();
        format!(
            "sessions={} {} withdrawn={}",
            self.sessions.load(Ordering::Relaxed),
            refused.join(" "),
            self.withdrawn.load(Ordering::Relaxed)
        )
    }
}

/// How a refusal reason appears in the relay's closing summary (`refused_login=3`, `malformed=1`).
fn refused_key(reason: &str) -> String {
    match reason {
        "malformed" => reason.into(),
        r => format!("refused_{r}"),
    }
}

/// The TLS side of the listener: the relay's certificate and, for mTLS, the clients' CA.
pub fn tls_acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use pwsync_runtime::tls::{load_certs, load_private_key, roots};
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let chain = load_certs(cert)
        .map_err(|e| anyhow::anyhow!("the relay's TLS certificate {}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!(
            "the relay's TLS certificate {} holds no certificate",
            cert.display()
        );
    }
    let key = load_private_key(key)
        .map_err(|e| anyhow::anyhow!("the relay's TLS key {}: {e}", key.display()))?;
    let builder = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            tokio_rustls::rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(Some(ca))?),
                provider,
            )
            .build()?,
        ),
        None => builder.with_no_client_auth(),
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(
        builder.with_single_cert(chain, key)?,
    )))
}

/// The open sessions, by login: for the per-login limit, and to close a withdrawn login's.
#[derive(Default)]
pub struct Sessions {
    next_id: u64,
    by_login: HashMap<String, Vec<OpenSession>>,
}

struct OpenSession {
    id: u64,
    login: Verified,
    close: Arc<Notify>,
}

impl Sessions {
    /// Registers a session of `login` unless `limit` of its sessions are open already.
    fn open(&mut self, login: &Verified, limit: usize) -> Option<(u64, Arc<Notify>)> {
        let open = self.by_login.entry(login.identity.username()).or_default();
        if open.len() >= limit {
            return None;
        }
        self.next_id += 1;
        let close = Arc::new(Notify::new());
        open.push(OpenSession {
            id: self.next_id,
            login: login.clone(),
            close: close.clone(),
        });
        Some((self.next_id, close))
    }

    fn end(&mut self, username: &str, id: u64) {
        if let Some(open) = self.by_login.get_mut(username) {
            open.retain(|s| s.id != id);
            if open.is_empty() {
                self.by_login.remove(username);
            }
        }
    }

    /// How many sessions `username` has open.
    pub fn count(&self, username: &str) -> usize {
        self.by_login.get(username).map_or(0, Vec::len)
    }
}

/// Ends its session's entry in [`Sessions`] however the session ends.
struct SessionEntry<'g> {
    sessions: &'g Mutex<Sessions>,
    username: String,
    id: u64,
}

impl Drop for SessionEntry<'_> {
    fn drop(&mut self) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .end(&self.username, self.id);
    }
}

pub struct Gateway {
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub credentials: Arc<Credentials>,
    /// The embedded broker's internal listener and its login.
    pub broker: SocketAddr,
    pub internal_user: String,
    pub internal_password: Zeroizing<String>,
    pub counters: Arc<GatewayCounters>,
    /// When each agent was last seen (any packet from its session, keep-alive pings included).
    pub liveness: Arc<crate::liveness::Liveness>,
    /// Most sessions one login may have open at once (`[broker] max_sessions_per_login`).
    pub max_sessions_per_login: usize,
    pub sessions: Mutex<Sessions>,
}

/// Why a session ended early; logged once by the session.
enum End {
    Closed,
    Refused(String),
    Withdrawn,
}

impl Gateway {
    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut recheck = tokio::time::interval(CREDENTIALS_RELOAD);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unreadable: Option<String> = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = recheck.tick() => self.close_withdrawn(&mut unreadable),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(self.clone().session(stream, peer));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "accepting an MQTT connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Closes the open sessions whose login no longer holds. While the credentials file cannot
    /// be read, sessions stay open (logins are refused meanwhile); that is logged once.
    fn close_withdrawn(&self, unreadable: &mut Option<String>) {
        let open: Vec<(Verified, Arc<Notify>)> = {
            let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions
                .by_login
                .values()
                .flatten()
                .map(|s| (s.login.clone(), s.close.clone()))
                .collect()
        };
        for (login, close) in open {
            match self.credentials.holds(&login) {
                Ok(true) => {}
                // Wakes the session now, or at its next wait if it is busy forwarding.
                Ok(false) => close.notify_one(),
                Err(e) => {
                    let e = e.to_string();
                    if unreadable.as_ref() != Some(&e) {
                        tracing::error!(error = %e, "cannot re-read the credentials file; open sessions are kept, new logins refused");
                        *unreadable = Some(e);
                    }
                    return;
                }
            }
        }
        *unreadable = None;
    }

    async fn session(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let Some(tls) = self.tls.clone() else {
            return self.relay_session(stream, peer).await;
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
            Ok(Ok(stream)) => self.relay_session(stream, peer).await,
            // A client that hangs up in the middle of its handshake was refused nothing: it left
            // (a port probe, or a client that dropped the attempt for another one, as an MQTT
            // client does when its event loop's future is dropped while it connects).
            Ok(Err(e)) if left(&e) => {
                tracing::debug!(%peer, error = %Untrusted(&e.to_string()), "the client left during the TLS handshake");
            }
            Ok(Err(e)) => {
                self.counters.refused_tls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, error = %Untrusted(&e.to_string()), "TLS handshake refused");
            }
            Err(_) => {
                self.counters.refused_tls.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "no TLS handshake within 10 s; closed");
            }
        }
    }

    async fn relay_session<S: AsyncRead + AsyncWrite + Unpin>(&self, client: S, peer: SocketAddr) {
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let mut buf = BytesMut::with_capacity(4096);
        let first =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, read_packet(&mut from_client, &mut buf)).await;
        let mut connect = match first {
            Ok(Ok(Some((Packet::Connect(c), _)))) => c,
            Ok(Ok(None)) => return,
            Ok(Ok(Some(_))) | Ok(Err(_)) | Err(_) => {
                self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "the first packet was not a valid MQTT CONNECT; closed");
                return;
            }
        };
        let client_id = connect.client_id.clone();
        let username = connect
            .login
            .as_ref()
            .map(|l| l.username.clone())
            .unwrap_or_default();
        let password = Zeroizing::new(connect.login.take().map(|l| l.password).unwrap_or_default());
        let login = match self.credentials.login(&username, password.as_bytes()) {
            Some(login) => login,
            None => {
                self.counters.refused_login.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, client_id = ?Untrusted(&client_id), username = ?Untrusted(&username), "login refused: not an enrolled client, or a wrong token");
                let _ = write_packet(
                    &mut to_client,
                    &Packet::ConnAck(ConnAck::new(ConnectReturnCode::BadUserNamePassword, false)),
                )
                .await;
                return;
            }
        };
        let identity = login.identity.clone();
        if let Some(will) = &connect.last_will {
            if !identity.may_publish(&will.topic) {
                self.counters
                    .refused_publish
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, client_id = ?Untrusted(&client_id), %identity, topic = ?Untrusted(&will.topic), "a will on a topic this client may not publish; refused");
                let _ = write_packet(
                    &mut to_client,
                    &Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
                )
                .await;
                return;
            }
        }
        let opened = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .open(&login, self.max_sessions_per_login);
        let Some((id, close)) = opened else {
            self.counters
                .refused_session_limit
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, client_id = ?Untrusted(&client_id), %identity, limit = self.max_sessions_per_login, "login refused: it has max_sessions_per_login sessions open already");
            let _ = write_packet(
                &mut to_client,
                &Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false)),
            )
            .await;
            return;
        };
        let _entry = SessionEntry {
            sessions: &self.sessions,
            username: identity.username(),
            id,
        };
        connect.client_id = format!("{identity}~{client_id}");
        connect.login = Some(Login::new(
            self.internal_user.clone(),
            self.internal_password.as_str(),
        ));
        let broker = match TcpStream::connect(self.broker).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(%peer, error = %e, "the embedded broker is unreachable");
                let _ = write_packet(
                    &mut to_client,
                    &Packet::ConnAck(ConnAck::new(ConnectReturnCode::ServiceUnavailable, false)),
                )
                .await;
                return;
            }
        };
        let _ = broker.set_nodelay(true);
        // rumqttd's end of this connection has Nagle on: switch it off once it has accepted.
        crate::broker::sweep_nodelay_soon();
        let (from_broker, mut to_broker) = broker.into_split();
        if write_packet(&mut to_broker, &Packet::Connect(connect))
            .await
            .is_err()
        {
            return;
        }
        // The rewritten CONNECT carried the internal password: nothing of it stays here but in
        // `self`.
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%peer, client_id = ?Untrusted(&client_id), %identity, "client connected");
        let agent = match &identity {
            Identity::Agent(a) => Some(a.clone()),
            Identity::Consumer(_) => None,
        };
        if let Some(a) = &agent {
            self.liveness.connected(a);
        }
        // Broker → client, passed through. An agent hears acks and pings (and now and then a
        // policy), so its buffer is small (most sessions are agents: their idle memory is the
        // relay's); a consumer gets whole batches.
        let downstream_buffer = match &identity {
            Identity::Agent(_) => AGENT_DOWNSTREAM_BUFFER,
            Identity::Consumer(_) => CONSUMER_DOWNSTREAM_BUFFER,
        };
        let downstream = pass_through(from_broker, &mut to_client, downstream_buffer);
        let upstream = self.forward_checked(&identity, &mut from_client, &mut to_broker, &mut buf);
        let end = tokio::select! {
            _ = downstream => End::Closed,
            end = upstream => end,
            _ = close.notified() => End::Withdrawn,
        };
        if let Some(a) = &agent {
            self.liveness.disconnected(a);
        }
        match end {
            End::Refused(why) => {
                tracing::warn!(%peer, client_id = ?Untrusted(&client_id), %identity, "{why}; connection closed");
            }
            End::Withdrawn => {
                self.counters.withdrawn.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, client_id = ?Untrusted(&client_id), %identity, "login withdrawn from the credentials file (unenrolled or given a new token); session closed");
            }
            End::Closed => {}
        }
    }

    /// Client → broker: every packet parsed and checked before it is forwarded.
    async fn forward_checked<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
        &self,
        identity: &Identity,
        from_client: &mut R,
        to_broker: &mut W,
        buf: &mut BytesMut,
    ) -> End {
        loop {
            let (packet, raw) = match read_packet(from_client, buf).await {
                Ok(Some(p)) => p,
                Ok(None) => return End::Closed,
                Err(why) => {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    return End::Refused(format!("malformed MQTT packet ({})", Untrusted(&why)));
                }
            };
            match &packet {
                Packet::Publish(p) if !identity.may_publish(&p.topic) => {
                    self.counters
                        .refused_publish
                        .fetch_add(1, Ordering::Relaxed);
                    return End::Refused(format!(
                        "PUBLISH on {} is not allowed to this client",
                        Untrusted(&p.topic)
                    ));
                }
                Packet::Subscribe(s) => {
                    if let Some(f) = s.filters.iter().find(|f| !identity.may_subscribe(&f.path)) {
                        self.counters
                            .refused_subscribe
                            .fetch_add(1, Ordering::Relaxed);
                        return End::Refused(format!(
                            "SUBSCRIBE to {} is not allowed to this client",
                            Untrusted(&f.path)
                        ));
                    }
                }
                Packet::Connect(_) => {
                    self.counters.malformed.fetch_add(1, Ordering::Relaxed);
                    return End::Refused("a second CONNECT".into());
                }
                _ => {}
            }
            if let Identity::Agent(a) = identity {
                self.liveness.seen(a);
            }
            if to_broker.write_all(&raw).await.is_err() {
                return End::Closed;
            }
        }
    }
}

/// Takes the next whole packet off the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Err` for a malformed or oversized one. Returns the parsed packet and its exact bytes.
fn next_packet(buf: &mut BytesMut) -> Result<Option<(Packet, bytes::Bytes)>, String> {
    match rumqttc::check(buf.iter(), MAX_MQTT_PACKET_BYTES) {
        Ok(header) => {
            let raw = buf.split_to(header.frame_length()).freeze();
            let mut parse = BytesMut::from(&raw[..]);
            let packet =
                Packet::read(&mut parse, MAX_MQTT_PACKET_BYTES).map_err(|e| e.to_string())?;
            Ok(Some((packet, raw)))
        }
        Err(rumqttc::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `data` as a client's byte stream, packet by packet, until it ends or fails (for the
/// fuzz target: the same parsing the gateway does, without sockets).
pub fn parse_all(data: &[u8]) -> usize {
    let mut buf = BytesMut::from(data);
    let mut packets = 0;
    while let Ok(Some(_)) = next_packet(&mut buf) {
        packets += 1;
    }
    packets
}

/// Reads one whole packet: `Ok(None)` at a clean end of stream, `Err` for a malformed or
/// oversized one. Returns the parsed packet and its exact bytes.
async fn read_packet<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<(Packet, bytes::Bytes)>, String> {
    loop {
        if let Some(p) = next_packet(buf)? {
            return Ok(Some(p));
        }
        buf.reserve(4096);
        match from.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err("the connection ended inside a packet".into()),
            Ok(_) => {}
            // A client that hangs up between packets without TLS's close_notify (as most MQTT
            // clients do), or resets the connection, has simply left.
            Err(e) if left(&e) && buf.is_empty() => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Copies `from` to `to` through a buffer of `size` bytes until `from` ends, flushing after
/// each read: what TLS holds back of a write goes out now, not with the next message (an ack
/// or the end of a batch must not wait for traffic that may never come).
async fn pass_through<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    to: &mut W,
    size: usize,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; size];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.flush().await;
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
    }
}

/// Whether an I/O error says only that the peer went away (closed without a word, or reset).
fn left(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

async fn write_packet<W: AsyncWrite + Unpin>(to: &mut W, packet: &Packet) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    packet
        .write(&mut out, MAX_MQTT_PACKET_BYTES)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    to.write_all(&out).await?;
    to.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_packets_parse_and_garbage_or_oversized_ones_do_not() {
        let mut bytes = BytesMut::new();
        Packet::PingReq.write(&mut bytes, 1024).unwrap();
        let sub = rumqttc::Subscribe::new("pwsync/v1/down/#", rumqttc::QoS::AtLeastOnce);
        Packet::Subscribe(sub).write(&mut bytes, 1024).unwrap();
        assert_eq!(parse_all(&bytes), 2);
        // A packet cut short waits for more bytes; garbage and a huge length are refused.
        let mut half = BytesMut::from(&bytes[..bytes.len() - 3]);
        assert!(matches!(
            next_packet(&mut half),
            Ok(Some((Packet::PingReq, _)))
        ));
        assert!(matches!(next_packet(&mut half), Ok(None)));
        assert!(next_packet(&mut BytesMut::from(&[0xF0u8, 0x00][..])).is_err());
        assert!(next_packet(&mut BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0x7F][..])).is_err());
    }
}
