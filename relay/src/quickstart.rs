//! `pwsync-relay quickstart --dir DIR [--no-start]`: a whole pwsync on one machine, for a first
//! look. Writes into DIR everything a single-machine setup needs (keys with the right modes,
//! `relay.toml`, `consumer.toml`, `agent.toml` on a free loopback port, an htpasswd target at
//! `DIR/htpasswd`) and, unless `--no-start`, runs the three daemons in the foreground with their
//! logs prefixed by name until Ctrl-C. Running it again on the same DIR reuses what is there.
//!
//! Secure by default, like a real installation: a private CA (`tls/ca.pem`, its key 0600) signs
//! the relay's certificate for 127.0.0.1, and the agent and the consumer are enrolled with
//! logins of their own, so even this first setup runs with TLS and per-client topic rules.

use crate::credentials::Identity;
use anyhow::Context;
use pwsync_proto::{AgentId, DecryptionKey, GroupName, SigningKey};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The names the quickstart uses.
const AGENT: &str = "quickstart-agent";
const GROUP: &str = "local";

fn keypair(dir: &Path, name: &str) -> anyhow::Result<()> {
    let private = dir.join(format!("{name}.key"));
    if !private.exists() {
        let k = SigningKey::generate()?;
        k.save(&private)?;
        k.verifying_key().save(&dir.join(format!("{name}.pub")))?;
    }
    Ok(())
}

fn write_new(path: &Path, text: &str) -> anyhow::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes (or completes) the setup in `dir`; returns the MQTT port in use.
pub fn prepare(dir: &Path) -> anyhow::Result<u16> {
    std::fs::create_dir_all(dir.join("keys/agents"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let keys = dir.join("keys");
    keypair(&keys, "relay")?;
    keypair(&keys, "group")?;
    keypair(&keys, "agent")?;
    if !keys.join("consumer.key").exists() {
        let k = DecryptionKey::generate()?;
        k.save(&keys.join("consumer.key"))?;
        k.encryption_key().save(&keys.join("consumer.pub"))?;
    }
    let enrolled = keys.join(format!("agents/{AGENT}.pub"));
    if !enrolled.exists() {
        std::fs::copy(keys.join("agent.pub"), &enrolled)?;
    }
    let tls = dir.join("tls");
    std::fs::create_dir_all(&tls)?;
    if !tls.join("ca.pem").exists() {
        let ca = crate::pki::Ca::generate("pwsync quickstart CA")?;
        let server = ca.issue_server(&["127.0.0.1", "localhost"])?;
        crate::pki::write_private(&tls.join("ca.key"), &ca.key_pem)?;
        crate::pki::write_private(&tls.join("relay.key"), &server.key_pem)?;
        std::fs::write(tls.join("relay.pem"), &server.cert_pem)?;
        std::fs::write(tls.join("ca.pem"), &ca.cert_pem)?;
    }
    let credentials = dir.join("credentials.toml");
    for (identity, token) in [
        (
            Identity::Agent(AgentId::new(AGENT)?),
            keys.join("agent-mqtt.pw"),
        ),
        (
            Identity::Consumer(GroupName::new(GROUP)?),
            keys.join("consumer-mqtt.pw"),
        ),
    ] {
        if !token.exists() {
            let t = crate::credentials::enroll(&credentials, &identity)?;
            crate::pki::write_private(&token, &t)?;
        }
    }
    let relay_toml = dir.join("relay.toml");
    let port = match std::fs::read_to_string(&relay_toml) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
            .and_then(|rest| rest.trim_end_matches('"').parse().ok())
            .context(
                "relay.toml exists but has no listen = \"127.0.0.1:PORT\"; remove it to start over",
            )?,
        Err(_) => free_port()?,
    };
    write_new(
        &relay_toml,
        &format!(
            "# Written by pwsync-relay quickstart. Every key is documented in deploy/relay.toml.\n\
             [broker]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"tls/relay.pem\"\ntls_key = \"tls/relay.key\"\n\
             credentials = \"credentials.toml\"\n\n\
             [keys]\nsigning_key = \"keys/relay.key\"\nagents_dir = \"keys/agents\"\n\n\
             [journal]\ndir = \"journal\"\n\n\
             [groups.{GROUP}]\npublic_key = \"keys/group.pub\"\n"
        ),
    )?;
    write_new(
        &dir.join("consumer.toml"),
        &format!(
            "# Written by pwsync-relay quickstart. Every key is documented in deploy/consumer.toml.\n\
             group = \"{GROUP}\"\n\n\
             [keys]\ndecryption_keys = [\"keys/consumer.key\"]\ngroup_signing_key = \"keys/group.key\"\n\
             relay_public_key = \"keys/relay.pub\"\nagents_dir = \"keys/agents\"\n\n\
             [broker]\nhost = \"127.0.0.1\"\nport = {port}\n\n\
             [transport]\nca_file = \"tls/ca.pem\"\nusername = \"consumer:{GROUP}\"\npassword_file = \"keys/consumer-mqtt.pw\"\n\n\
             [state]\ndir = \"consumer-state\"\n\n\
             [targets.htpasswd]\ntype = \"htpasswd\"\nsystem = \"quickstart-htpasswd\"\npath = \"htpasswd\"\n"
        ),
    )?;
    write_new(
        &dir.join("agent.toml"),
        &format!(
            "# Written by pwsync-relay quickstart. Every key is documented in deploy/agent.toml.\n\
             agent_id = \"{AGENT}\"\norigin = \"quickstart-host\"\n\n\
             [keys]\nsigning_key = \"keys/agent.key\"\nconsumer_public_key = \"keys/consumer.pub\"\n\
             relay_public_key = \"keys/relay.pub\"\n\n\
             [socket]\npath = \"agent.sock\"\nmode = 0o600\n\n\
             [spool]\ndir = \"spool\"\n\n\
             [scope]\nexclude = [\"root\"]\n\n\
             [relay]\nhost = \"127.0.0.1\"\nport = {port}\n\n\
             [transport]\nca_file = \"tls/ca.pem\"\nusername = \"agent:{AGENT}\"\npassword_file = \"keys/agent-mqtt.pw\"\n\n\
             # The consumer group's password policy, checked before a password is taken (a\n\
             # password the htpasswd target's bcrypt cannot hold is refused with the reason).\n\
             [policy]\ngroups = {{ {GROUP} = \"keys/group.pub\" }}\n"
        ),
    )?;
    Ok(port)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        anyhow::bail!(
            "{} not found next to {}: build all three programs first (cargo build --release --bins)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

/// Starts `program --config DIR/<name>.toml run`, its output prefixed with `[name]`.
fn spawn(program: PathBuf, name: &'static str, config: &Path) -> anyhow::Result<Child> {
    let mut child = Command::new(&program)
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[{name:8}] {line}");
            }
        });
    }
    Ok(child)
}

/// Prepares `dir` and, if `start`, runs the three daemons until Ctrl-C.
pub fn run(dir: &Path, start: bool) -> anyhow::Result<()> {
    let port = prepare(dir)?;
    let dir = dir.canonicalize()?;
    let d = dir.display();
    let bin = std::env::current_exe()?
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    println!(
        "pwsync quickstart in {d} (MQTT over TLS on 127.0.0.1:{port}, private CA in {d}/tls)\n\n\
         Submit a change (the password is read from stdin, never from the command line):\n  \
         printf 'correct horse\\n' | {bin}/pwsync-agent submit --config {d}/agent.toml --user alice\n\n\
         See it arrive in the consumer's htpasswd file (htpasswd is in Debian's apache2-utils):\n  \
         htpasswd -vb {d}/htpasswd alice 'correct horse'\n\n\
         The consumer's password policy reaches the agent a few seconds after start (until then a\n\
         submit reads \"password policy unavailable; try again later\"); a password the target\n\
         cannot hold is then refused with the reason, before anything is set:\n  \
         {bin}/pwsync-agent policy --config {d}/agent.toml\n  \
         printf '%s\\n' \"$(printf 'x%.0s' $(seq 80))\" | {bin}/pwsync-agent check-password --config {d}/agent.toml --user alice\n\n\
         Look inside:\n  \
         {bin}/pwsync-agent status --config {d}/agent.toml\n  \
         {bin}/pwsync-consumer status --config {d}/consumer.toml\n\n\
         Each daemon can also run alone: {bin}/pwsync-{{relay,consumer,agent}} run --config {d}/<name>.toml\n"
    );
    if !start {
        return Ok(());
    }
    let relay = spawn(std::env::current_exe()?, "relay", &dir.join("relay.toml"))?;
    let mut children = vec![relay];
    // The relay's broker must listen before the others connect (they would retry anyway).
    crate::broker::wait_listening(
        ([127, 0, 0, 1], port).into(),
        std::time::Duration::from_secs(10),
    );
    children.push(spawn(
        sibling("pwsync-consumer")?,
        "consumer",
        &dir.join("consumer.toml"),
    )?);
    children.push(spawn(
        sibling("pwsync-agent")?,
        "agent",
        &dir.join("agent.toml"),
    )?);
    println!("running; Ctrl-C stops all three\n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = pwsync_runtime::shutdown_signal() => break,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                    if children.iter_mut().any(|c| matches!(c.try_wait(), Ok(Some(_)))) {
                        eprintln!("a daemon exited; stopping the others (see its log above)");
                        break;
                    }
                }
            }
        }
    });
    for c in children.iter_mut().rev() {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    for mut c in children {
        let _ = c.wait();
    }
    Ok(())
}
