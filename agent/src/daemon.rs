//! `pwsync-agent run`: wires the spool, the writer, the socket server and the forwarder
//! together, and shuts them down in order on SIGTERM/SIGINT (stop taking requests, let the
//! writer finish its group, stop forwarding; the spool keeps whatever was not acked).

use crate::api::StatusReport;
use crate::config::{AgentConfig, Mode};
use crate::forwarder::Forwarder;
use crate::scope::Scope;
use crate::server::{self, Counters, Server};
use crate::spool::Spool;
use crate::writer;
use anyhow::Context;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{EncryptionKey, HybridClock, Sealer, SigningKey, VerifyingKey};
use pwsync_runtime::{mqtt_options, shutdown_signal};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let signing = SigningKey::load(&cfg.keys.signing_key)?;
    let own_key = Arc::new(signing.verifying_key());
    let consumer_key = EncryptionKey::load(&cfg.keys.consumer_public_key)?;
    let relay_key = VerifyingKey::load(&cfg.keys.relay_public_key)?;
    let scope = Scope::new(&cfg.scope).map_err(anyhow::Error::msg)?;
    let gid = match &cfg.socket.group {
        Some(g) => Some(
            server::group_id(g)
                .map_err(anyhow::Error::msg)
                .context("socket.group")?,
        ),
        None => None,
    };
    let spool = Arc::new(Spool::open(&cfg.spool.dir, cfg.spool.max_bytes)?);
    let clock = Arc::new(Mutex::new(HybridClock::starting_after(spool.last_hlc())));
    let appended = Arc::new(Notify::new());
    let mut sealer = Sealer::new(cfg.agent_id.clone(), signing, consumer_key);
    if let Some(path) = &cfg.keys.certificate {
        let cert = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("keys.certificate {}: {e}", path.display()))?;
        if cert.is_empty() || cert.len() > pwsync_proto::certificate::MAX_CERTIFICATE_BYTES {
            anyhow::bail!(
                "keys.certificate {} is not an agent certificate (`pwsync-relay enroll agent NAME --scope ...` writes one)",
                path.display()
            );
        }
        sealer = sealer.with_certificate(cert);
    }
    let (writer, writer_thread) = writer::start(
        spool.clone(),
        sealer,
        cfg.origin(),
        clock.clone(),
        appended.clone(),
    )
    .context("starting the spool writer")?;
    let counters = Arc::new(Counters::default());

    let status: Arc<dyn Fn() -> StatusReport + Send + Sync> = Arc::new({
        let spool = spool.clone();
        let counters = counters.clone();
        let agent_id = cfg.agent_id.to_string();
        let mode = match cfg.mode {
            Mode::Strict => "strict",
            Mode::Lenient => "lenient",
        };
        move || -> StatusReport {
            let now = wall_ms();
            let stats = spool.stats().unwrap_or_default();
            let last_ack = counters.last_ack_ms.load(Ordering::Relaxed);
            StatusReport {
                agent_id: agent_id.clone(),
                mode: mode.into(),
                connected: counters.connected.load(Ordering::Relaxed),
                spool_records: stats.records,
                spool_bytes: stats.bytes,
                spool_max_bytes: stats.max_bytes,
                oldest_age_secs: stats
                    .oldest_accepted_ms
                    .map(|t| now.saturating_sub(t) / 1000),
                next_seq: stats.next_seq,
                last_acked_seq: stats.acked_seq,
                last_ack_age_secs: (last_ack > 0).then(|| now.saturating_sub(last_ack) / 1000),
                accepted: counters.accepted.load(Ordering::Relaxed),
                rejected: counters.rejected.load(Ordering::Relaxed),
                ignored: counters.ignored.load(Ordering::Relaxed),
                quarantined: stats.quarantined,
            }
        }
    });

    let policies = match &cfg.policy {
        Some(p) => Some(Arc::new(
            crate::policy::Policies::open(p, &cfg.spool.dir.join("policy"))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        None => None,
    };
    let committer_uids = cfg
        .socket
        .committers
        .iter()
        .map(|name| server::user_id(name).map_err(|e| anyhow::anyhow!("[socket] committers: {e}")))
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let listener = server::bind(&cfg.socket.path, cfg.socket.mode, gid)?;
    let server = Arc::new(Server {
        committer_uids,
        writer: writer.clone(),
        scope,
        mode: cfg.mode,
        origin: cfg.origin(),
        counters: counters.clone(),
        status: status.clone(),
        allowed_gid: gid,
        backfill: Arc::new(
            crate::backfill::Gate::open(&cfg.spool.dir, cfg.backfill_interval_secs * 1000)
                .map_err(|e| anyhow::anyhow!("the backfill gate: {e}"))?,
        ),
        policies: policies.clone(),
        checks: Default::default(),
    });

    let transport = cfg.transport();
    let mut each = Vec::new();
    for (host, port) in cfg
        .relay
        .endpoints()
        .map_err(|e| anyhow::anyhow!("[relay] {e}"))?
    {
        let mut options = mqtt_options(&cfg.client_id(), &host, port, cfg.relay.window);
        transport
            .apply(&mut options)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        each.push(options);
    }
    let relays = pwsync_runtime::failover::Failover::new(each);
    let relays_text = relays.describe();
    transport.log_mode(&relays_text);
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(listen) = cfg.metrics.listen {
        observe(listen, status.clone(), stop_rx.clone());
    }
    let forwarder = Forwarder {
        spool: spool.clone(),
        writer,
        agent: cfg.agent_id.clone(),
        relay_key,
        clock,
        counters,
        appended,
        window: cfg.relay.window,
        ack_timeout: Duration::from_secs(cfg.relay.ack_timeout_secs.max(1)),
        reconnect_max: Duration::from_secs(cfg.relay.reconnect_max_secs.max(1)),
        relays,
        policies,
    };
    let forwarding = tokio::spawn(forwarder.run(stop_rx));

    let stats = spool.stats()?;
    tracing::info!(
        agent = %cfg.agent_id, socket = %cfg.socket.path.display(), spool = %cfg.spool.dir.display(),
        waiting = stats.records, relay = %relays_text,
        "agent ready"
    );
    if let Some(warning) = cfg.policy_warning() {
        tracing::warn!("{warning}");
    }
    let admin_socket = cfg.spool.dir.join(pwsync_runtime::admin::SOCKET_NAME);
    let admin = pwsync_runtime::admin::bind(&admin_socket)
        .with_context(|| format!("listening on the admin socket {}", admin_socket.display()))?;
    let inspected = spool.clone();
    pwsync_runtime::admin::serve(
        admin,
        move |request: crate::inspect::SpoolRequest, reply| {
            let (spool, key) = (inspected.clone(), own_key.clone());
            tokio::task::spawn_blocking(move || {
                crate::inspect::answer(&spool, &key, request, reply)
            });
        },
    );
    server.clone().serve(listener, shutdown_signal()).await;
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    let _ = forwarding.await;
    drop(server);
    let _ = std::fs::remove_file(&cfg.socket.path);
    let _ = std::fs::remove_file(&admin_socket);
    // The writer thread ends when the last handle is gone (connection tasks may still hold one
    // for a moment); it is not joined so a stuck client cannot hold up the exit.
    drop(writer_thread);
    Ok(())
}

/// `/metrics` and `/healthz` for the agent: the numbers of `pwsync-agent status`, refreshed every
/// 2 s, and healthy while the spool has room and the relay is connected.
fn observe(
    listen: std::net::SocketAddr,
    status: Arc<dyn Fn() -> StatusReport + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    use pwsync_runtime::observe::Check;
    let report = status.clone();
    pwsync_runtime::observe::serve(
        listen,
        Arc::new(move || {
            let s = report();
            vec![
                Check::new(
                    "spool",
                    s.spool_bytes < s.spool_max_bytes,
                    format!(
                        "{} records, {} of {} bytes",
                        s.spool_records, s.spool_bytes, s.spool_max_bytes
                    ),
                ),
                Check::new(
                    "relay",
                    s.connected,
                    if s.connected {
                        "connected".to_string()
                    } else {
                        "not connected; changes wait in the spool".to_string()
                    },
                ),
            ]
        }),
    );
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = every.tick() => {}
            }
            let s = status();
            metrics::gauge!("pwsync_agent_spool_records").set(s.spool_records as f64);
            metrics::gauge!("pwsync_agent_spool_bytes").set(s.spool_bytes as f64);
            metrics::gauge!("pwsync_agent_spool_max_bytes").set(s.spool_max_bytes as f64);
            metrics::gauge!("pwsync_agent_spool_oldest_age_seconds")
                .set(s.oldest_age_secs.unwrap_or(0) as f64);
            metrics::gauge!("pwsync_agent_connected").set(if s.connected { 1.0 } else { 0.0 });
            metrics::gauge!("pwsync_agent_quarantined_records").set(s.quarantined as f64);
            for (result, n) in [
                ("accepted", s.accepted),
                ("rejected", s.rejected),
                ("ignored", s.ignored),
            ] {
                metrics::counter!("pwsync_agent_submits_total", "result" => result).absolute(n);
            }
        }
    });
}
