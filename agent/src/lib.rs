//! pwsync-agent: the edge daemon and its tools.
//!
//! A source hook hands a change to the agent over a Unix socket ([`server`], protocol in
//! [`api`]); the [`writer`] seals it and makes it durable in the [`spool`] before the hook gets
//! its answer; the [`forwarder`] publishes spooled envelopes to the relay and deletes them only
//! on the relay's signed ack. [`inspect`] reads a stopped agent's spool. [`samba`] captures on a
//! Samba AD domain controller, as the hook of `samba-tool user syncpasswords`; [`ldapsock`] on
//! OpenLDAP, through slapd's sock overlay, in two phases.

pub mod admission;
pub mod api;
pub mod backfill;
pub mod client;
pub mod config;
pub mod daemon;
pub mod forwarder;
pub mod inspect;
pub mod policy;
pub mod scope;
pub mod sender;
pub mod server;
pub mod sources;
pub mod spool;
pub mod throttle;
pub mod unix_users;
pub mod writer;
