//! Targets: the systems a consumer keeps in step. One small trait, one module per kind, one
//! config section per target.
//!
//! Adding a kind is adding a module that implements [`Target`] and a line in [`build`]. Every
//! target section has the routing keys of [`Routing`] (`system`, `include`, `exclude`, `map`,
//! `protect`) beside its own keys; both are checked strictly (an unknown key is an error).
//!
//! Every change reaches a target through [`Configured::apply`], which first checks it against
//! the target's declared [`Limits`] and protected accounts ([`limits::admit`]): a target's
//! `apply` only ever sees a change it can hold whole, for an account it can name exactly.

pub mod ad;
pub mod directory;
pub mod exec;
pub mod htpasswd;
pub mod kerberos;
pub mod ldap;
pub mod limits;
pub mod null;
pub mod observed;
pub mod postgres;

pub use limits::{Folding, Limits, Quality};

use glob::Pattern;
use pwsync_proto::Change;
use serde::Deserialize;
use std::collections::BTreeMap;

/// What a remove does to an account, on targets that can keep a disabled one (`remove = …`).
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Removal {
    /// The account is disabled, as by revoke (AD's ACCOUNTDISABLE, Kerberos' allow_tix
    /// cleared): it can be enabled again.
    #[default]
    Disable,
    /// The account (AD user object, Kerberos principal) is deleted.
    Delete,
}

/// What became of applying one change to one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// A passing condition (server busy or down, lock held): try again later.
    RetryLater(String),
    /// The account does not exist (yet): retried for the no-such-user window, then a dead letter.
    NoSuchUser(String),
    /// It can never apply as it is: a dead letter, with the reason.
    Failed(String),
    /// The target itself cannot be used now (its server is down, or its own login is refused):
    /// retried, and the target reported unhealthy until a change applies again. Never a dead
    /// letter: nothing is wrong with the change.
    Unavailable(String),
}

impl Outcome {
    /// The reason it carries, in words ("applied" for [`Outcome::Applied`]).
    pub fn reason(&self) -> &str {
        match self {
            Outcome::Applied => "applied",
            Outcome::RetryLater(r)
            | Outcome::NoSuchUser(r)
            | Outcome::Failed(r)
            | Outcome::Unavailable(r) => r,
        }
    }
}

/// Why a target cannot be used (from [`Target::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unusable {
    /// A local configuration error that no retry can mend (a path that resolves to nothing, a
    /// cost out of range): `check` and start-up stop on it.
    Config(String),
    /// The target is unreachable now (server down, login refused): its changes wait.
    NotNow(String),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::Config(e) => write!(f, "configuration error: {e}"),
            Unusable::NotNow(e) => write!(f, "not reachable now: {e}"),
        }
    }
}

/// A system pwsync sets passwords on. `apply` must be idempotent: applying the same change
/// twice leaves the target as applying it once (deliveries are at least once).
pub trait Target: Send + Sync {
    /// Applies `change` to the account named `account` on this target (the user's name after
    /// the target's name mapping).
    fn apply(&self, change: &Change, account: &str) -> Outcome;
    /// Whether the target is usable (for `check` and start-up): a clear reason if not.
    fn check(&self) -> Result<(), Unusable>;
    /// What this target can hold: see [`limits`].
    fn limits(&self) -> Limits;
    /// What reads the password rules this target's own system enforces (a domain's policy and
    /// its fine-grained ones, a KDC's policies), for targets whose system has them. While it
    /// has not read them, [`Limits::quality`] stands in.
    fn policy_reader(&self) -> Option<Box<dyn PolicyReader>> {
        None
    }
    /// What this target's system records of `account`'s password now, for the account audit
    /// ([`crate::audit`]): its change time, who made it, the stored hash or a key version;
    /// never a password. Kinds that keep nothing to compare say so.
    fn observe(&self, _account: &str) -> observed::Observed {
        observed::Observed::Unsupported
    }
}

/// Which accounts of a target a [`SystemRule`] binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accounts {
    All,
    Only(Vec<String>),
    AllBut(Vec<String>),
}

/// A password rule a target's own system enforces, as read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemRule {
    pub rule: pwsync_proto::policy::Rule,
    pub accounts: Accounts,
    /// Where it came from, in words ("the password policy of domain samdom.test").
    pub source: String,
}

/// Reads a target system's own password rules (on a connection of its own, so a read never
/// waits for a change being applied, nor a change for a read).
pub trait PolicyReader: Send {
    fn read(&self) -> Result<Vec<SystemRule>, String>;
}

/// The dead letter for a change to the account a target logs in as (`whose` says which it is
/// and how the target knows). Every target that logs in as one of the accounts it changes
/// learns that account from its server (never from the config's spelling of it) and refuses
/// it with this.
pub fn own_login(whose: &str) -> Outcome {
    Outcome::Failed(format!(
        "refused: {whose}; pwsync never changes its own login (rotate it by hand, then update the password file)"
    ))
}

/// The dead letter for an account that is not a person's (a computer, a trust, a service):
/// a target changes only people's accounts.
pub fn not_a_person(what: &str) -> Outcome {
    Outcome::Failed(format!(
        "refused: {what}; pwsync changes only people's accounts, never a computer's, a trust's or a service's (their passwords are the machines' own)"
    ))
}

/// Which changes reach a target, and under which account name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// This target's own system name: changes whose origin is this system are never applied
    /// here (they came from it).
    pub system: String,
    #[serde(default = "all")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Account names that differ on this target: user → account.
    #[serde(default)]
    pub map: BTreeMap<String, String>,
    /// Accounts pwsync never changes here (shell patterns, compared under the target's name
    /// folding). Default [`limits::DEFAULT_PROTECT`]; the target's own login is protected always
    /// (see [`own_login`]).
    #[serde(default = "default_protect")]
    pub protect: Vec<String>,
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

fn default_protect() -> Vec<String> {
    limits::DEFAULT_PROTECT
        .iter()
        .map(|s| s.to_string())
        .collect()
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub system: String,
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    map: BTreeMap<String, String>,
    protect: Vec<Pattern>,
}

impl Routing {
    pub fn new(c: RoutingConfig) -> Result<Routing, String> {
        let compile = |list: &[String], key: &str| {
            list.iter()
                .map(|p| Pattern::new(p).map_err(|e| format!("{key} pattern {p:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        if c.include.is_empty() {
            return Err("include is empty, so this target would never get a change; leave it out for all users".into());
        }
        Ok(Routing {
            include: compile(&c.include, "include")?,
            exclude: compile(&c.exclude, "exclude")?,
            protect: compile(&c.protect, "protect")?,
            system: c.system,
            map: c.map,
        })
    }

    /// The account to apply `change` to here, or why it does not go here.
    pub fn route(&self, change: &Change) -> Result<String, &'static str> {
        if change.origin == self.system {
            return Err("came from this system");
        }
        if !self.takes(&change.user) {
            return Err("user outside this target's scope");
        }
        Ok(self.account(&change.user))
    }

    /// [`Routing::route`], or, for a change made on this system itself (for a user this target
    /// takes), its account after all when `restore` says so (the consumer asks
    /// [`crate::decide::restore_at_origin`]). `true` beside the account marks such a restore.
    pub fn route_or_restore(
        &self,
        change: &Change,
        restore: impl FnOnce() -> bool,
    ) -> Result<(String, bool), &'static str> {
        match self.route(change) {
            Ok(account) => Ok((account, false)),
            Err(_) if change.origin == self.system && self.takes(&change.user) && restore() => {
                Ok((self.account(&change.user), true))
            }
            Err(why) => Err(why),
        }
    }

    /// Whether `user` is in this target's scope (`include`, not `exclude`).
    pub fn takes(&self, user: &str) -> bool {
        self.include.iter().any(|p| p.matches(user))
            && !self.exclude.iter().any(|p| p.matches(user))
    }

    /// The users the `map` gives another account here, with that account.
    pub fn mapped(&self) -> impl Iterator<Item = (&String, &String)> {
        self.map.iter()
    }

    /// The account `user` has here (after `map`).
    pub fn account(&self, user: &str) -> String {
        self.map
            .get(user)
            .cloned()
            .unwrap_or_else(|| user.to_string())
    }
}

/// A configured target: its name, routing, and implementation.
pub struct Configured {
    pub name: String,
    pub routing: Routing,
    pub target: Box<dyn Target>,
    pub limits: Limits,
}

impl Configured {
    /// Applies `change` to `account` if the target can hold it ([`limits::admit`]); else a
    /// dead letter naming the limit. The only way a change reaches a target.
    pub fn apply(&self, change: &Change, account: &str) -> Outcome {
        match limits::admit(&self.limits, &self.routing.protect, change, account) {
            Ok(()) => self.target.apply(change, account),
            Err(reason) => Outcome::Failed(format!("refused: {reason}")),
        }
    }

    /// Users the `map` sends to one account here (under the target's name folding), with that
    /// account: reported by `check`, since one user's change would overwrite the other's.
    pub fn map_collisions(&self) -> Vec<(String, String, String)> {
        let mut out = vec![];
        let mut seen: BTreeMap<String, &String> = BTreeMap::new();
        for (user, account) in &self.routing.map {
            if let Some(other) = seen.insert(self.limits.folding.fold(account), user) {
                out.push((other.clone(), user.clone(), account.clone()));
            }
        }
        out
    }
}

const ROUTING_KEYS: [&str; 5] = ["system", "include", "exclude", "map", "protect"];

/// Builds a target from its config section (`[targets.NAME]`).
pub fn build(
    name: &str,
    mut section: toml::Table,
    base: &std::path::Path,
) -> Result<Configured, String> {
    let kind = match section.remove("type") {
        Some(toml::Value::String(k)) => k,
        _ => {
            return Err(format!(
                "[targets.{name}] needs type = \"htpasswd\", \"exec\", \"ldap\", \"ad\", \"kerberos\", \"postgres\" or \"null\""
            ))
        }
    };
    let mut routing = toml::Table::new();
    for k in ROUTING_KEYS {
        if let Some(v) = section.remove(k) {
            routing.insert(k.into(), v);
        }
    }
    let routing: RoutingConfig = routing
        .try_into()
        .map_err(|e| format!("[targets.{name}]: {e}"))?;
    let routing = Routing::new(routing).map_err(|e| format!("[targets.{name}]: {e}"))?;
    let section = toml::Value::Table(section);
    let err = |e: toml::de::Error| format!("[targets.{name}] ({kind}): {e}");
    let target: Box<dyn Target> = match kind.as_str() {
        "htpasswd" => Box::new(htpasswd::Htpasswd::new(
            section.try_into().map_err(err)?,
            base,
        )),
        "exec" => Box::new(exec::Exec::new(section.try_into().map_err(err)?, base)),
        "ldap" => Box::new(
            ldap::Ldap::new(section.try_into().map_err(err)?, base)
                .map_err(|e| format!("[targets.{name}]: {e}"))?,
        ),
        "ad" => Box::new(
            ad::Ad::new(section.try_into().map_err(err)?, base)
                .map_err(|e| format!("[targets.{name}]: {e}"))?,
        ),
        "kerberos" => Box::new(
            kerberos::Kerberos::new(section.try_into().map_err(err)?, base)
                .map_err(|e| format!("[targets.{name}]: {e}"))?,
        ),
        "postgres" => Box::new(
            postgres::Postgres::new(section.try_into().map_err(err)?, base)
                .map_err(|e| format!("[targets.{name}]: {e}"))?,
        ),
        "null" => Box::new(
            null::Null::new(section.try_into().map_err(err)?, base)
                .map_err(|e| format!("[targets.{name}]: {e}"))?,
        ),
        other => {
            return Err(format!(
                "[targets.{name}]: unknown target type {other:?} (known: htpasswd, exec, ldap, ad, kerberos, postgres, null)"
            ))
        }
    };
    if let Some(c) = routing
        .map
        .values()
        .filter_map(|a| limits::check_account(&target.limits(), a).err())
        .next()
    {
        return Err(format!("[targets.{name}] map: {c}"));
    }
    Ok(Configured {
        name: name.into(),
        routing,
        limits: target.limits(),
        target,
    })
}
