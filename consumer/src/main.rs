//! `pwsync-consumer`: the command line. Every command takes `--config FILE`
//! (default `/etc/pwsync/consumer.toml`).

#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use pwsync_consumer::build_targets;
use pwsync_consumer::config::{ConsumerConfig, DEFAULT_PATH};
use pwsync_consumer::pipeline::{Pipeline, StatusReport};
use pwsync_consumer::service::{pipeline_thread, MqttSide};
use pwsync_consumer::state::State;
use pwsync_proto::hlc::wall_ms;
use pwsync_proto::{DecryptionKey, Opener, SigningKey, VerifyingKey};
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
    /// Changes that failed for good (consumer stopped).
    Deadletter {
        #[command(subcommand)]
        command: DeadCommand,
    },
    #[command(flatten)]
    Docs(pwsync_runtime::docs::DocsCommand),
}

#[derive(Subcommand)]
enum DeadCommand {
    /// id, time, target, user, op, agent/seq, error. Never a password.
    Ls,
    /// Put dead letters back in their target's retry queue (all, or the ids given).
    Retry { ids: Vec<u64> },
    /// Delete dead letters (the ids given, or --all).
    Drop {
        ids: Vec<u64>,
        #[arg(long)]
        all: bool,
    },
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

fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
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
            for k in &cfg.keys.decryption_keys {
                DecryptionKey::load(k)?;
            }
            SigningKey::load(&cfg.keys.group_signing_key)?;
            VerifyingKey::load(&cfg.keys.relay_public_key)?;
            cfg.transport().validate()?;
            let targets = build_targets(&cfg, &cli.config)?;
            if targets.is_empty() {
                anyhow::bail!("no [targets.NAME] sections: this consumer would apply nothing");
            }
            for t in &targets {
                t.target
                    .check()
                    .map_err(|e| anyhow::anyhow!("target {}: {e}", t.name))?;
                if let Some((a, b, account)) = t.map_collisions().into_iter().next() {
                    anyhow::bail!(
                        "target {}: users {a:?} and {b:?} would both change account {account:?} (the target takes the names for one); map them apart",
                        t.name
                    );
                }
            }
            let mut sources = pwsync_consumer::policy::Sources::of(&targets);
            if let Some((target, why)) = sources.refresh().into_iter().next() {
                anyhow::bail!("target {target}: reading its system's password rules: {why}");
            }
            let rules = pwsync_consumer::policy::rules(&cfg.group, &cfg.policy, &sources)
                .map_err(anyhow::Error::msg)?;
            if let Some(why) = pwsync_consumer::policy::unsatisfiable(&cfg.group, &rules) {
                anyhow::bail!(why);
            }
            println!(
                "{}: OK (group {}, {} targets, a password policy of {} rules)",
                cli.config.display(),
                cfg.group,
                targets.len(),
                rules.len()
            );
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
            let mut state = State::open_existing(&cfg.state.dir)?;
            let dead = state.dead_letters()?;
            match command {
                DeadCommand::Ls => {
                    for (id, d) in &dead {
                        let op = if d.target == pwsync_consumer::pipeline::ALL_TARGETS {
                            "(not opened)".to_string()
                        } else {
                            d.op.to_string()
                        };
                        let (t, u, a, s, e) = (&d.target, &d.user, &d.agent, d.seq, &d.error);
                        println!(
                            "{id}\t{}\t{t}\t{u}\t{op}\t{a} seq {s}\t{e}",
                            time(d.time_ms)
                        );
                    }
                }
                DeadCommand::Retry { ids } => {
                    let target_names: Vec<String> = cfg.targets.keys().cloned().collect();
                    let n = state.requeue_dead(&ids, &target_names, wall_ms())?;
                    println!("{n} dead letters back in their retry queues; the consumer applies them when it runs");
                }
                DeadCommand::Drop { ids, all } => {
                    if ids.is_empty() && !all {
                        anyhow::bail!("give the ids to drop, or --all");
                    }
                    let mut n = 0;
                    for (id, _) in dead.iter().filter(|(id, _)| all || ids.contains(id)) {
                        state.remove_dead(*id);
                        n += 1;
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
    let refresher = pwsync_consumer::policy::keep_refreshing(
        sources,
        cfg.group.clone(),
        cfg.policy.clone(),
        cfg.state.dir.clone(),
        policy_tx,
    )?;
    let pipeline = Pipeline::new(&cfg, state, Opener::new(keys), relay_key, targets, dry_run)?;
    let (delivery_tx, delivery_rx) = std::sync::mpsc::channel();
    let (report_tx, report_rx) = tokio::sync::mpsc::unbounded_channel();
    let thread = pipeline_thread(
        pipeline,
        delivery_rx,
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
        client_id: cfg.client_id(),
        group: cfg.group.clone(),
        key: group_key,
        policy: policy_rx,
        state_dir: cfg.state.dir.clone(),
    };
    tracing::info!(group = %cfg.group, committed = start_at.0, dry_run, "consumer ready");
    let side = tokio::spawn(mqtt.run(delivery_tx, report_rx, start_at, stop_rx));
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = async { while !thread.is_finished() { tokio::time::sleep(Duration::from_millis(200)).await; } } => {
            anyhow::bail!("the pipeline stopped (see the log above)");
        }
    }
    let _ = stop_tx.send(true);
    let _ = side.await;
    drop(refresher);
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
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
