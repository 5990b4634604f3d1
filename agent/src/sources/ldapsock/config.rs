//! `[ldap_sock]` in `agent.toml`: how `pwsync-agent ldap-sock` serves slapd's sock overlay.

use serde::Deserialize;
use std::path::PathBuf;

/// `[ldap_sock]`: how `pwsync-agent ldap-sock` serves slapd's sock overlay (see
/// the module docs).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct LdapSockConfig {
    /// The socket slapd's `socketpath` names.
    pub socket: PathBuf,
    /// Its file mode (default 0o660: give slapd's group access, or run as slapd's user).
    #[serde(default = "default_socket_mode")]
    pub socket_mode: u32,
    /// The user slapd runs as: the only one (besides root and this process's own user) whose
    /// connections to `socket` are served. Default `openldap` (Debian's).
    #[serde(default = "default_slapd_user")]
    pub slapd_user: String,
    /// Where pending changes are kept (`ldap-pending.redb`, sealed; the folder is made 0700).
    pub state_dir: PathBuf,
    #[serde(default)]
    pub mode: SockMode,
    /// The directory itself: each changed entry's stored name is read there (a base search,
    /// anonymous, or SASL EXTERNAL over `ldapi://`: give that identity search access to the
    /// captured entries), and a change whose result never came is settled there (a bind as the
    /// entry with the captured password): `ldap://127.0.0.1:389` or `ldapi:///`.
    pub url: String,
    /// How a DN names its user: `uid={user},ou=people,dc=example,dc=org` (a DN of another form
    /// is not captured). Default: the value of the DN's first RDN.
    #[serde(default)]
    pub user_dn_template: Option<String>,
    /// Or a regular expression over the whole DN (case aside) whose group `(?P<user>…)` is the
    /// user name: `uid=(?P<user>[^,]+),ou=(staff|contractors),dc=example,dc=org`.
    #[serde(default)]
    pub user_dn_pattern: Option<String>,
    /// Only entries under this DN are captured (default: all).
    #[serde(default)]
    pub sync_base: Option<String>,
    /// Writers whose changes are not captured: the bind DN of pwsync's own directory target on
    /// this slapd, so its writes do not come back as new changes.
    #[serde(default)]
    pub ignore_bind_dns: Vec<String>,
    /// Send the password of every successful simple bind as a backfill (slapd's `sockops` then
    /// needs `bind`): fills targets that have no value from pwsync for that user. Default off.
    #[serde(default)]
    pub backfill: bool,
    /// At most one backfill per user within this many seconds. Default 3600.
    #[serde(default = "default_backfill_interval")]
    pub backfill_interval_secs: u64,
    /// Seconds a captured change waits for slapd's result before it is checked against the
    /// directory. Default 10.
    #[serde(default = "default_settle_secs")]
    pub settle_secs: u64,
    /// Where `ldap-sock` serves `/metrics` (its counters, `pwsync_ldapsock_events_total`, and
    /// the pending changes) and `/healthz` (unhealthy while a change waits too long). An address
    /// of its own: the agent daemon serves the `[metrics]` one. Default: not served.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// What `ldap-sock` does when a change cannot be kept or handed on now.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SockMode {
    /// slapd refuses the change (nothing changes anywhere).
    #[default]
    Strict,
    /// slapd goes on; the change is forwarded when the agent is back, and the log says so.
    Lenient,
}

fn default_slapd_user() -> String {
    "openldap".into()
}

/// As the agent's own socket: slapd's group may connect.
fn default_socket_mode() -> u32 {
    0o660
}

fn default_backfill_interval() -> u64 {
    crate::backfill::DEFAULT_INTERVAL_SECS
}

fn default_settle_secs() -> u64 {
    10
}
