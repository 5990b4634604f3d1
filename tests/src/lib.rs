//! The end-to-end test harness: starts the real `pwsync-*` binaries as processes on loopback
//! ports in a temp dir, with freshly generated keys and configs, and kills, restarts and
//! inspects them the way an operator would.
//!
//! The binaries are the ones `cargo test --workspace` builds next to the test executables
//! (`target/<profile>/pwsync-*`). Every wait is bounded and fails with what it was waiting for.

pub mod cluster;
pub mod group_client;
pub mod pg;
pub mod probe;
pub mod process;
pub mod slapd;

pub use cluster::Cluster;
pub use group_client::GroupClient;
pub use process::{bin, free_port, wait_until, Daemon};

/// A consumer's target section for most tests: the htpasswd file `htpasswd` in the consumer's
/// folder, bcrypt cost 4 (fast).
pub const HT_TARGET: &str =
    "[targets.web]\ntype = \"htpasswd\"\nsystem = \"web\"\npath = \"htpasswd\"\ncost = 4\n";

/// `htpasswd -vb FILE USER PASSWORD` (apache2-utils): the check a user of the file would make.
pub fn htpasswd_verifies(file: &std::path::Path, user: &str, password: &str) -> bool {
    file.exists()
        && std::process::Command::new("htpasswd")
            .args(["-vb", &file.display().to_string(), user, password])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

/// `envelope` as an agent publishes it: a batch of one.
pub fn batch_of(envelope: Vec<u8>) -> Vec<u8> {
    let mut b = pwsync_proto::batch::Batch::default();
    b.push(envelope);
    b.take_encoded()
}
