//! `pwsync-relay`: the command line. Every command takes `--config FILE`
//! (default `/etc/pwsync/relay.toml`).

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::{AgentId, GroupName, SigningKey};
use pwsync_relay::config::{RelayConfig, DEFAULT_PATH};
use pwsync_relay::credentials::{Credentials, Identity};
use pwsync_relay::gateway::{tls_acceptor, Gateway, GatewayCounters};
use pwsync_relay::journal::{DeclaredGroups, Journal};
use pwsync_relay::liveness::Liveness;
use pwsync_relay::reload::{AdminRequest, Reloader};
use pwsync_relay::service::{Rejection, Relay};
use pwsync_relay::{broker, enrol, inspect};
use pwsync_runtime::{mqtt_options, shutdown_signal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "pwsync-relay",
    version,
    about = "pwsync relay: broker, durable journal and delivery to consumer groups"
)]
struct Cli {
    #[arg(long, global = true, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Run,
    /// Validate the config: everything `run` loads (keys, TLS certificate and key, client CA,
    /// credentials, revocation list, journal folder), read the way `run` reads it.
    Check,
    /// Generate the relay's Ed25519 signing keypair: DIR/relay.key (0600) and DIR/relay.pub;
    /// with --enrolment, the organisation's enrolment keypair instead (enrolment.key/.pub).
    Keygen {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        enrolment: bool,
    },
    /// A whole pwsync on this machine: keys, configs and an htpasswd target in DIR, then the
    /// relay, a consumer and an agent in the foreground until Ctrl-C.
    Quickstart {
        #[arg(long)]
        dir: PathBuf,
        /// Only write the setup; start nothing.
        #[arg(long)]
        no_start: bool,
        /// The high-availability set: three local nats-server nodes (JetStream) as the journal.
        #[arg(long)]
        nats: bool,
        /// How many relays (more than one needs --nats).
        #[arg(long, default_value_t = 1)]
        relays: usize,
    },
    /// Give a client its MQTT login: an agent (NAME) or a consumer group (GROUP). Writes the
    /// token to OUT/mqtt.pw (0600; the relay keeps only its hash) and prints the client's
    /// [transport] section. Enrolling again replaces the token. The running relay picks it up.
    Enroll {
        #[command(subcommand)]
        who: Who,
        /// Where to write mqtt.pw (created if missing).
        #[arg(long, global = true)]
        out: Option<PathBuf>,
        /// For an agent: its public signing key. Installed as agents_dir/NAME.pub, or, with
        /// --scope, certified instead.
        #[arg(long, global = true)]
        public_key: Option<PathBuf>,
        /// For an agent: sign a certificate (keys.enrolment_key) binding NAME, its public key
        /// and these user patterns (comma-separated), written to OUT/agent.cert.
        #[arg(long, global = true, value_delimiter = ',')]
        scope: Vec<String>,
        /// How long the certificate is valid (also the overlap after a key rotation).
        #[arg(long, global = true, default_value_t = 365)]
        valid_days: u64,
        /// For an agent: make its key pair here too (OUT/agent.key, 0600, and OUT/agent.pub, as
        /// `pwsync-agent keygen` does) and enrol that public key: one step for a new host.
        #[arg(long, global = true, conflicts_with = "public_key")]
        keygen: bool,
    },
    /// Withdraw an agent (NAME) or one certificate (serial:N): appends it to
    /// keys.revocation_list. Copy the list to the consumers (their keys.revocation_list).
    Revoke { entry: String },
    /// Withdraw a client's MQTT login (the running relay closes its open sessions within 2 s
    /// and refuses its next connection); for an agent, also remove its public key from
    /// agents_dir.
    Unenroll {
        #[command(subcommand)]
        who: Who,
    },
    /// Every agent enrolled or seen: connected now, and when it was last seen (agents ping
    /// every 15 s when idle). Works while the relay runs.
    Agents,
    /// Make the running relay read its config again (as SIGHUP does): `[groups]` is taken
    /// without a restart; a config that does not load, or changes another section, is refused
    /// and the running one kept.
    Reload,
    /// Journal tools: ls, stats and groups through the running relay (or on the journal when it
    /// is stopped); import with an embedded journal's relay stopped.
    Journal {
        /// The journal folder (default: journal.dir from --config).
        #[arg(long, global = true)]
        journal: Option<PathBuf>,
        #[command(subcommand)]
        command: JournalCommand,
    },
    #[command(flatten)]
    Docs(pwsync_runtime::docs::DocsCommand),
}

#[derive(Subcommand, Clone)]
enum Who {
    /// An agent, by its agent id.
    Agent { name: String },
    /// A consumer group, by its group name.
    Consumer { group: String },
}

impl Who {
    fn identity(&self) -> anyhow::Result<Identity> {
        Ok(match self {
            Who::Agent { name } => Identity::Agent(
                AgentId::new(name.as_str())
                    .map_err(|e| anyhow::anyhow!("agent id {name:?}: {e}"))?,
            ),
            Who::Consumer { group } => Identity::Consumer(
                GroupName::new(group.as_str())
                    .map_err(|e| anyhow::anyhow!("group name {group:?}: {e}"))?,
            ),
        })
    }
}

#[derive(Subcommand)]
enum JournalCommand {
    /// One line per record: offset, time received, agent, seq, size.
    Ls,
    /// Records, bytes, offsets, agents.
    Stats,
    /// Per declared group: committed offset, lag, age of the oldest unconsumed record.
    Groups,
    /// Journal the envelopes of a spool export (`pwsync-agent spool export`).
    Import { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pwsync_runtime::init_logging();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pwsync-relay: {}", pwsync_runtime::error_report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<RelayConfig> {
    Ok(RelayConfig::load(path)?)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Docs(d) => {
            d.run(Cli::command())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            pwsync_runtime::harden_process();
            let cfg = load(&cli.config)?;
            pwsync_runtime::tokio_runtime()
                .context("starting the async runtime")?
                .block_on(run(cfg, &cli.config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            let cfg = load(&cli.config)?;
            let socket = cfg.journal.dir.join(pwsync_runtime::admin::SOCKET_NAME);
            match pwsync_runtime::admin::call_printing(&socket, &AdminRequest::Reload, "reload") {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(pwsync_runtime::admin::AdminError::NotRunning(_)) => anyhow::bail!(
                    "no relay is running with {} (nothing listens on {}); start it to use this config",
                    cli.config.display(),
                    socket.display()
                ),
                Err(e) => Err(e.into()),
            }
        }
        Command::Check => {
            let cfg = load(&cli.config)?;
            let key = SigningKey::load(&cfg.keys.signing_key)?;
            for (name, g) in &cfg.groups {
                pwsync_proto::VerifyingKey::load(&g.public_key)
                    .with_context(|| format!("group {name}"))?;
            }
            check_what_run_loads(&cfg)?;
            let agents = AgentDirectory::new(&cfg.keys.agents_dir)
                .list()
                .with_context(|| {
                    format!("reading agents directory {}", cfg.keys.agents_dir.display())
                })?;
            if cfg.groups.is_empty() {
                println!("warning: no consumer groups declared; nothing will be delivered");
            }
            println!(
                "{}: OK (relay key {}, {} groups, {} enrolled agents)",
                cli.config.display(),
                key.verifying_key().key_id(),
                cfg.groups.len(),
                agents.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Enroll {
            who,
            out,
            public_key,
            scope,
            valid_days,
            keygen,
        } => {
            let cfg = load(&cli.config)?;
            let identity = who.identity()?;
            let Some(out) = out else {
                anyhow::bail!("give --out DIR: the token is written to DIR/mqtt.pw (mode 0600), never printed");
            };
            let public_key = match (keygen, &identity) {
                (false, _) => public_key,
                (true, Identity::Agent(_)) => {
                    pwsync_runtime::private_dir(&out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    let key = SigningKey::generate()?;
                    key.save(&out.join("agent.key"))?;
                    key.verifying_key().save(&out.join("agent.pub"))?;
                    println!(
                        "wrote {0}/agent.key (private, 0600: move it to the agent host, keys.signing_key) and {0}/agent.pub (key id {1})",
                        out.display(),
                        key.verifying_key().key_id().to_hex()
                    );
                    Some(out.join("agent.pub"))
                }
                (true, _) => anyhow::bail!("--keygen makes an agent's key pair; a consumer group makes its keys with `pwsync-consumer keygen`"),
            };
            let done = enrol::enroll(
                &cfg,
                &enrol::Enrolment {
                    identity: &identity,
                    out: &out,
                    public_key: public_key.as_deref(),
                    scope: &scope,
                    valid_days,
                },
            )?;
            if let Some((cert, file)) = &done.certificate {
                println!(
                    "certified {} (serial {}, scope {}, valid {valid_days} days) in {}; set keys.certificate to it in the agent's config",
                    cert.agent,
                    cert.serial,
                    cert.scope.join(","),
                    file.display()
                );
            }
            let pw = done.token_file;
            println!(
                "enrolled {identity}; its token is in {} (mode 0600; move it to the client).\nThe client's config:\n\n[transport]\nusername = \"{identity}\"\npassword_file = \"{}\"\n{}",
                pw.display(),
                pw.display(),
                match (&cfg.broker.insecure_plaintext, &cfg.broker.tls_cert) {
                    (true, _) => "insecure_plaintext = true\n".to_string(),
                    (false, Some(cert)) => match cert.with_file_name("ca.pem") {
                        ca if ca.exists() => format!("# copy {0} to the client\nca_file = \"{0}\"\n", ca.display()),
                        _ => format!("# the CA (PEM) that signed {}\nca_file = \"/etc/pwsync/tls/ca.pem\"\n", cert.display()),
                    },
                    (false, None) => String::new(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { entry } => {
            let cfg = load(&cli.config)?;
            let Some(list) = &cfg.keys.revocation_list else {
                anyhow::bail!("keys.revocation_list is not set in the relay config");
            };
            enrol::revoke(list, &entry)?;
            println!(
                "{entry} revoked in {}; copy it to every consumer's keys.revocation_list",
                list.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Unenroll { who } => {
            let cfg = load(&cli.config)?;
            let identity = who.identity()?;
            let (had_login, key) = enrol::unenroll(&cfg, &identity)?;
            if let Some(key) = key {
                println!(
                    "removed {}: the relay journals nothing more from {identity}",
                    key.display()
                );
            }
            if had_login {
                println!("{identity} can no longer log in");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{identity} was not enrolled");
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Agents => {
            let cfg = load(&cli.config)?;
            let mut enrolled: Vec<String> = AgentDirectory::new(&cfg.keys.agents_dir)
                .list()
                .with_context(|| format!("reading {}", cfg.keys.agents_dir.display()))?
                .iter()
                .map(|a| a.to_string())
                .collect();
            if let Ok(c) = Credentials::open(&cfg.broker.credentials) {
                enrolled.extend(
                    c.usernames()?
                        .iter()
                        .filter_map(|u| u.strip_prefix("agent:").map(String::from)),
                );
            }
            print!(
                "{}",
                pwsync_relay::liveness::table(
                    &enrolled,
                    &cfg.journal.dir.join(pwsync_relay::liveness::FILE)
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Quickstart {
            dir,
            no_start,
            nats,
            relays,
        } => {
            let shape = pwsync_relay::quickstart::Shape { relays, nats };
            pwsync_relay::quickstart::run(&dir, !no_start, shape)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out, enrolment } => {
            let (name, goes_to) = if enrolment {
                ("enrolment", "every consumer (keys.enrolment_public_key); enrolment.key is the relay's keys.enrolment_key")
            } else {
                ("relay", "every agent and consumer (keys.relay_public_key)")
            };
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let key = SigningKey::generate()?;
            key.save(&out.join(format!("{name}.key")))?;
            key.verifying_key().save(&out.join(format!("{name}.pub")))?;
            println!(
                "wrote {0}/{name}.key (private, 0600) and {0}/{name}.pub\nGive {name}.pub to {goes_to}.",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal { journal, command } => {
            let cfg = load(&cli.config);
            // --journal names an embedded journal's folder; without it the config decides.
            let explicit = journal.is_some();
            let dir = match (journal, &cfg) {
                (Some(d), _) => d,
                (None, Ok(c)) => c.journal.dir.clone(),
                (None, Err(e)) => {
                    anyhow::bail!("no --journal given and the config is unusable: {e}")
                }
            };
            let jetstream = cfg
                .as_ref()
                .ok()
                .filter(|_| !explicit)
                .and_then(|c| c.journal.jetstream.clone());
            let live = match &command {
                JournalCommand::Ls => Some(inspect::JournalRequest::Ls),
                JournalCommand::Stats => Some(inspect::JournalRequest::Stats),
                JournalCommand::Groups => Some(inspect::JournalRequest::Groups),
                JournalCommand::Import { .. } => None,
            };
            if let Some(request) = live {
                let socket = dir.join(pwsync_runtime::admin::SOCKET_NAME);
                match pwsync_runtime::admin::call_printing(
                    &socket,
                    &AdminRequest::Journal(request),
                    "journal",
                ) {
                    Ok(()) => return Ok(ExitCode::SUCCESS),
                    Err(pwsync_runtime::admin::AdminError::NotRunning(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let rt = pwsync_runtime::tokio_runtime().context("starting the async runtime")?;
            let code = rt.block_on(async {
                let j = Journal::open_for_tools(&dir, jetstream.as_ref()).await?;
                let mut out = std::io::stdout().lock();
                match command {
                    JournalCommand::Ls => inspect::ls(&j, &mut out).await?,
                    JournalCommand::Stats => inspect::stats(&j, &mut out).await?,
                    JournalCommand::Groups => {
                        let declared: Vec<GroupName> = cfg
                            .as_ref()
                            .map(|c| c.groups.keys().cloned().collect())
                            .unwrap_or_default();
                        if declared.is_empty() {
                            anyhow::bail!("no groups declared (groups come from --config)");
                        }
                        inspect::groups(&j, &declared, &mut out).await?;
                    }
                    JournalCommand::Import { file } => {
                        let cfg = cfg.as_ref().map_err(|e| {
                            anyhow::anyhow!(
                                "import checks signatures against keys.agents_dir from the config: {e}"
                            )
                        })?;
                        let tally =
                            inspect::import(&j, &cfg.agent_keys()?, &file, &mut out).await?;
                        if tally.refused > 0 {
                            return Ok(ExitCode::FAILURE);
                        }
                    }
                }
                Ok::<_, anyhow::Error>(ExitCode::SUCCESS)
            })?;
            Ok(code)
        }
    }
}

/// For `check`: loads, the way `run` does, everything `run` loads besides the signing and group
/// keys (which `check` loads itself): the listener's TLS certificate, key and client CA, the
/// credentials file, the enrolment key, the revocation list, an external broker's `[transport]`
/// files; and checks that the journal folder can be created or written. Binding the listeners
/// and opening the journal are left to `run` (a running relay holds both).
fn check_what_run_loads(cfg: &RelayConfig) -> anyhow::Result<()> {
    let b = &cfg.broker;
    if b.listen.is_some() {
        if b.insecure_plaintext {
            println!("warning: insecure_plaintext = true: the MQTT listener has no TLS");
        } else if let (Some(cert), Some(key)) = (&b.tls_cert, &b.tls_key) {
            tls_acceptor(cert, key, b.client_ca.as_deref())?;
        }
        Credentials::open(&b.credentials)?;
    } else {
        let (host, port) = b.client_address();
        let mut o = mqtt_options(&b.client_id, &host, port, 1);
        cfg.transport
            .clone()
            .unwrap_or_default()
            .apply(&mut o)
            .context("[transport]")?;
    }
    cfg.agent_keys()?;
    if let Some(list) = &cfg.keys.revocation_list {
        // `run` reads a missing list as empty (`revoke` creates it); an unreadable one would
        // withdraw nobody, so it stops `check`.
        if list.exists() {
            std::fs::read_to_string(list)
                .with_context(|| format!("the revocation list {}", list.display()))?;
        }
    }
    check_writable_dir(&cfg.journal.dir).context("journal.dir")?;
    if let Some(js) = &cfg.journal.jetstream {
        let report = pwsync_runtime::tokio_runtime()
            .context("starting the async runtime")?
            .block_on(pwsync_relay::journal::JetStreamJournal::probe(js))
            .context("[journal.jetstream]")?;
        println!("{report}");
    }
    Ok(())
}

/// `dir` is a folder this process can write to, or can be created (its nearest existing
/// ancestor is writable); a journal database in it is readable and writable.
fn check_writable_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let access = |p: &Path, mode: i32| -> bool {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            // SAFETY: access with a valid NUL-terminated path has no other preconditions.
            .map(|c| unsafe { libc::access(c.as_ptr(), mode) } == 0)
            .unwrap_or(false)
    };
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => break,
        }
    }
    if !existing.is_dir() {
        anyhow::bail!("{} is not a folder", existing.display());
    }
    if !access(existing, libc::W_OK | libc::X_OK) {
        anyhow::bail!(
            "{} is not writable by this user: {}",
            existing.display(),
            if existing == dir {
                "the relay cannot write its journal there"
            } else {
                "the relay cannot create its journal folder there"
            }
        );
    }
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "redb") && !access(&path, libc::R_OK | libc::W_OK)
        {
            anyhow::bail!(
                "{} is not readable and writable by this user",
                path.display()
            );
        }
    }
    Ok(())
}

async fn run(cfg: RelayConfig, config_path: &Path) -> anyhow::Result<()> {
    let signing = SigningKey::load(&cfg.keys.signing_key)?;
    let declared = DeclaredGroups::new(cfg.groups.keys().cloned().collect());
    // The relay's own folder (also with a JetStream journal: lock, policies, liveness), 0700.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&cfg.journal.dir)
        .with_context(|| format!("creating {}", cfg.journal.dir.display()))?;
    let journal = Arc::new(Journal::open(&cfg.journal, &declared).await?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let gateway_counters = Arc::new(GatewayCounters::default());
    let seen_file = cfg.journal.dir.join(pwsync_relay::liveness::FILE);
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
    counters: Arc<pwsync_relay::service::Counters>,
    gateway: Arc<GatewayCounters>,
    liveness: Arc<Liveness>,
    /// The journal's figures as last read (every 2 s, by [`Observed::read_journal`]).
    figures: Arc<std::sync::Mutex<JournalFigures>>,
}

#[derive(Default)]
struct JournalFigures {
    stats: Option<Result<pwsync_relay::journal::JournalStats, String>>,
    groups: Vec<pwsync_relay::journal::GroupStanding>,
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
    let internal_password = pwsync_relay::credentials::random_token()?;
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
    pwsync_relay::pki::write_private(
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
