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

fn installed() -> bool {
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
            let conf = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\nhttp: 127.0.0.1:{http}\njetstream {{\n  store_dir: \"{}\"\n  max_memory_store: 64MB\n  max_file_store: 512MB\n}}\n{cluster}",
                    store.display()
                ),
            )
            .expect("nats config");
            let log = dir.path().join(format!("{name}.log"));
            let daemon = Daemon::start(
                &name,
                PathBuf::from(NATS_SERVER),
                &["-c", &conf.display().to_string()],
                log,
            );
            nodes.push(NatsNode {
                name,
                client_port: *client,
                http_port: *http,
                daemon,
            });
        }
        let c = NatsCluster { dir, nodes };
        for i in 0..n {
            c.wait_healthy(i, Duration::from_secs(30));
        }
        Some(c)
    }

    /// `nats://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// A relay's `[journal.jetstream]` section for this cluster.
    pub fn journal_section(&self, replicas: usize) -> String {
        let servers = self
            .urls()
            .iter()
            .map(|u| format!("{u:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[journal.jetstream]\nservers = [{servers}]\nreplicas = {replicas}\ntimeout_secs = 2\n"
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

    /// Every node's log, for a failing test's output.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("---- {} ----\n{}", n.name, n.daemon.log_text()))
            .collect()
    }
}
