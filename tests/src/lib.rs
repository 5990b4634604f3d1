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
