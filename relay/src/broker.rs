//! The embedded MQTT broker (rumqttd, MQTT 3.1.1 listener only).
//!
//! It listens on loopback only, with one random login that the relay's own client and its
//! [gateway](crate::gateway) use; clients never reach it but through the gateway.
//!
//! The broker is a switchboard, not a store: the relay's journal keeps every envelope and every
//! delivery is redone until committed, so nothing here needs to be durable. `Broker::start()`
//! blocks, so it runs on its own thread. rumqttd's Prometheus section is left out (it installs a
//! global exporter and panics on a port clash).

use pwsync_proto::limits::MAX_MQTT_PACKET_BYTES;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

/// Starts the broker on its own thread, listening on `listen` (loopback: the gateway's side)
/// with `login` as its only login, and waits until it accepts connections.
pub fn start(
    listen: SocketAddr,
    login: (&str, &str),
    max_segment_size: usize,
    max_segment_count: usize,
    max_connections: usize,
) -> anyhow::Result<()> {
    // Fail plainly when something else holds the port (rumqttd would only log it on its thread).
    drop(TcpListener::bind(listen).map_err(|e| {
        anyhow::anyhow!("cannot listen on {listen} for the embedded MQTT broker: {e}")
    })?);
    let server = ServerSettings {
        name: "pwsync-v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_MQTT_PACKET_BYTES,
            max_inflight_count: 1024,
            auth: Some(HashMap::from([(login.0.to_string(), login.1.to_string())])),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1024,
            max_segment_size,
            max_segment_count,
            ..Default::default()
        },
        v4: Some(HashMap::from([("pwsync-v4".to_string(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;
    if !wait_listening(listen, Duration::from_secs(10)) {
        anyhow::bail!("the embedded MQTT broker did not start listening on {listen} within 10 s");
    }
    Ok(())
}

/// Waits until something listens on `addr`, without connecting to it (a probe connection
/// would show up in the broker's log as a failed client): binding fails once it is taken.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpListener::bind(addr).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// [`set_nodelay_everywhere`] once, shortly, for every burst of new broker connections: many
/// sessions starting together share one sweep of the descriptor table.
pub fn sweep_nodelay_soon() {
    static PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if PENDING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        // Long enough for rumqttd to accept the connections of the burst.
        tokio::time::sleep(Duration::from_millis(20)).await;
        PENDING.store(false, std::sync::atomic::Ordering::Release);
        set_nodelay_everywhere();
    });
}

/// Sets TCP_NODELAY on every TCP socket of this process. rumqttd 0.20 leaves Nagle's algorithm
/// on for the connections it accepts, so a small packet it sends while an earlier one is not yet
/// acknowledged waits for the peer's delayed ACK (40 ms on Linux): measured as ~40 ms added to
/// an agent's publish-to-ack time. rumqttd runs in this process and gives no hook on its sockets,
/// so the relay sweeps its own descriptors after connections are made. Every TCP socket of the
/// relay wants TCP_NODELAY; on anything else the call fails harmlessly.
pub fn set_nodelay_everywhere() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let is_socket = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if is_socket {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on a descriptor of this process with a valid pointer and length;
            // it changes no ownership, and on a non-TCP socket it only returns an error.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}
