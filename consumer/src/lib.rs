//! pwsync-consumer: replays changes from the relay into the systems that must be kept in step.
//!
//! [`service`] receives deliveries and publishes commits; [`unseal`] verifies and opens them
//! ahead of the [`pipeline`], which orders, deduplicates and routes each change to its
//! [`target`]s; [`state`] keeps the cursor, the dedupe and ordering state, retry queues and dead
//! letters durable; [`audit`] tells whose password a target no longer holds as pwsync wrote it.

#![forbid(unsafe_code)]

pub mod admin;
pub mod audit;
pub mod config;
pub mod decide;
pub mod pipeline;
pub mod policy;
pub mod service;
pub mod state;
pub mod targets;
pub mod unseal;

use config::ConsumerConfig;
use targets::Configured;

/// Builds every configured target (in name order).
pub fn build_targets(
    cfg: &ConsumerConfig,
    config_path: &std::path::Path,
) -> anyhow::Result<Vec<Configured>> {
    cfg.targets
        .iter()
        .map(|(name, section)| {
            targets::build(name, section.clone(), config_path).map_err(anyhow::Error::msg)
        })
        .collect()
}
