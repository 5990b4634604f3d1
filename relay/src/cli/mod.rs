//! `pwsync-relay`'s command line: the commands, and which module does each. `main.rs` only
//! parses and reports; `run` is [`crate::daemon`]; the others are here, one module per kind of
//! work: [`check`] (validate a config as `run` would load it), [`logins`] (keys, enrolment, revocation,
//! the agents' table), [`journal`] (the journal tools).

pub mod check;
pub mod journal;
pub mod logins;

use crate::config::{RelayConfig, DEFAULT_PATH};
use crate::reload::AdminRequest;
use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use journal::JournalCommand;
pub use logins::Who;

#[derive(Parser)]
#[command(
    name = "pwsync-relay",
    version,
    about = "pwsync relay: broker, durable journal and delivery to consumer groups"
)]
pub struct Cli {
    #[arg(long, global = true, default_value = DEFAULT_PATH)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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

/// Loads the relay config at `path`.
pub fn load(path: &Path) -> anyhow::Result<RelayConfig> {
    Ok(RelayConfig::load(path)?)
}

/// Does what `cli` asks.
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = cli.config.as_path();
    match cli.command {
        Command::Docs(d) => {
            d.run(Cli::command())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            pwsync_runtime::harden_process();
            let cfg = load(config)?;
            pwsync_runtime::tokio_runtime()
                .context("starting the async runtime")?
                .block_on(crate::daemon::run(cfg, config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            let cfg = load(config)?;
            let socket = cfg.journal.dir.join(pwsync_runtime::admin::SOCKET_NAME);
            pwsync_runtime::admin::ask_reload(&socket, &AdminRequest::Reload, "relay", config)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => check::check(config),
        Command::Enroll {
            who,
            out,
            public_key,
            scope,
            valid_days,
            keygen,
        } => logins::enroll(
            config,
            logins::EnrollArgs {
                who,
                out,
                public_key,
                scope,
                valid_days,
                keygen,
            },
        ),
        Command::Revoke { entry } => logins::revoke(config, &entry),
        Command::Unenroll { who } => logins::unenroll(config, &who),
        Command::Agents => logins::agents(config),
        Command::Keygen { out, enrolment } => logins::keygen(&out, enrolment),
        Command::Quickstart {
            dir,
            no_start,
            nats,
            relays,
        } => {
            let shape = crate::quickstart::Shape { relays, nats };
            crate::quickstart::run(&dir, !no_start, shape)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Journal { journal, command } => journal::run(config, journal, command),
    }
}
