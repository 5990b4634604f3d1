//! The relay daemon as `pwsync-relay run` starts it: the journal, the broker (embedded behind
//! the gateway, or an external one), the relay service ([`crate::service`]), the admin socket
//! and reloads, `/metrics` and `/healthz`, and a graceful stop on SIGTERM or Ctrl-C that
//! records the agents' liveness and logs the run's totals.

use crate::config::RelayConfig;
use crate::credentials::Credentials;
use crate::gateway::{tls_acceptor, Gateway, GatewayCounters};
use crate::journal::{DeclaredGroups, Journal};
use crate::liveness::Liveness;
use crate::reload::{AdminRequest, Reloader};
use crate::service::{Rejection, Relay};
use crate::{broker, inspect};
use anyhow::Context;
use pwsync_proto::SigningKey;
use pwsync_runtime::{mqtt_options, shutdown_signal};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Runs the relay until SIGTERM or Ctrl-C.
pub async fn run(cfg: RelayConfig, config_path: &Path) -> anyhow::Result<()> {
    let signing = SigningKey::load(&cfg.keys.signing_key)?;
    let declared = DeclaredGroups::new(cfg.groups.keys().cloned().collect());
    // The relay's own folder (also with a JetStream journal: lock, policies, liveness), 0700.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&cfg.journal.dir)
        .with_context(|| format!("creating {}", cfg.journal.dir.display()))?;
    let journal = Arc::new(Journal::open(&cfg.journal, &declared).await?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gateway_counters = Arc::new(GatewayCounters::default());
    let seen_file = cfg.journal.dir.join(crate::liveness::FILE);
    let liveness = Arc::new(Liveness::resume(&seen_file));
    let options = match cfg.broker.listen {
        Some(listen) => {
            start_embedded_broker(
                &cfg,
                listen,
                gateway_counters.clone(),
                liveness.clone(),
                stop_rx.clone(),
            )
            .await?
        }
        None => {
            let (host, port) = cfg.broker.client_address();
            let mut o = mqtt_options(&cfg.broker.client_id, &host, port, 1024);
            let transport = cfg.transport.clone().unwrap_or_default();
            transport.apply(&mut o).context("[transport]")?;
            transport.log_mode(&format!("{host}:{port}"));
            o
        }
    };
    let relay = Relay::new(
        &cfg,
        journal.clone(),
        declared.clone(),
        signing,
        liveness.clone(),
    )
    .await?;
    let admin_socket = cfg.journal.dir.join(pwsync_runtime::admin::SOCKET_NAME);
    let admin = pwsync_runtime::admin::bind(&admin_socket)
        .with_context(|| format!("listening on the admin socket {}", admin_socket.display()))?;
    let (reloads, mut reload_rx) =
        pwsync_runtime::admin::ReloadRequests::start("relay").context("handling SIGHUP")?;
    let (inspected, groups) = (journal.clone(), declared.clone());
    pwsync_runtime::admin::serve(admin, move |request: AdminRequest, reply| match request {
        AdminRequest::Journal(request) => {
            let (journal, groups) = (inspected.clone(), groups.get());
            tokio::spawn(async move { inspect::answer(&journal, &groups, request, reply).await });
        }
        AdminRequest::Reload => reloads.ask(reply),
    });
    let (changes_tx, changes_rx) = tokio::sync::mpsc::unbounded_channel();
    let groups_at_start = cfg.groups.len();
    let describe_journal = journal.describe(&cfg.journal.dir);
    let metrics_listen = cfg.metrics.listen;
    let mut reloader = Reloader {
        config_path: config_path.to_path_buf(),
        running: cfg,
        changes: changes_tx,
    };
    let reloads = tokio::spawn(async move {
        while let Some(reply) = reload_rx.recv().await {
            let result = reloader.reload().await;
            pwsync_runtime::admin::report_reload(&reloader.config_path, result, reply);
        }
    });
    let observed = Observed {
        journal: journal.clone(),
        groups: declared.clone(),
        counters: relay.counters.clone(),
        gateway: gateway_counters.clone(),
        liveness: liveness.clone(),
        figures: Default::default(),
    };
    observed.read_journal().await;
    if let Some(listen) = metrics_listen {
        let o = observed.clone();
        pwsync_runtime::observe::serve(listen, Arc::new(move || o.checks()));
    }
    let recorder = {
        let (liveness, mut stop) = (liveness.clone(), stop_rx.clone());
        let file = seen_file.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    _ = every.tick() => {}
                }
                if let Err(e) = liveness.write(&file, false) {
                    tracing::warn!(file = %file.display(), error = %e, "cannot record agents' liveness");
                }
                observed.read_journal().await;
                observed.record();
            }
        })
    };
    let counters = relay.counters.clone();
    // Not fatal: a shared journal may miss one answer while its cluster elects a leader.
    let records = journal.stats().await.map(|s| s.records).ok();
    tracing::info!(
        journal = %describe_journal, records = ?records, groups = groups_at_start,
        "relay ready"
    );
    let stopper = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    relay.run(options, changes_rx, stop_rx).await?;
    stopper.abort();
    reloads.abort();
    recorder.abort();
    let _ = liveness.write(&seen_file, true);
    let rejected: Vec<String> = Rejection::ALL
        .iter()
        .filter(|r| counters.rejected(**r) > 0)
        .map(|r| format!("{}={}", r.as_str(), counters.rejected(*r)))
        .collect();
    tracing::info!(
        journaled = counters.journaled.load(Ordering::Relaxed),
        duplicates = counters.duplicates.load(Ordering::Relaxed),
        delivered = counters.delivered.load(Ordering::Relaxed),
        rejected = %rejected.join(" "),
        gateway = %gateway_counters.summary(),
        "relay stopped"
    );
    Ok(())
}

/// What the relay's `/metrics` and `/healthz` read.
#[derive(Clone)]
struct Observed {
    journal: Arc<Journal>,
    groups: DeclaredGroups,
    counters: Arc<crate::service::Counters>,
    gateway: Arc<GatewayCounters>,
    liveness: Arc<Liveness>,
    /// The journal's figures as last read (every 2 s, by [`Observed::read_journal`]).
    figures: Arc<std::sync::Mutex<JournalFigures>>,
}

#[derive(Default)]
struct JournalFigures {
    stats: Option<Result<crate::journal::JournalStats, String>>,
    groups: Vec<crate::journal::GroupStanding>,
}

impl Observed {
    fn figures(&self) -> std::sync::MutexGuard<'_, JournalFigures> {
        self.figures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the journal's figures for the next [`Observed::checks`] and [`Observed::record`].
    async fn read_journal(&self) {
        let stats = self.journal.stats().await.map_err(|e| e.to_string());
        let groups = self
            .journal
            .groups(&self.groups.get())
            .await
            .unwrap_or_default();
        let mut f = self.figures();
        f.stats = Some(stats);
        f.groups = groups;
    }

    /// Healthy while the journal reads (and, on JetStream, is connected with a quorum) and the
    /// relay's client is at the broker.
    fn checks(&self) -> Vec<pwsync_runtime::observe::Check> {
        use pwsync_runtime::observe::Check;
        let journal = match &self.figures().stats {
            Some(Ok(s)) => Check::new("journal", true, format!("{} records", s.records)),
            Some(Err(e)) => Check::new("journal", false, e.clone()),
            None => Check::new("journal", false, "not read yet"),
        };
        let connected = self.counters.broker_connected.load(Ordering::Relaxed);
        let mut checks = vec![journal];
        checks.extend(self.journal.checks());
        checks.push(Check::new(
            "broker",
            connected,
            if connected {
                "subscribed"
            } else {
                "the relay's client is not connected"
            },
        ));
        checks
    }

    /// Refreshes the gauges and counters (every 2 s).
    fn record(&self) {
        use metrics::{counter, gauge};
        let now = pwsync_proto::hlc::wall_ms();
        {
            let f = self.figures();
            if let Some(Ok(s)) = &f.stats {
                gauge!("pwsync_relay_journal_records").set(s.records as f64);
                gauge!("pwsync_relay_journal_bytes").set(s.bytes as f64);
            }
            for g in &f.groups {
                gauge!("pwsync_relay_group_lag_records", "group" => g.group.clone())
                    .set(g.lag_records as f64);
                gauge!("pwsync_relay_group_oldest_age_seconds", "group" => g.group.clone()).set(
                    g.oldest_unconsumed_ms
                        .map(|t| now.saturating_sub(t) / 1000)
                        .unwrap_or(0) as f64,
                );
            }
        }
        for check in self.journal.checks() {
            gauge!("pwsync_relay_journal_check", "check" => check.name).set(if check.ok {
                1.0
            } else {
                0.0
            });
        }
        counter!("pwsync_relay_journal_errors_total")
            .absolute(self.counters.journal_errors.load(Ordering::Relaxed));
        let c = &self.counters;
        counter!("pwsync_relay_journaled_total").absolute(c.journaled.load(Ordering::Relaxed));
        counter!("pwsync_relay_duplicates_total").absolute(c.duplicates.load(Ordering::Relaxed));
        counter!("pwsync_relay_delivered_total").absolute(c.delivered.load(Ordering::Relaxed));
        for r in Rejection::ALL {
            counter!("pwsync_relay_rejected_total", "reason" => r.as_str()).absolute(c.rejected(r));
        }
        gauge!("pwsync_relay_broker_connected").set(
            if c.broker_connected.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            },
        );
        for (reason, n) in self.gateway.by_reason() {
            counter!("pwsync_relay_gateway_refused_total", "reason" => reason).absolute(n);
        }
        counter!("pwsync_relay_gateway_withdrawn_sessions_total")
            .absolute(self.gateway.withdrawn.load(Ordering::Relaxed));
        let seen = self.liveness.snapshot();
        gauge!("pwsync_relay_connected_agents")
            .set(seen.values().filter(|s| s.connections > 0).count() as f64);
        for (agent, s) in seen {
            if let Some(ahead) = s.clock_ahead_ms {
                gauge!("pwsync_relay_agent_clock_ahead_seconds", "agent" => agent.clone())
                    .set(ahead as f64 / 1000.0);
            }
            gauge!("pwsync_relay_agent_last_seen_age_seconds", "agent" => agent)
                .set(now.saturating_sub(s.last_seen_ms) as f64 / 1000.0);
        }
    }
}

/// The file in the journal folder that holds the internal broker's address and login.
const INTERNAL_BROKER_FILE: &str = "broker-internal.toml";

/// Files the relay opens besides its client sessions (journal, logs, sockets, its own client).
const OWN_FILES: u64 = 256;

/// Starts rumqttd on a loopback port with a random internal login, and the gateway on `listen`
/// in front of it; returns the MQTT options of the relay's own client (internal, plain TCP).
async fn start_embedded_broker(
    cfg: &RelayConfig,
    listen: std::net::SocketAddr,
    counters: Arc<GatewayCounters>,
    liveness: Arc<Liveness>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<rumqttc::MqttOptions> {
    let b = &cfg.broker;
    // Each client session holds three descriptors here: the client's, and both ends of its
    // connection through the gateway to the embedded broker.
    match pwsync_runtime::raise_open_files_limit() {
        Ok(open_files)
            if open_files
                < (b.max_connections as u64)
                    .saturating_mul(3)
                    .saturating_add(OWN_FILES) =>
        {
            tracing::warn!(
                open_files,
                max_connections = b.max_connections,
                "the relay may open {open_files} files, enough for about {} client sessions of the {} max_connections allows (each takes 3); raise its limit (LimitNOFILE= in the systemd unit, as the shipped unit does)",
                open_files.saturating_sub(OWN_FILES) / 3,
                b.max_connections
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open files limit"),
    }
    let tls = if b.insecure_plaintext {
        tracing::warn!(%listen, "insecure_plaintext = true: the MQTT listener has NO TLS; logins and messages cross the network in clear");
        None
    } else {
        match (&b.tls_cert, &b.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key, b.client_ca.as_deref())?),
            _ => anyhow::bail!("[broker] needs tls_cert and tls_key, or insecure_plaintext = true"),
        }
    };
    let credentials = Arc::new(Credentials::open(&b.credentials)?);
    let internal = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a loopback port for the embedded broker")?;
    let internal_user = "pwsync-relay-internal".to_string();
    let internal_password = crate::credentials::random_token()?;
    broker::start(
        internal,
        (&internal_user, &internal_password),
        b.max_segment_size,
        b.max_segment_count,
        b.max_connections,
    )?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for MQTT clients"))?;
    tracing::info!(
        %listen, tls = tls.is_some(), client_certificates = b.client_ca.is_some(),
        enrolled = credentials.usernames().map(|u| u.len()).unwrap_or(0),
        "MQTT gateway listening"
    );
    // For tools and tests on the relay host that must act as the relay at the broker (debugging
    // with an MQTT client, impersonation tests of the consumers' own checks): the internal
    // address and login, private to the relay's user. What it grants is bounded by the
    // signatures: a delivery or an ack not signed with the relay's key is refused downstream.
    crate::pki::write_private(
        &cfg.journal.dir.join(INTERNAL_BROKER_FILE),
        &format!(
            "# The embedded broker's internal listener (this run only). Keep private.\naddress = \"{internal}\"\nusername = \"{internal_user}\"\npassword = \"{}\"\n",
            internal_password.as_str()
        ),
    )?;
    let mut options = mqtt_options(&b.client_id, "127.0.0.1", internal.port(), 1024);
    options.set_credentials(internal_user.clone(), internal_password.as_str());
    let gateway = Arc::new(Gateway {
        tls,
        credentials,
        broker: internal,
        internal_user,
        internal_password,
        counters,
        liveness,
        max_sessions_per_login: b.max_sessions_per_login,
        sessions: Default::default(),
    });
    tokio::spawn(gateway.serve(listener, stop));
    Ok(options)
}
