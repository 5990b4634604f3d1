//! A NATS JetStream cluster of the test's own (Debian's `nats-server`): N nodes on loopback
//! ports in a temp dir, each a [`Daemon`] that a test can kill, stop (SIGSTOP) and start again.
//! The recipe is the one checked in the design repo's TEST-SERVERS.md.

use crate::process::{free_port, wait_for, Daemon};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

pub struct NatsNode {
    pub name: String,
    pub client_port: u16,
    pub http_port: u16,
    pub daemon: Daemon,
}

pub struct NatsCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NatsNode>,
}

pub fn installed() -> bool {
    let ok = Path::new(NATS_SERVER).exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not installed (scripts/install-deps.sh installs it)"
        );
        eprintln!("skipped: nats-server is not installed");
    }
    ok
}

impl NatsCluster {
    /// Starts `n` clustered nodes (1 or more) and waits until every one reports healthy;
    /// `None` (outside CI) when nats-server is not installed.
    pub fn start(n: usize) -> Option<NatsCluster> {
        if !installed() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("pwsync-nats")
            .tempdir()
            .expect("temp dir");
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let routes = ports
            .iter()
            .map(|(_, _, r)| format!("    nats-route://127.0.0.1:{r}"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut nodes = Vec::new();
        for (i, (client, http, route)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let cluster = if n > 1 {
                format!("cluster {{\n  name: c1\n  listen: 127.0.0.1:{route}\n  routes: [\n{routes}\n  ]\n}}\n")
            } else {
                String::new()
            };
            let text = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\njetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 512MB\n}}\n{cluster}",
                store.display()
            );
            nodes.push(start_node(dir.path(), name, &text, *client, *http));
        }
        Some(NatsCluster::healthy_cluster(dir, nodes))
    }

    /// The cluster once every node reports healthy.
    fn healthy_cluster(dir: tempfile::TempDir, nodes: Vec<NatsNode>) -> NatsCluster {
        let c = NatsCluster { dir, nodes };
        for i in 0..c.nodes.len() {
            c.wait_healthy(i, Duration::from_secs(30));
        }
        c
    }

    /// Starts `n` nodes from a config like deploy/ha/nats-server.conf (node `nats1`, client
    /// port 4222, routes to `natsK.example.org:6222`, files under /etc/nats/tls and
    /// /var/lib/nats), rewritten for loopback and a temp dir: TLS for clients and routes from a
    /// CA of the cluster's own (`tls/ca.pem`), and the relays' login with `password`. `None`
    /// (outside CI) when nats-server is not installed.
    pub fn start_from(template: &str, n: usize, password: &str) -> Option<NatsCluster> {
        if !installed() {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("pwsync-nats")
            .tempdir()
            .expect("temp dir");
        let tls = dir.path().join("tls");
        std::fs::create_dir_all(&tls).expect("mkdir");
        let ca = pwsync_relay::pki::Ca::generate("pwsync test NATS CA").expect("CA");
        let peer = ca.issue_peer(&["127.0.0.1"]).expect("certificate");
        std::fs::write(tls.join("ca.pem"), &ca.cert_pem).expect("ca");
        std::fs::write(tls.join("nats.pem"), &peer.cert_pem).expect("cert");
        pwsync_relay::pki::write_private(&tls.join("nats.key"), &peer.key_pem).expect("key");
        let hash = bcrypt::hash(password, 4).expect("bcrypt");
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let mut nodes = Vec::new();
        for (i, (client, http, route)) in ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let mut text = template
                .replace("server_name: nats1", &format!("server_name: {name}"))
                .replace(
                    "listen: 0.0.0.0:4222",
                    &format!("listen: 127.0.0.1:{client}"),
                )
                .replace("http: 127.0.0.1:8222", &format!("http: 127.0.0.1:{http}"))
                .replace(
                    "listen: 0.0.0.0:6222",
                    &format!("listen: 127.0.0.1:{route}"),
                )
                .replace("/etc/nats/tls/", &format!("{}/", tls.display()))
                .replace("/var/lib/nats", &store.display().to_string());
            let placeholder = text
                .lines()
                .find(|l| l.contains("REPLACE.WITH.THE.BCRYPT.HASH"))
                .map(str::to_string)
                .expect("the example's password placeholder");
            text = text.replace(&placeholder, &format!("      password: \"{hash}\""));
            for (k, (_, _, r)) in ports.iter().enumerate() {
                text = text.replace(
                    &format!("nats-route://nats{}.example.org:6222", k + 1),
                    &format!("nats-route://127.0.0.1:{r}"),
                );
            }
            // Routes of the example beyond this cluster's size.
            text = text
                .lines()
                .filter(|l| !l.contains(".example.org"))
                .collect::<Vec<_>>()
                .join("\n");
            nodes.push(start_node(dir.path(), name, &text, *client, *http));
        }
        Some(NatsCluster::healthy_cluster(dir, nodes))
    }

    /// `nats://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// A relay's `[journal.jetstream]` section for this cluster, on the stream `PWSYNC`.
    pub fn journal_section(&self, replicas: usize) -> String {
        self.journal_section_on("PWSYNC", replicas)
    }

    /// [`NatsCluster::journal_section`] on the stream `stream` (one installation each).
    pub fn journal_section_on(&self, stream: &str, replicas: usize) -> String {
        let servers = self
            .urls()
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[journal.jetstream]\nservers = [{servers}]\nstream = \"{stream}\"\nreplicas = {replicas}\ntimeout_secs = 2\n"
        )
    }

    /// Whether node `i` answers 200 on /healthz.
    pub fn healthy(&self, i: usize) -> bool {
        crate::scrape::get(self.nodes[i].http_port, "/healthz").0 == 200
    }

    pub fn wait_healthy(&self, i: usize, timeout: Duration) {
        let ok = wait_for(timeout, || self.healthy(i));
        assert!(
            ok,
            "NATS node {} did not become healthy; its log:\n{}",
            self.nodes[i].name,
            self.nodes[i].daemon.log_text()
        );
    }

    /// The node that leads stream `stream`, as node `i` sees it (its monitor's
    /// `/jsz?accounts=true&streams=true`); `None` when it knows no leader or does not answer.
    pub fn stream_leader_seen_by(&self, i: usize, stream: &str) -> Option<String> {
        let (code, body) =
            crate::scrape::get(self.nodes[i].http_port, "/jsz?accounts=true&streams=true");
        if code != 200 {
            return None;
        }
        let page: serde_json::Value = serde_json::from_str(&body).ok()?;
        page.get("account_details")?
            .as_array()?
            .iter()
            .filter_map(|a| a.get("stream_detail")?.as_array())
            .flatten()
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(stream))?
            .get("cluster")?
            .get("leader")?
            .as_str()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
    }

    /// The index of the node that leads stream `stream`, as the first node that knows says.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let name = (0..self.nodes.len()).find_map(|i| self.stream_leader_seen_by(i, stream))?;
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Every node's log, for a failing test's output.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("---- {} ----\n{}", n.name, n.daemon.log_text()))
            .collect()
    }
}

/// Writes node `name`'s config `text` in `dir` and starts it.
fn start_node(dir: &Path, name: String, text: &str, client_port: u16, http_port: u16) -> NatsNode {
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(&conf, text).expect("nats config");
    let daemon = Daemon::start(
        &name,
        PathBuf::from(NATS_SERVER),
        &["-c", &conf.display().to_string()],
        dir.join(format!("{name}.log")),
    );
    NatsNode {
        name,
        client_port,
        http_port,
        daemon,
    }
}
