//! `pwsync-relay`: the command line. Every command takes `--config FILE`
//! (default `/etc/pwsync/relay.toml`).

use anyhow::Context;
use clap::{Parser, Subcommand};
use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::runtime::shutdown_signal;
use pwsync_proto::{GroupName, SigningKey};
use pwsync_relay::config::{RelayConfig, DEFAULT_PATH};
use pwsync_relay::journal::Journal;
use pwsync_relay::service::{Rejection, Relay};
use pwsync_relay::{broker, inspect};
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
    /// Validate the config: keys readable and of the right mode, groups' keys present.
    Check,
    /// Generate the relay's Ed25519 signing keypair: DIR/relay.key (0600) and DIR/relay.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// A whole pwsync on this machine: keys, configs and an htpasswd target in DIR, then the
    /// relay, a consumer and an agent in the foreground until Ctrl-C.
    Quickstart {
        #[arg(long)]
        dir: PathBuf,
        /// Only write the setup; start nothing.
        #[arg(long)]
        no_start: bool,
    },
    /// Offline journal tools (the relay must be stopped).
    Journal {
        /// The journal folder (default: journal.dir from --config).
        #[arg(long, global = true)]
        journal: Option<PathBuf>,
        #[command(subcommand)]
        command: JournalCommand,
    },
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
    pwsync_proto::runtime::init_logging();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "pwsync-relay: {}",
                pwsync_proto::runtime::error_report(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<RelayConfig> {
    Ok(RelayConfig::load(path)?)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run => {
            let cfg = load(&cli.config)?;
            pwsync_proto::runtime::tokio_runtime()
                .context("starting the async runtime")?
                .block_on(run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let cfg = load(&cli.config)?;
            let key = SigningKey::load(&cfg.keys.signing_key)?;
            for (name, g) in &cfg.groups {
                pwsync_proto::VerifyingKey::load(&g.public_key)
                    .with_context(|| format!("group {name}"))?;
            }
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
        Command::Quickstart { dir, no_start } => {
            pwsync_relay::quickstart::run(&dir, !no_start)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let key = SigningKey::generate()?;
            key.save(&out.join("relay.key"))?;
            key.verifying_key().save(&out.join("relay.pub"))?;
            println!(
                "wrote {0}/relay.key (private, 0600) and {0}/relay.pub\nGive relay.pub to every agent and consumer (keys.relay_public_key).",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal { journal, command } => {
            let cfg = load(&cli.config);
            let dir = match (journal, &cfg) {
                (Some(d), _) => d,
                (None, Ok(c)) => c.journal.dir.clone(),
                (None, Err(e)) => {
                    anyhow::bail!("no --journal given and the config is unusable: {e}")
                }
            };
            let j = Journal::open_existing(&dir)?;
            let mut out = std::io::stdout().lock();
            match command {
                JournalCommand::Ls => inspect::ls(&j, &mut out)?,
                JournalCommand::Stats => inspect::stats(&j, &mut out)?,
                JournalCommand::Groups => {
                    let declared: Vec<GroupName> = cfg
                        .as_ref()
                        .map(|c| c.groups.keys().cloned().collect())
                        .unwrap_or_default();
                    if declared.is_empty() {
                        anyhow::bail!("no groups declared (groups come from --config)");
                    }
                    inspect::groups(&j, &declared, &mut out)?;
                }
                JournalCommand::Import { file } => {
                    let cfg = cfg.map_err(|e| {
                        anyhow::anyhow!(
                            "import checks signatures against keys.agents_dir from the config: {e}"
                        )
                    })?;
                    let tally = inspect::import(
                        &j,
                        &AgentDirectory::new(&cfg.keys.agents_dir),
                        &file,
                        &mut out,
                    )?;
                    if tally.refused > 0 {
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run(cfg: RelayConfig) -> anyhow::Result<()> {
    let signing = SigningKey::load(&cfg.keys.signing_key)?;
    let journal = Arc::new(Journal::open(&cfg.journal.dir)?);
    if let Some(listen) = cfg.broker.listen {
        broker::start(
            listen,
            cfg.broker.max_segment_size,
            cfg.broker.max_segment_count,
            cfg.broker.max_connections,
        )?;
        tracing::info!(%listen, "embedded MQTT broker listening");
    }
    let relay = Relay::new(&cfg, journal.clone(), signing)?;
    let counters = relay.counters.clone();
    let stats = journal.stats()?;
    tracing::info!(
        journal = %cfg.journal.dir.display(), records = stats.records, groups = cfg.groups.len(),
        "relay ready"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopper = tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    relay.run(&cfg, stop_rx).await?;
    stopper.abort();
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
        "relay stopped"
    );
    Ok(())
}
