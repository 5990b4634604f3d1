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

/// What an operator asks of the running agent over its admin socket
/// (`SPOOL_DIR/admin.sock`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum AdminRequest {
    Spool(crate::inspect::SpoolRequest),
    /// Read agent.toml again: `[scope]` and `[policy]` are taken without a restart.
    Reload,
}

/// Why `new` cannot be taken by a reload of an agent running `old`: a section only a restart
/// changes (`[samba]` and `[ldap_sock]` are their own processes').
pub fn needs_restart(old: &AgentConfig, new: &AgentConfig) -> Option<&'static str> {
    pwsync_runtime::admin::first_change(&[
        ("agent_id", &old.agent_id, &new.agent_id),
        ("origin", &old.origin, &new.origin),
        ("mode", &old.mode, &new.mode),
        ("[keys]", &old.keys, &new.keys),
        ("[socket]", &old.socket, &new.socket),
        ("[spool]", &old.spool, &new.spool),
        ("[relay]", &old.relay, &new.relay),
        ("[transport]", &old.transport, &new.transport),
        ("[metrics]", &old.metrics, &new.metrics),
        (
            "backfill_interval_secs",
            &old.backfill_interval_secs,
            &new.backfill_interval_secs,
        ),
    ])
}

/// The parts of a running agent a reload replaces.
struct Reloadable {
    config_path: std::path::PathBuf,
    server: Arc<Server>,
    policies: Arc<crate::policy::Policies>,
    resubscribe: Arc<Notify>,
}

impl Reloadable {
    /// Reads the config again and takes its `[scope]` and `[policy]` when the whole file loads
    /// and nothing else changed. Says what it took, or why nothing.
    fn reload(&self, running: &mut AgentConfig) -> Result<String, String> {
        let kept = "the running config stays";
        let new = AgentConfig::load(&self.config_path)
            .map_err(|e| format!("{}; {kept}", pwsync_runtime::error_report(&e)))?;
        if let Some(section) = needs_restart(running, &new) {
            return Err(format!(
                "{section} changed, which takes a restart of the agent (systemctl restart pwsync-agent); nothing was reloaded, {kept}"
            ));
        }
        let scope = Scope::new(&new.scope).map_err(|e| format!("{e}; {kept}"))?;
        self.policies
            .reconfigure(new.policy.as_ref())
            .map_err(|e| format!("{e}; {kept}"))?;
        *self.server.scope.write().unwrap_or_else(|e| e.into_inner()) = scope;
        self.resubscribe.notify_one();
        let groups: Vec<String> = new
            .policy
            .iter()
            .flat_map(|p| p.groups.keys().map(|g| g.to_string()))
            .collect();
        if let Some(warning) = new.policy_warning() {
            tracing::warn!("{warning}");
        }
        *running = new;
        Ok(format!("scope and policy groups {groups:?} taken"))
    }
}

pub async fn run(cfg: AgentConfig, config_path: &std::path::Path) -> anyhow::Result<()> {
    let signing = SigningKey::load(&cfg.keys.signing_key)?;
    let own_key = Arc::new(signing.verifying_key());
    let consumer_key = EncryptionKey::load(&cfg.keys.consumer_public_key)?;
    let relay_key = VerifyingKey::load(&cfg.keys.relay_public_key)?;
    let scope = std::sync::RwLock::new(Scope::new(&cfg.scope).map_err(anyhow::Error::msg)?);
    let gid = match &cfg.socket.group {
        Some(g) => Some(
            crate::unix_users::group_id(g)
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

    // Held with or without `[policy]` (with none, every password passes), so a reload can add
    // groups.
    let policies = Arc::new(
        crate::policy::Policies::open(cfg.policy.as_ref(), &cfg.spool.dir.join("policy"))
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let committer_uids = cfg
        .socket
        .committers
        .iter()
        .map(|name| {
            crate::unix_users::user_id(name)
                .map_err(|e| anyhow::anyhow!("[socket] committers: {e}"))
        })
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
        policies: Some(policies.clone()),
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
    let resubscribe = Arc::new(Notify::new());
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
        policies: Some(policies.clone()),
        resubscribe: resubscribe.clone(),
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
    let (asked, mut reload_rx) =
        pwsync_runtime::admin::ReloadRequests::start("agent").context("handling SIGHUP")?;
    pwsync_runtime::admin::serve(admin, move |request: AdminRequest, reply| match request {
        AdminRequest::Spool(request) => {
            let (spool, key) = (inspected.clone(), own_key.clone());
            tokio::task::spawn_blocking(move || {
                crate::inspect::answer(&spool, &key, request, reply)
            });
        }
        AdminRequest::Reload => asked.ask(reply),
    });
    let reloadable = Reloadable {
        config_path: config_path.to_path_buf(),
        server: server.clone(),
        policies: policies.clone(),
        resubscribe,
    };
    let socket_path = cfg.socket.path.clone();
    let mut running = cfg;
    let reloads = tokio::spawn(async move {
        while let Some(reply) = reload_rx.recv().await {
            let result = reloadable.reload(&mut running);
            pwsync_runtime::admin::report_reload(&reloadable.config_path, result, reply);
        }
    });
    server.clone().serve(listener, shutdown_signal()).await;
    reloads.abort();
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    let _ = forwarding.await;
    drop(server);
    let _ = std::fs::remove_file(&socket_path);
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
