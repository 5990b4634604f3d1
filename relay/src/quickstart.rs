//! `pwsync-relay quickstart --dir DIR [--no-start]`: a whole pwsync on one machine, for a first
//! look. Writes into DIR everything a single-machine setup needs (keys with the right modes,
//! `relay.toml`, `consumer.toml`, `agent.toml` on a free loopback port, an htpasswd target at
//! `DIR/htpasswd`) and, unless `--no-start`, runs the three daemons in the foreground with their
//! logs prefixed by name until Ctrl-C. Running it again on the same DIR reuses what is there.
//!
//! With `--nats` it is the high-availability set instead, on one machine for trying it: three
//! `nats-server` nodes (Debian's `nats-server`, JetStream on, a cluster on loopback, the relays'
//! login), `--relays N` relays in front of their journal (`relay.toml`, `relay2.toml`, …, each
//! with its own MQTT and metrics port and its own folder, the keys and logins shared as the HA
//! guide says to copy them), and the agent and the consumer listing every relay.
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

/// The shape of a quickstart: how many relays, and whether they share a NATS journal.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub relays: usize,
    pub nats: bool,
}

/// The NATS nodes of an HA quickstart.
const NATS_NODES: usize = 3;

/// The port in `key = "127.0.0.1:PORT"` (or `key: 127.0.0.1:PORT`) of an existing file's text.
fn port_in(text: &str, key: &str) -> Option<u16> {
    text.lines().find_map(|l| {
        let rest = l.trim().strip_prefix(key)?;
        let rest = rest.trim_start_matches([' ', '=', ':', '"']);
        rest.strip_prefix("127.0.0.1:")?
            .trim_end_matches('"')
            .parse()
            .ok()
    })
}

/// A port kept in `path` when it exists (a second run), else a free one.
fn kept_port(path: &Path, key: &str) -> anyhow::Result<u16> {
    match std::fs::read_to_string(path) {
        Ok(text) => port_in(&text, key).with_context(|| {
            format!(
                "{} exists but has no {key} 127.0.0.1:PORT; remove the folder to start over",
                path.display()
            )
        }),
        Err(_) => free_port(),
    }
}

/// The config file of relay `i` (0-based): `relay.toml`, `relay2.toml`, …
fn relay_toml(dir: &Path, i: usize) -> PathBuf {
    match i {
        0 => dir.join("relay.toml"),
        i => dir.join(format!("relay{}.toml", i + 1)),
    }
}

/// Writes the NATS nodes' configs (loopback, JetStream, one cluster, the relays' login from
/// `keys/nats.pw`); returns each node's config, client port and monitor port.
fn prepare_nats(dir: &Path) -> anyhow::Result<Vec<NatsNode>> {
    let nats = dir.join("nats");
    std::fs::create_dir_all(&nats)?;
    let password = dir.join("keys/nats.pw");
    if !password.exists() {
        crate::pki::write_private(&password, &crate::credentials::random_token()?)?;
    }
    let password = std::fs::read_to_string(&password)?.trim().to_string();
    let mut ports = Vec::new();
    for i in 1..=NATS_NODES {
        let conf = nats.join(format!("n{i}.conf"));
        ports.push((
            conf.clone(),
            kept_port(&conf, "listen")?,
            kept_port(&conf, "http")?,
            kept_port(&conf, "# cluster_listen")?,
        ));
    }
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, _, _, r)| format!("nats-route://127.0.0.1:{r}"))
        .collect();
    for (i, (conf, client, http, route)) in ports.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let text = format!(
            "# Written by pwsync-relay quickstart --nats: node {name} of a three-node JetStream cluster on
             # loopback, for trying; deploy/ha/nats-server.conf is the real one (TLS, a bcrypt hash).
             server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{http}
             jetstream {{
  store_dir: {store:?}
  max_memory_store: 64MB
  max_file_store: 1GB
}}
             # cluster_listen: 127.0.0.1:{route}
             cluster {{
  name: pwsync-quickstart
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
             authorization {{
  user: pwsync-relay
  password: {password:?}
}}
",
            store = nats.join(&name).display().to_string(),
            routes = routes.join(", "),
        );
        if write_new(conf, &text)? {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(conf, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(ports
        .into_iter()
        .map(|(config, client, http, _)| NatsNode {
            config,
            client,
            http,
        })
        .collect())
}

/// One NATS node of an HA quickstart.
pub struct NatsNode {
    pub config: PathBuf,
    pub client: u16,
    pub http: u16,
}

/// What [`prepare_shaped`] set up: each relay's MQTT port and each NATS node's config and
/// client port.
pub struct Prepared {
    pub relays: Vec<u16>,
    pub nats: Vec<NatsNode>,
}

/// Writes (or completes) the setup of `shape` in `dir`.
pub fn prepare_shaped(dir: &Path, shape: Shape) -> anyhow::Result<Prepared> {
    if shape.relays > 1 && !shape.nats {
        anyhow::bail!("--relays {} needs --nats: several relays share one journal, kept by a NATS JetStream cluster", shape.relays);
    }
    if !(1..=9).contains(&shape.relays) {
        anyhow::bail!("--relays takes 1 to 9");
    }
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
    if let Ok(text) = std::fs::read_to_string(dir.join("relay.toml")) {
        let has_nats = text.contains("[journal.jetstream]");
        let relays = (0..).take_while(|i| relay_toml(dir, *i).exists()).count();
        if has_nats != shape.nats || relays != shape.relays {
            anyhow::bail!(
                "{} holds a quickstart of another shape ({relays} relays{}); use another --dir, or remove this one to start over",
                dir.display(),
                if has_nats { ", NATS" } else { "" }
            );
        }
    }
    let nats = if shape.nats {
        prepare_nats(dir)?
    } else {
        vec![]
    };
    let jetstream = if shape.nats {
        let servers: Vec<String> = nats
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.client))
            .collect();
        format!(
            "\n[journal.jetstream]\nservers = [{}]\nstream = \"PWSYNC\"\nreplicas = {NATS_NODES}\nuser = \"pwsync-relay\"\npassword_file = \"keys/nats.pw\"\n",
            servers.join(", ")
        )
    } else {
        String::new()
    };
    let mut ports = Vec::new();
    for i in 0..shape.relays {
        let path = relay_toml(dir, i);
        let port = kept_port(&path, "listen")?;
        // One relay keeps the default metrics port; each further one needs its own.
        let metrics = if i == 0 {
            String::new()
        } else {
            // (An existing file is kept as it is, its port with it.)
            format!("\n[metrics]\nlisten = \"127.0.0.1:{}\"\n", free_port()?)
        };
        let journal = match i {
            0 => "journal".to_string(),
            i => format!("journal{}", i + 1),
        };
        write_new(
            &path,
            &format!(
                "# Written by pwsync-relay quickstart. Every key is documented in deploy/relay.toml.\n\
                 [broker]\nlisten = \"127.0.0.1:{port}\"\ntls_cert = \"tls/relay.pem\"\ntls_key = \"tls/relay.key\"\n\
                 credentials = \"credentials.toml\"\n\n\
                 [keys]\nsigning_key = \"keys/relay.key\"\nagents_dir = \"keys/agents\"\n\n\
                 [journal]\ndir = \"{journal}\"\n{jetstream}{metrics}\n\
                 [groups.{GROUP}]\npublic_key = \"keys/group.pub\"\n"
            ),
        )?;
        ports.push(port);
    }
    let port = ports[0];
    let endpoints = if shape.relays > 1 {
        let list: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
        format!("endpoints = [{}]", list.join(", "))
    } else {
        format!("host = \"127.0.0.1\"\nport = {port}")
    };
    write_new(
        &dir.join("consumer.toml"),
        &format!(
            "# Written by pwsync-relay quickstart. Every key is documented in deploy/consumer.toml.\n\
             group = \"{GROUP}\"\n\n\
             [keys]\ndecryption_keys = [\"keys/consumer.key\"]\ngroup_signing_key = \"keys/group.key\"\n\
             relay_public_key = \"keys/relay.pub\"\nagents_dir = \"keys/agents\"\n\n\
             [broker]\n{endpoints}\n\n\
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
             [relay]\n{endpoints}\n\n\
             [transport]\nca_file = \"tls/ca.pem\"\nusername = \"agent:{AGENT}\"\npassword_file = \"keys/agent-mqtt.pw\"\n\n\
             # The consumer group's password policy, checked before a password is taken (a\n\
             # password the htpasswd target's bcrypt cannot hold is refused with the reason).\n\
             [policy]\ngroups = {{ {GROUP} = \"keys/group.pub\" }}\n"
        ),
    )?;
    Ok(Prepared {
        relays: ports,
        nats,
    })
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
fn spawn(program: PathBuf, name: &str, config: &Path) -> anyhow::Result<Child> {
    spawn_with(
        program,
        name,
        &["--config".as_ref(), config.as_os_str(), "run".as_ref()],
    )
}

/// Starts `program args…`, its output prefixed with `[name]`.
fn spawn_with(program: PathBuf, name: &str, args: &[&std::ffi::OsStr]) -> anyhow::Result<Child> {
    let name = name.to_string();
    let mut child = Command::new(&program)
        .args(args)
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
        let name = name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[{name:8}] {line}");
            }
        });
    }
    Ok(child)
}

/// `nats-server` on the PATH (or Debian's /usr/sbin).
fn nats_server() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
        .context("nats-server not found: install it (apt-get install nats-server) for --nats")
}

/// Whether a NATS node's monitor answers 200 on /healthz (its JetStream is ready).
fn nats_healthy(http: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", http)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

/// Prepares `dir` and, if `start`, runs the daemons until Ctrl-C.
pub fn run(dir: &Path, start: bool, shape: Shape) -> anyhow::Result<()> {
    let prepared = prepare_shaped(dir, shape)?;
    let port = prepared.relays[0];
    let dir = dir.canonicalize()?;
    let d = dir.display();
    let bin = std::env::current_exe()?
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let ports: Vec<String> = prepared.relays.iter().map(|p| p.to_string()).collect();
    let what = if shape.nats {
        format!(
            "pwsync HA quickstart in {d}: {} relays (MQTT over TLS on 127.0.0.1:{}) in front of a\n\
             three-node NATS JetStream cluster ({d}/nats); the agent and the consumer list every relay.\n\
             Stop a relay (kill PID, the pids are shown once all run) and the changes go on through the other.",
            shape.relays,
            ports.join(", 127.0.0.1:")
        )
    } else {
        format!(
            "pwsync quickstart in {d} (MQTT over TLS on 127.0.0.1:{port}, private CA in {d}/tls)"
        )
    };
    println!(
        "{what}\n\n\
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
         {bin}/pwsync-consumer status --config {d}/consumer.toml\n  \
         {bin}/pwsync-relay journal stats --config {d}/relay.toml\n\n\
         Each daemon can also run alone: {bin}/pwsync-{{relay,consumer,agent}} run --config {d}/<name>.toml\n"
    );
    if !start {
        return Ok(());
    }
    let mut children = Vec::new();
    let mut relay_pids = Vec::new();
    if shape.nats {
        let nats = nats_server()?;
        for (i, node) in prepared.nats.iter().enumerate() {
            children.push(spawn_with(
                nats.clone(),
                &format!("nats{}", i + 1),
                &["-c".as_ref(), node.config.as_os_str()],
            )?);
        }
        // The relays need a JetStream leader to create or find their streams.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !prepared.nats.iter().all(|n| nats_healthy(n.http)) {
            if std::time::Instant::now() > deadline {
                for c in children.iter_mut() {
                    let _ = c.kill();
                }
                anyhow::bail!(
                    "the NATS nodes did not become healthy within 30 s (see their logs above)"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    for (i, port) in prepared.relays.iter().enumerate() {
        let name = match i {
            0 => "relay".to_string(),
            i => format!("relay{}", i + 1),
        };
        let relay = spawn(std::env::current_exe()?, &name, &relay_toml(&dir, i))?;
        relay_pids.push(format!("{name} pid {}", relay.id()));
        children.push(relay);
        // The relay's broker must listen before the others connect (they would retry anyway).
        crate::broker::wait_listening(
            ([127, 0, 0, 1], *port).into(),
            std::time::Duration::from_secs(10),
        );
    }
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
    println!(
        "running ({}); Ctrl-C stops them all\n",
        relay_pids.join(", ")
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // In the HA set a NATS node or a relay may be lost (trying that is what it is for): the
    // others go on while a relay is left. Otherwise any daemon's exit stops them all.
    let losable = if shape.nats {
        prepared.nats.len() + prepared.relays.len()
    } else {
        0
    };
    let relays = prepared.nats.len()..losable;
    let mut lost = vec![false; children.len()];
    rt.block_on(async {
        loop {
            tokio::select! {
                _ = pwsync_runtime::shutdown_signal() => break,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                    let mut stop = false;
                    for (i, c) in children.iter_mut().enumerate() {
                        if lost[i] || !matches!(c.try_wait(), Ok(Some(_))) {
                            continue;
                        }
                        lost[i] = true;
                        if i < losable {
                            eprintln!("pid {} exited; the others go on (see its log above)", c.id());
                        } else {
                            stop = true;
                        }
                    }
                    if stop || (losable > 0 && relays.clone().all(|i| lost[i])) {
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
