//! `pwsync-agent`: the command line. Every command takes `--config FILE`
//! (default `/etc/pwsync/agent.toml`). Passwords are never taken from argv: `submit` reads them
//! from stdin (one value per line) or prompts without echo on a terminal.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use pwsync_agent::api::{Request, Response};
use pwsync_agent::config::{AgentConfig, DEFAULT_PATH};
use pwsync_agent::spool::Spool;
use pwsync_agent::{client, daemon, inspect};
use pwsync_proto::{Op, Secret, Seq, SigningKey, VerifyingKey};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(
    name = "pwsync-agent",
    version,
    about = "pwsync edge agent: captures password changes and forwards them durably to the relay"
)]
struct Cli {
    /// Config file.
    #[arg(long, global = true, default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent daemon.
    Run,
    /// Submit one change; the password is read from stdin (one value per line) or prompted for.
    Submit {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "replace")]
        op: Op,
        /// An attribute passed through to targets, KEY=VALUE (repeatable). Never a password.
        #[arg(long = "attr", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
        /// The person's own change (a replace): the password being replaced comes first (the
        /// first line of stdin, or a prompt), then the new one. Targets that apply a change as
        /// the person made it (AD's user-change form) need it.
        #[arg(long)]
        previous: bool,
        /// Seconds to wait for the agent's answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Show the running agent's state: connection, spool depth and age, last ack, counters.
    Status,
    /// Generate this agent's Ed25519 signing keypair: DIR/agent.key (0600) and DIR/agent.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Validate the config: keys readable and of the right mode, patterns compile.
    Check,
    /// Capture on a Samba AD domain controller: run `samba-tool user syncpasswords` (the
    /// `[samba]` section) with this program as its script, and start it again whenever it stops.
    SambaSync,
    /// Capture on OpenLDAP: serve slapd's sock overlay (the `[ldap_sock]` section), keeping each
    /// password change pending until slapd's result confirms it, then handing it to the agent.
    LdapSock,
    /// Show the password policy in force: each group's version, age and rules, and where each
    /// rule came from (the `[policy]` section's groups; read from the agent's kept copies).
    Policy,
    /// Would a password pass the policy for --user? The password is read from stdin (or
    /// prompted for). Exit 0 when it would, 1 (with the reason) when not.
    CheckPassword {
        #[arg(long)]
        user: String,
    },
    /// Make the running agent read its config again (as SIGHUP does): `[scope]` and `[policy]`
    /// are taken without a restart; a config that does not load, or changes anything else, is
    /// refused and the running one stays.
    Reload,
    /// Inspect an agent's spool: through the running agent, or on the folder (or a copy of
    /// one) when it is stopped.
    Spool {
        /// The spool folder (default: spool.dir from --config).
        #[arg(long, global = true)]
        spool: Option<PathBuf>,
        #[command(subcommand)]
        command: SpoolCommand,
    },
    #[command(flatten)]
    Docs(pwsync_runtime::docs::DocsCommand),
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// One line per record: seq, time accepted, size, resends, key id, hlc.
    Ls,
    /// Everything known about one record (never a password: it is sealed).
    Show { seq: u64 },
    /// Counts, bytes, oldest record.
    Stats,
    /// Check that every record decodes and its signature verifies; exit 1 if any is bad.
    /// (Like every spool command, through the running agent, or on the folder when it is
    /// stopped.)
    Verify {
        /// The agent's public key (default: derived from keys.signing_key in --config).
        #[arg(long)]
        agent_key: Option<PathBuf>,
    },
    /// Write every readable record to FILE for `pwsync-relay journal import`.
    Export { file: PathBuf },
}

fn main() -> ExitCode {
    // samba-tool runs its --script with no arguments: that call, with the variable set, is the
    // Samba hook.
    if std::env::args_os().len() == 1 {
        if let Some(config) = std::env::var_os(pwsync_agent::sources::samba::HOOK_ENV) {
            return samba_hook(Path::new(&config));
        }
    }
    let cli = Cli::parse();
    pwsync_runtime::init_logging();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pwsync-agent: {}", pwsync_runtime::error_report(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn load(path: &Path) -> anyhow::Result<AgentConfig> {
    Ok(AgentConfig::load(path)?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    pwsync_runtime::tokio_runtime().context("starting the async runtime")
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
            runtime()?.block_on(daemon::run(cfg, &cli.config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit {
            user,
            op,
            attributes,
            previous,
            timeout,
        } => submit(&cli.config, user, op, attributes, previous, timeout),
        Command::Status => status(&cli.config),
        Command::Reload => {
            let cfg = load(&cli.config)?;
            let socket = cfg.spool.dir.join(pwsync_runtime::admin::SOCKET_NAME);
            pwsync_runtime::admin::ask_reload(
                &socket,
                &daemon::AdminRequest::Reload,
                "agent",
                &cli.config,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let key = SigningKey::generate()?;
            key.save(&out.join("agent.key"))?;
            key.verifying_key().save(&out.join("agent.pub"))?;
            println!(
                "wrote {}/agent.key (private, 0600) and {}/agent.pub\nkey id {}\n\
                 Give agent.pub to the relay and the consumers (their agents directory), named <agent id>.pub.",
                out.display(),
                out.display(),
                key.verifying_key().key_id().to_hex()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let cfg = load(&cli.config)?;
            let key = SigningKey::load(&cfg.keys.signing_key)?;
            pwsync_proto::EncryptionKey::load(&cfg.keys.consumer_public_key)?;
            VerifyingKey::load(&cfg.keys.relay_public_key)?;
            cfg.transport().validate()?;
            if let Some(g) = &cfg.socket.group {
                pwsync_agent::unix_users::group_id(g).map_err(anyhow::Error::msg)?;
            }
            for user in &cfg.socket.committers {
                pwsync_agent::unix_users::user_id(user)
                    .map_err(anyhow::Error::msg)
                    .context("[socket] committers")?;
            }
            if let Some(s) = &cfg.ldap_sock {
                pwsync_agent::unix_users::user_id(&s.slapd_user)
                    .map_err(anyhow::Error::msg)
                    .context("[ldap_sock] slapd_user: name the user slapd runs as")?;
            }
            if let Some(p) = &cfg.policy {
                for (group, key) in &p.groups {
                    VerifyingKey::load(key).with_context(|| format!("[policy] groups.{group}"))?;
                }
            }
            if let Some(warning) = cfg.policy_warning() {
                eprintln!("warning: {warning}");
            }
            println!(
                "{}: OK (agent {}, key {}, relay {})",
                cli.config.display(),
                cfg.agent_id,
                key.verifying_key().key_id(),
                cfg.relay
                    .endpoints()
                    .unwrap_or_default()
                    .iter()
                    .map(|(h, p)| format!("{h}:{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Spool { spool, command } => spool_tool(&cli.config, spool, command),
        Command::Policy => {
            let (cfg, policies) = policies(&cli.config)?;
            let now = wall_ms();
            println!(
                "stale after {} s; undeniable while unavailable: {}",
                cfg.max_age_secs,
                cfg.undeniable.join(", ")
            );
            for (group, held) in policies.held() {
                let Some(p) = held else {
                    println!("group {group}: none received (unavailable)");
                    continue;
                };
                let age = now.saturating_sub(p.published_ms) / 1000;
                println!(
                    "group {group}: version {}, made {}, published {age} s ago{}",
                    p.version,
                    pwsync_runtime::wall_time(p.issued_ms),
                    if age > cfg.max_age_secs {
                        " (STALE: unavailable)"
                    } else {
                        ""
                    }
                );
                for r in &p.rules {
                    println!("  {:<40} from {}", r.rule.describe(), r.source_shown());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckPassword { user } => {
            let (_, policies) = policies(&cli.config)?;
            let (_, values) = read_values(false)?;
            let [password] = values.as_slice() else {
                anyhow::bail!("give one password (one line on stdin)");
            };
            match policies.check(&user, password.expose(), wall_ms()) {
                pwsync_agent::policy::Verdict::Pass => {
                    println!("passes");
                    Ok(ExitCode::SUCCESS)
                }
                pwsync_agent::policy::Verdict::Refused(why) => {
                    println!("refused: {why}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::SambaSync => {
            let cfg = load(&cli.config)?;
            let samba = cfg.samba.clone().with_context(|| {
                format!(
                    "{} has no [samba] section (smb_conf, state_dir, gnupg_home)",
                    cli.config.display()
                )
            })?;
            runtime()?.block_on(pwsync_agent::sources::samba::supervise(&cli.config, &samba))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::LdapSock => {
            let cfg = load(&cli.config)?;
            let sock = cfg.ldap_sock.clone().with_context(|| {
                format!(
                    "{} has no [ldap_sock] section (socket, state_dir, url)",
                    cli.config.display()
                )
            })?;
            pwsync_agent::sources::ldapsock::serve(sock, &cfg.socket.path)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The largest object the Samba hook reads; a larger one is answered as not synchronised.
const MAX_OBJECT_BYTES: u64 = 1 << 20;

/// The Samba hook: one object's LDIF on stdin; `DONE-EXIT: …` on stdout once its changes are
/// durable, else the error (samba-tool stops, and resumes from its cache when started again).
fn samba_hook(config: &Path) -> ExitCode {
    let run = || -> anyhow::Result<String> {
        let cfg = load(config)?;
        let samba = cfg
            .samba
            .as_ref()
            .with_context(|| format!("{} has no [samba] section", config.display()))?;
        let mut input = Zeroizing::new(Vec::with_capacity(4096));
        let mut stdin = std::io::stdin();
        (&mut stdin)
            .take(MAX_OBJECT_BYTES + 1)
            .read_to_end(&mut input)
            .context("reading the object's LDIF from stdin")?;
        if input.len() as u64 > MAX_OBJECT_BYTES {
            // Read the rest (so samba-tool is not cut off mid-write) and go on without it.
            let _ = std::io::copy(&mut stdin, &mut std::io::sink());
            input.truncate(0);
            return Ok(pwsync_agent::sources::samba::oversize(&samba.state_dir)?);
        }
        Ok(pwsync_agent::sources::samba::hook(
            &cfg.socket.path,
            &samba.state_dir,
            &input,
        )?)
    };
    // samba-tool reads one line: nothing in it may start another.
    let one_line = |s: String| s.replace(['\n', '\r'], " ");
    match run() {
        Ok(line) => {
            println!("{}", one_line(line));
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!(
                "pwsync-agent samba hook: {}",
                one_line(pwsync_runtime::error_report(e.as_ref()))
            );
            ExitCode::FAILURE
        }
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The `[policy]` section and the policies the agent keeps (what the daemon enforces).
fn policies(
    config: &Path,
) -> anyhow::Result<(
    pwsync_agent::policy::PolicyConfig,
    pwsync_agent::policy::Policies,
)> {
    let cfg = load(config)?;
    let p = cfg.policy.clone().with_context(|| {
        format!(
            "{} has no [policy] section: no password policy is enforced here",
            config.display()
        )
    })?;
    let policies = pwsync_agent::policy::Policies::open(Some(&p), &cfg.spool.dir.join("policy"))
        .map_err(anyhow::Error::msg)?;
    Ok((p, policies))
}

/// Reads password values: a no-echo prompt on a terminal, else one value per line of stdin.
/// With `previous`, the password being replaced comes first (its own prompt, or the first line).
fn read_values(previous: bool) -> anyhow::Result<(Option<Secret>, Vec<Secret>)> {
    if std::io::stdin().is_terminal() {
        let old = if previous {
            let old = Zeroizing::new(rpassword::prompt_password("Current password: ")?);
            Some(Secret::new(old.as_bytes().to_vec()))
        } else {
            None
        };
        let first = Zeroizing::new(rpassword::prompt_password("New password: ")?);
        let again = Zeroizing::new(rpassword::prompt_password("Again: ")?);
        if *first != *again {
            anyhow::bail!("the two entries differ; nothing submitted");
        }
        return Ok((old, vec![Secret::new(first.as_bytes().to_vec())]));
    }
    let mut input = Zeroizing::new(Vec::with_capacity(8192));
    std::io::stdin()
        .take(pwsync_agent::api::MAX_FRAME_BYTES as u64)
        .read_to_end(&mut input)
        .context("reading the password from stdin")?;
    let mut values: Vec<Secret> = input
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(|line| Secret::new(line.to_vec()))
        .collect();
    let old = if previous && !values.is_empty() {
        Some(values.remove(0))
    } else {
        None
    };
    if values.is_empty() {
        anyhow::bail!(if previous {
            "expected the current password on the first line of stdin, then the new one"
        } else {
            "no password on stdin (expected one value per line)"
        });
    }
    Ok((old, values))
}

fn submit(
    config: &Path,
    user: String,
    op: Op,
    attrs: Vec<String>,
    previous: bool,
    timeout: u64,
) -> anyhow::Result<ExitCode> {
    if previous && op != Op::Replace {
        anyhow::bail!("--previous goes with --op replace only (a person's own password change)");
    }
    let cfg = load(config)?;
    let mut attributes = BTreeMap::new();
    for a in attrs {
        let (k, v) = a
            .split_once('=')
            .with_context(|| format!("--attr {a:?} is not KEY=VALUE"))?;
        attributes.insert(k.to_string(), v.to_string());
    }
    let (previous, values) = if op.carries_values() {
        read_values(previous)?
    } else {
        (None, vec![])
    };
    let req = Request::Submit {
        user: user.clone(),
        op,
        values,
        attributes,
        previous,
    };
    let resp = runtime()?.block_on(client::request(
        &cfg.socket.path,
        &req,
        Duration::from_secs(timeout),
    ))?;
    Ok(match resp {
        Response::Accepted { seq, durable: true } => {
            println!("accepted: {op} for {user} is durable as seq {seq}");
            ExitCode::SUCCESS
        }
        Response::Accepted { durable: false, .. } => {
            eprintln!("accepted WITHOUT durability (lenient mode): {op} for {user} was not spooled and will not be forwarded; see the agent's log");
            ExitCode::from(4)
        }
        Response::Ignored { reason } => {
            eprintln!("ignored: {reason}");
            ExitCode::from(3)
        }
        Response::Rejected { reason } => {
            eprintln!("rejected: {reason}");
            ExitCode::FAILURE
        }
        Response::Unavailable { reason } => {
            eprintln!("not taken, try again later: {reason}");
            ExitCode::FAILURE
        }
        Response::Error { message } => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
        other => {
            eprintln!("unexpected answer from the agent: {other:?}");
            ExitCode::FAILURE
        }
    })
}

fn status(config: &Path) -> anyhow::Result<ExitCode> {
    let cfg = load(config)?;
    let resp = runtime()?.block_on(client::request(
        &cfg.socket.path,
        &Request::Status,
        Duration::from_secs(10),
    ))?;
    let Response::Status(s) = resp else {
        anyhow::bail!("unexpected answer from the agent: {resp:?}");
    };
    let age = |v: Option<u64>| v.map(|s| format!("{s}s ago")).unwrap_or_else(|| "-".into());
    println!("agent:        {} ({} mode)", s.agent_id, s.mode);
    println!(
        "relay:        {}",
        if s.connected {
            "connected"
        } else {
            "NOT connected"
        }
    );
    println!(
        "spool:        {} records, {} of {} bytes",
        s.spool_records, s.spool_bytes, s.spool_max_bytes
    );
    println!(
        "oldest:       {}",
        s.oldest_age_secs
            .map(|a| format!("accepted {a}s ago"))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "last ack:     seq {} ({})",
        s.last_acked_seq,
        age(s.last_ack_age_secs)
    );
    println!("next seq:     {}", s.next_seq);
    println!(
        "since start:  {} accepted, {} rejected, {} ignored",
        s.accepted, s.rejected, s.ignored
    );
    if s.quarantined > 0 {
        println!(
            "quarantined:  {} unreadable records (see `pwsync-agent spool ls`)",
            s.quarantined
        );
    }
    // What the capture sources beside this agent could not carry (their status files).
    let read_json = |path: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    };
    if let Some(sock) = &cfg.ldap_sock {
        if let Some(v) = read_json(sock.state_dir.join("ldap-sock-status.json")) {
            let users = v["not_synchronised_since_ms"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (user, since) in &users {
                let since = since
                    .as_u64()
                    .map_or_else(|| "?".to_string(), pwsync_runtime::wall_time);
                println!(
                    "ldap-sock:    {} NOT synchronised since {since} (its change went through the directory; set the password again)",
                    pwsync_proto::Untrusted(user)
                );
            }
        }
    }
    if let Some(samba) = &cfg.samba {
        if let Some(n) = read_json(samba.state_dir.join("samba-hook-status.json"))
            .and_then(|v| v["refused_objects"].as_u64())
        {
            println!("samba hook:   {n} objects NOT synchronised (samba-tool's log names them)");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn spool_tool(
    config: &Path,
    dir: Option<PathBuf>,
    command: SpoolCommand,
) -> anyhow::Result<ExitCode> {
    let cfg = if dir.is_none() || matches!(command, SpoolCommand::Verify { agent_key: None }) {
        match load(config) {
            Ok(c) => Some(c),
            Err(e) if dir.is_none() => {
                return Err(e.context("no --spool given, so the spool folder comes from the config"))
            }
            Err(_) => None,
        }
    } else {
        None
    };
    let dir = match (dir, &cfg) {
        (Some(d), _) => d,
        (None, Some(c)) => c.spool.dir.clone(),
        (None, None) => anyhow::bail!("give --spool DIR or --config FILE"),
    };
    // The running agent answers through its admin socket; a stopped one's spool is opened here.
    let request = match &command {
        SpoolCommand::Ls => inspect::SpoolRequest::Ls,
        SpoolCommand::Show { seq } => inspect::SpoolRequest::Show { seq: *seq },
        SpoolCommand::Stats => inspect::SpoolRequest::Stats,
        SpoolCommand::Verify { agent_key } => inspect::SpoolRequest::Verify {
            agent_key: agent_key.as_deref().map(std::path::absolute).transpose()?,
        },
        SpoolCommand::Export { file } => inspect::SpoolRequest::Export {
            file: std::path::absolute(file)?,
        },
    };
    let socket = dir.join(pwsync_runtime::admin::SOCKET_NAME);
    let request = daemon::AdminRequest::Spool(request);
    match pwsync_runtime::admin::call_printing(&socket, &request, "spool") {
        Ok(()) => return Ok(ExitCode::SUCCESS),
        Err(pwsync_runtime::admin::AdminError::NotRunning(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let spool = Spool::open_existing(&dir)?;
    let mut out = std::io::stdout().lock();
    match command {
        SpoolCommand::Ls => inspect::ls(&spool, &mut out)?,
        SpoolCommand::Show { seq } => inspect::show(&spool, Seq(seq), &mut out)?,
        SpoolCommand::Stats => inspect::stats(&spool, &mut out)?,
        SpoolCommand::Verify { agent_key } => {
            let key = match (agent_key, &cfg) {
                (Some(p), _) => Some(VerifyingKey::load(&p)?),
                (None, Some(c)) => Some(SigningKey::load(&c.keys.signing_key)?.verifying_key()),
                (None, None) => None,
            };
            if inspect::verify(&spool, key.as_ref(), &mut out)? > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        SpoolCommand::Export { file } => {
            inspect::export(&spool, &file, &mut out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
