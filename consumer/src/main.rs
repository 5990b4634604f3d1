//! `pwsync-consumer`: the command line. Every command takes `--config FILE`
//! (default `/etc/pwsync/consumer.toml`).

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use pwsync_consumer::build_targets;
use pwsync_consumer::config::{ConsumerConfig, DEFAULT_PATH};
use pwsync_consumer::pipeline::{Pipeline, StatusReport};
use pwsync_consumer::service::{pipeline_thread, MqttSide, PipelineCommand};
use pwsync_consumer::state::State;
use pwsync_consumer::unseal::Unsealer;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{DecryptionKey, Opener, SigningKey, VerifyingKey};
use pwsync_runtime::admin::Reply;
use pwsync_runtime::shutdown_signal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

#[derive(Parser)]
#[command(
    name = "pwsync-consumer",
    version,
    about = "pwsync consumer: applies password changes to the systems kept in step"
)]
struct Cli {
    #[arg(long, global = true, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the consumer.
    Run {
        /// Log what would be applied; apply nothing, commit nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Generate keys: DIR/consumer.key (RSA-3072, private, 0600) and DIR/consumer.pub (for the
    /// agents), and DIR/group.key / DIR/group.pub (the group's commit-signing key; the relay
    /// gets group.pub).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate the config: keys readable and of the right mode, patterns, targets usable.
    Check,
    /// Where the running consumer stands (per target; or for one user).
    Status {
        #[arg(long)]
        user: Option<String>,
    },
    /// Changes that failed for good: through the running consumer, or on its state folder
    /// when it is stopped.
    Deadletter {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Which source user holds each account at each target (the first whose change applied
    /// there; no other user's change is applied to it).
    Owner {
        #[command(subcommand)]
        command: OwnerCommand,
    },
    /// The account audit: for each user and target, whether the password there is still the
    /// one pwsync wrote (in step), was changed outside pwsync (when, and by whom where the
    /// target says), was never written by pwsync, waits (retrying, dead letter), or is missing.
    /// Reads the targets at `[audit] reads_per_sec`; through the running consumer, or on its
    /// state folder when it is stopped. Never a password or a hash.
    Audit {
        /// Only these users (repeat the option); every user the consumer knows by default.
        #[arg(long)]
        user: Vec<String>,
        /// Only these targets (repeat the option).
        #[arg(long)]
        target: Vec<String>,
        /// The report as JSON (per user and target, and a summary per target).
        #[arg(long)]
        json: bool,
    },
    /// Make the running consumer read its config again (as SIGHUP does): targets, routing,
    /// protect lists, agent scopes, retry rules and policy rules. A config that does not pass
    /// `check`, or changes what needs a restart, is refused and the running one stays.
    Reload,
    #[command(flatten)]
    Docs(pwsync_runtime::docs::DocsCommand),
}

#[derive(Subcommand)]
enum DeadCommand {
    /// id, time, target, user, op, agent/seq, error. Never a password.
    Ls,
    /// Apply dead letters again now (all, or the ids given), in order with the user's newer
    /// changes: one older than what its target holds now is refused and kept, with the reason.
    /// (Consumer stopped: they go back to their retry queues for its next start.)
    Retry { ids: Vec<u64> },
    /// Delete dead letters (the ids given, or --all).
    Drop {
        ids: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum OwnerCommand {
    /// target, account (as the target folds names), source user.
    Ls {
        #[arg(long)]
        target: Option<String>,
    },
    /// Release the accounts USER holds at TARGET (after a re-map or a removal): the next user
    /// whose change applies there holds them.
    Release { user: String, target: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    pwsync_runtime::init_logging();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "pwsync-consumer: {}",
                pwsync_runtime::error_report(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<ConsumerConfig> {
    Ok(ConsumerConfig::load(path)?)
}

use pwsync_consumer::admin::AdminRequest;
use pwsync_consumer::audit::service::AuditCommand;
use pwsync_runtime::wall_time as time;

/// Asks the consumer of `cfg` over its admin socket; `Ok(false)` when none is running there.
fn ask_running(cfg: &ConsumerConfig, request: &AdminRequest, what: &str) -> anyhow::Result<bool> {
    let socket = cfg.state.dir.join(pwsync_runtime::admin::SOCKET_NAME);
    match pwsync_runtime::admin::call_printing(&socket, request, what) {
        Ok(()) => Ok(true),
        Err(pwsync_runtime::admin::AdminError::NotRunning(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Prints each line `f` says.
fn print_each(f: impl FnOnce(&mut dyn FnMut(String)) -> Result<(), String>) -> anyhow::Result<()> {
    f(&mut |line| println!("{line}")).map_err(anyhow::Error::msg)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Docs(d) => {
            d.run(Cli::command())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { dry_run } => {
            pwsync_runtime::harden_process();
            let cfg = load(&cli.config)?;
            pwsync_runtime::tokio_runtime()
                .context("starting the async runtime")?
                .block_on(run(cfg, &cli.config, dry_run))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let key = DecryptionKey::generate()?;
            key.save(&out.join("consumer.key"))?;
            key.encryption_key().save(&out.join("consumer.pub"))?;
            let group = SigningKey::generate()?;
            group.save(&out.join("group.key"))?;
            group.verifying_key().save(&out.join("group.pub"))?;
            println!(
                "wrote {0}/consumer.key (private, 0600), {0}/consumer.pub, {0}/group.key (private, 0600), {0}/group.pub\n\
                 consumer key id {1}\n\
                 consumer.pub goes to every agent (keys.consumer_public_key); consumer.key and group.key stay with\n\
                 the consumers of this group; group.pub goes to the relay ([groups.NAME] public_key).",
                out.display(),
                key.key_id().to_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let cfg = load(&cli.config)?;
            let checked = pwsync_consumer::admin::checked(&cfg, &cli.config)?;
            println!(
                "{}: OK (group {}, {} targets, a password policy of {} rules)",
                cli.config.display(),
                cfg.group,
                checked.targets.len(),
                checked.rules.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            let cfg = load(&cli.config)?;
            let socket = cfg.state.dir.join(pwsync_runtime::admin::SOCKET_NAME);
            pwsync_runtime::admin::ask_reload(
                &socket,
                &AdminRequest::Reload,
                "consumer",
                &cli.config,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { user, target, json } => {
            let cfg = load(&cli.config)?;
            let scope = pwsync_consumer::audit::Scope {
                users: user,
                targets: target,
            };
            for t in &scope.targets {
                if !cfg.targets.contains_key(t) {
                    anyhow::bail!(
                        "no target {t:?} in {} ([targets.{t}])",
                        cli.config.display()
                    );
                }
            }
            let request = AdminRequest::Audit {
                scope: scope.clone(),
                json,
            };
            if ask_running(&cfg, &request, "audit")? {
                return Ok(ExitCode::SUCCESS);
            }
            let state = State::open_existing(&cfg.state.dir)?;
            let view = state.audit_view()?;
            let targets = build_targets(&cfg, &cli.config)?;
            let mut bar: Option<indicatif::ProgressBar> = None;
            let report = pwsync_consumer::audit::run(
                &view,
                &targets,
                &scope,
                cfg.audit.reads_per_sec,
                &mut |done, total| {
                    bar.get_or_insert_with(|| pwsync_runtime::progress(total, "audit"))
                        .set_position(done)
                },
            );
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            drop(state);
            println!(
                "{}",
                pwsync_consumer::audit::service::printed(&report, json)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Owner { command } => {
            let cfg = load(&cli.config)?;
            let request = match &command {
                OwnerCommand::Ls { target } => AdminRequest::Owners {
                    target: target.clone(),
                },
                OwnerCommand::Release { user, target } => AdminRequest::ReleaseOwner {
                    user: user.clone(),
                    target: target.clone(),
                },
            };
            if !ask_running(&cfg, &request, "owners")? {
                let mut state = State::open_existing(&cfg.state.dir)?;
                print_each(|say| match command {
                    OwnerCommand::Ls { target } => {
                        pwsync_consumer::admin::list_owners(&mut state, target.as_deref(), say)
                    }
                    OwnerCommand::Release { user, target } => {
                        pwsync_consumer::admin::release_owner(&mut state, &user, &target, say)
                    }
                })?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { user } => {
            let cfg = load(&cli.config)?;
            let path = cfg.state.dir.join("status.json");
            let s = StatusReport::read(&path).map_err(anyhow::Error::msg)?;
            let age = wall_ms().saturating_sub(s.written_ms) / 1000;
            println!(
                "group {} committed offset {} (status {age}s old)",
                s.group, s.committed
            );
            let quarantined = s.counters.get("quarantined").copied().unwrap_or(0);
            if s.dead_letters > 0 || quarantined > 0 {
                println!(
                    "dead letters {} (`pwsync-consumer deadletter ls`), quarantined state records {quarantined}",
                    s.dead_letters
                );
            }
            match user {
                Some(u) => match s.users.get(&u) {
                    Some(m) => {
                        for (target, what) in m {
                            println!("{target}\t{what}");
                        }
                    }
                    None => println!(
                        "nothing done for {u} among the last {} users the consumer handled since it started",
                        pwsync_consumer::pipeline::STATUS_USERS
                    ),
                },
                None => {
                    for (name, t) in &s.targets {
                        let last = match &t.last_applied {
                            None => "-".to_string(),
                            Some(l) => format!(
                                "{} {} (agent {} seq {}) at {}",
                                l.op,
                                l.user,
                                l.agent,
                                l.seq,
                                time(l.time_ms)
                            ),
                        };
                        let unavailable = t
                            .unavailable
                            .as_ref()
                            .map(|why| format!("\tUNAVAILABLE: {why}"))
                            .unwrap_or_default();
                        println!(
                            "{name}\tapplied {}\tretry queue {}\tdead letters {}\tlast: {last}{unavailable}",
                            t.applied, t.retry_depth, t.dead_lettered
                        );
                    }
                    let counters: Vec<String> =
                        s.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    println!("counters: {}", counters.join(" "));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Deadletter { command } => {
            let cfg = load(&cli.config)?;
            let request = match &command {
                DeadCommand::Ls => AdminRequest::DeadLetters,
                DeadCommand::Retry { ids } => AdminRequest::RetryDeadLetters { ids: ids.clone() },
                DeadCommand::Drop { ids, all } => {
                    if ids.is_empty() && !all {
                        anyhow::bail!("give the ids to drop, or --all");
                    }
                    AdminRequest::DropDeadLetters {
                        ids: ids.clone(),
                        all: *all,
                    }
                }
            };
            if ask_running(&cfg, &request, "dead letters")? {
                return Ok(ExitCode::SUCCESS);
            }
            let mut state = State::open_existing(&cfg.state.dir)?;
            match command {
                DeadCommand::Ls => {
                    print_each(|say| pwsync_consumer::admin::list_dead_letters(&mut state, say))?
                }
                DeadCommand::Retry { ids } => {
                    drop(state);
                    println!("{}", pwsync_consumer::admin::offline::retry(&cfg, &ids)?);
                }
                DeadCommand::Drop { ids, all } => {
                    let mut n = 0;
                    for (id, _) in state.dead_letters()? {
                        if all || ids.contains(&id) {
                            state.remove_dead(id);
                            n += 1;
                        }
                    }
                    state.flush()?;
                    println!("dropped {n} dead letters");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run(cfg: ConsumerConfig, config_path: &Path, dry_run: bool) -> anyhow::Result<()> {
    let mut keys = Vec::new();
    for k in &cfg.keys.decryption_keys {
        keys.push(DecryptionKey::load(k)?);
    }
    let group_key = SigningKey::load(&cfg.keys.group_signing_key)?;
    let relay_key = VerifyingKey::load(&cfg.keys.relay_public_key)?;
    let targets = build_targets(&cfg, config_path)?;
    // A configuration error no retry can mend stops start-up; a target that is only down now
    // gets its changes later. (Targets block: checked off the async runtime.)
    std::thread::scope(|s| {
        s.spawn(|| pwsync_consumer::pipeline::check_targets(&targets))
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("checking the targets panicked")))
    })?;
    let state = State::open(&cfg.state.dir)?;
    let start_at = state.committed();
    let now_ms = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    // The readers block (ldap3 and kadm5 run their own runtimes): off the async runtime.
    let (sources, failed) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut sources = pwsync_consumer::policy::Sources::of(&targets);
            let failed = sources.refresh();
            (sources, failed)
        })
        .join()
    })
    .map_err(|_| anyhow::anyhow!("reading the targets' password rules panicked"))?;
    for (target, why) in failed {
        tracing::warn!(%target, error = %why, "cannot read the target system's password rules; its declared ones stand in until a later read");
    }
    let mut sources = sources;
    let make = |sources: &pwsync_consumer::policy::Sources| {
        pwsync_consumer::policy::rules(&cfg.group, &cfg.policy, sources).and_then(|rules| {
            pwsync_consumer::policy::current(&cfg.state.dir, &cfg.group, rules, now_ms)
        })
    };
    // What another system says must not stop the consumer: when its rules cannot make a policy
    // (a contradiction with a target's limit), the declared ones stand in, loudly.
    let policy = match make(&sources) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "the targets' systems' own rules cannot make a policy; their declared rules stand in");
            sources.forget_reads();
            make(&sources)
                .map_err(anyhow::Error::msg)
                .context("the group's password policy")?
        }
    };
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(policy);
    let mut refresher = pwsync_consumer::policy::keep_refreshing(
        sources,
        cfg.group.clone(),
        cfg.policy.clone(),
        cfg.state.dir.clone(),
        policy_tx.clone(),
    )?;
    let unsealer = Arc::new(Unsealer::new(&cfg, Opener::new(keys), relay_key)?);
    let pipeline = Pipeline::new(&cfg, state, unsealer.clone(), targets, dry_run)?;
    let (delivery_tx, delivery_rx) = std::sync::mpsc::channel();
    let (command_tx, command_rx) = std::sync::mpsc::channel();
    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel();
    let thread = pipeline_thread(
        pipeline,
        unsealer,
        delivery_rx,
        command_rx,
        report_tx,
        cfg.state.dir.join("status.json"),
        dry_run,
    )?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let transport = cfg.transport();
    let mut each = Vec::new();
    for (host, port) in cfg
        .endpoints()
        .map_err(|e| anyhow::anyhow!("[broker] {e}"))?
    {
        let mut options = pwsync_runtime::mqtt_options(&cfg.client_id(), &host, port, 512);
        transport.apply(&mut options).context("[transport]")?;
        each.push(options);
    }
    let relays = pwsync_runtime::failover::Failover::new(each);
    transport.log_mode(&relays.describe());
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(listen) = cfg.metrics.listen {
        let (connected, status) = (connected.clone(), cfg.state.dir.join("status.json"));
        pwsync_runtime::observe::serve(listen, Arc::new(move || health(&connected, &status)));
    }
    let mqtt = MqttSide {
        connected,
        relays,
        group: cfg.group.clone(),
        key: group_key,
        policy: policy_rx,
        state_dir: cfg.state.dir.clone(),
    };
    let (reloads, mut reload_rx) =
        pwsync_runtime::admin::ReloadRequests::start("consumer").context("handling SIGHUP")?;
    let socket = cfg.state.dir.join(pwsync_runtime::admin::SOCKET_NAME);
    let listener = pwsync_runtime::admin::bind(&socket)
        .with_context(|| format!("listening on the admin socket {}", socket.display()))?;
    let commands = command_tx.clone();
    let to_pipeline = command_tx.clone();
    let audits = pwsync_consumer::audit::service::spawn(
        cfg.audit.clone(),
        build_targets(&cfg, config_path)?,
        move || pwsync_consumer::service::audit_view(&to_pipeline),
        cfg.state.dir.clone(),
    )
    .context("starting the audit thread")?;
    let audit_reloads = audits.clone();
    let audits = std::sync::Mutex::new(audits);
    pwsync_runtime::admin::serve(listener, move |request: AdminRequest, reply: Reply| {
        if let AdminRequest::Reload = request {
            reloads.ask(reply);
        } else if let AdminRequest::Audit { scope, json } = request {
            let asked = pwsync_consumer::audit::service::Asked { scope, json, reply };
            let sent = audits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send(AuditCommand::Run(asked));
            if let Err(std::sync::mpsc::SendError(AuditCommand::Run(a))) = sent {
                a.reply
                    .end(Err("the consumer's audit thread has stopped".into()));
            }
        } else if let Err(e) = commands.send(PipelineCommand::Admin(request, reply)) {
            if let PipelineCommand::Admin(_, reply) = e.0 {
                reply.end(Err("the consumer's pipeline has stopped".into()));
            }
        }
    });
    tracing::info!(group = %cfg.group, committed = start_at.0, dry_run, "consumer ready");
    let side = tokio::spawn(mqtt.run(delivery_tx, report_rx, start_at, stop_rx));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut running = cfg;
    loop {
        let reply = tokio::select! {
            _ = &mut shutdown => break,
            _ = async { while !thread.is_finished() { tokio::time::sleep(Duration::from_millis(200)).await; } } => {
                anyhow::bail!("the pipeline stopped (see the log above)");
            }
            Some(reply) = reload_rx.recv() => reply,
        };
        let live = Live {
            config_path,
            commands: &command_tx,
            policy: &policy_tx,
            audits: &audit_reloads,
        };
        let result = reload(live, &mut running, &mut refresher).await;
        pwsync_runtime::admin::report_reload(config_path, result, reply);
    }
    let _ = stop_tx.send(true);
    let _ = side.await;
    drop(refresher);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
}

/// What a reload swaps into the running consumer.
struct Live<'a> {
    config_path: &'a Path,
    commands: &'a std::sync::mpsc::Sender<PipelineCommand>,
    policy: &'a tokio::sync::watch::Sender<pwsync_proto::policy::PasswordPolicy>,
    audits: &'a std::sync::mpsc::Sender<AuditCommand>,
}

/// Reads the config again and, when it passes `check` and changes nothing that needs a
/// restart, swaps its targets and rules into the pipeline (between two deliveries) and its
/// policy rules into the refresher. Says what changed, or why nothing did.
async fn reload(
    live: Live<'_>,
    running: &mut ConsumerConfig,
    refresher: &mut pwsync_consumer::policy::Refresher,
) -> Result<String, String> {
    let kept = "the running config stays";
    let new = ConsumerConfig::load(live.config_path)
        .map_err(|e| format!("{}; {kept}", pwsync_runtime::error_report(&e)))?;
    if let Some(section) = pwsync_consumer::admin::needs_restart(running, &new) {
        return Err(format!(
            "{section} changed, which takes a restart of the consumer (systemctl restart pwsync-consumer); nothing was reloaded, {kept}"
        ));
    }
    let path = live.config_path.to_path_buf();
    let (new, checked) = tokio::task::spawn_blocking(move || {
        let checked = pwsync_consumer::admin::checked(&new, &path);
        (new, checked)
    })
    .await
    .map_err(|_| format!("checking the new config panicked; {kept}"))?;
    let checked =
        checked.map_err(|e| format!("the new config does not pass `check`: {e:#}; {kept}"))?;
    // The account audit reads the targets over connections of its own: built now, before
    // anything is swapped, so a reload is whole or nothing.
    let audit_targets = build_targets(&new, live.config_path)
        .map_err(|e| format!("the account audit's targets: {e:#}; {kept}"))?;
    let policy = pwsync_consumer::policy::current(
        &new.state.dir,
        &new.group,
        checked.rules.clone(),
        wall_ms(),
    )
    .map_err(|e| format!("its password policy: {e}; {kept}"))?;
    let before: Vec<String> = running.targets.keys().cloned().collect();
    let after: Vec<String> = new.targets.keys().cloned().collect();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    live.commands
        .send(PipelineCommand::Reconfigure {
            cfg: Box::new(new),
            targets: checked.targets,
            done: done_tx,
        })
        .map_err(|_| format!("the pipeline has stopped; {kept}"))?;
    let (new, swapped) = done_rx
        .await
        .map_err(|_| format!("the pipeline stopped during the reload; {kept}"))?;
    swapped.map_err(|e| format!("{e}; {kept}"))?;
    *refresher = pwsync_consumer::policy::keep_refreshing(
        checked.sources,
        new.group.clone(),
        new.policy.clone(),
        new.state.dir.clone(),
        live.policy.clone(),
    )
    .map_err(|e| {
        format!("the targets were reloaded, but the policy refresher could not restart: {e}")
    })?;
    if policy.version != live.policy.borrow().version {
        let _ = live.policy.send(policy);
    }
    let audit = AuditCommand::Reconfigure {
        cfg: new.audit.clone(),
        targets: audit_targets,
    };
    if live.audits.send(audit).is_err() {
        tracing::error!(
            "the account audit thread has stopped; audits need a restart of the consumer"
        );
    }
    *running = *new;
    let added: Vec<&String> = after.iter().filter(|t| !before.contains(t)).collect();
    let removed: Vec<&String> = before.iter().filter(|t| !after.contains(t)).collect();
    Ok(format!(
        "{} targets (added {added:?}, removed {removed:?}), {} policy rules",
        after.len(),
        checked.rules.len()
    ))
}

/// Healthy while subscribed at the relay and no target is holding changes for a retry.
fn health(
    connected: &std::sync::atomic::AtomicBool,
    status: &Path,
) -> Vec<pwsync_runtime::observe::Check> {
    use pwsync_runtime::observe::Check;
    let subscribed = connected.load(std::sync::atomic::Ordering::Relaxed);
    let mut checks = vec![Check::new(
        "relay",
        subscribed,
        if subscribed {
            "subscribed"
        } else {
            "not connected to the relay"
        },
    )];
    match StatusReport::read(status) {
        Ok(report) => checks.extend(report.target_checks()),
        Err(e) => checks.push(Check::new("status", false, e)),
    }
    checks
}
