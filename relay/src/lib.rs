//! pwsync-relay: the central piece. It embeds the MQTT broker ([`broker`]), keeps every
//! envelope in its [`journal`] until every consumer group has committed it, and runs the
//! [`service`] loop that acks agents and delivers to groups. It never holds a decryption key.

pub mod broker;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod enrol;
pub mod gateway;
pub mod inspect;
pub mod journal;
pub mod liveness;
pub mod node;
pub mod pki;
pub mod policies;
pub mod quickstart;
pub mod reload;
pub mod service;
