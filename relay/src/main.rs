//! `pwsync-relay`: the command line. Every command takes `--config FILE`
//! (default `/etc/pwsync/relay.toml`).

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use pwsync_proto::agents::AgentDirectory;
use pwsync_proto::{AgentId, GroupName, SigningKey};
use pwsync_relay::config::{RelayConfig, DEFAULT_PATH};
use pwsync_relay::credentials::{Credentials, Identity};
use pwsync_relay::gateway::tls_acceptor;
use pwsync_relay::journal::Journal;
use pwsync_relay::reload::AdminRequest;
use pwsync_relay::{enrol, inspect};
use pwsync_runtime::mqtt_options;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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
                .block_on(pwsync_relay::daemon::run(cfg, &cli.config))?;
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
