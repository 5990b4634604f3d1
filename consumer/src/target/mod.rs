//! Targets: the systems a consumer keeps in step. One small trait, one module per kind, one
//! config section per target.
//!
//! Adding a kind is adding a module that implements [`Target`] and a line in [`build`]. Every
//! target section has the routing keys of [`Routing`] (`system`, `include`, `exclude`, `map`)
//! beside its own keys; both are checked strictly (an unknown key is an error).

pub mod exec;
pub mod htpasswd;
pub mod ldap;
pub mod null;
pub mod postgres;

use glob::Pattern;
use pwsync_proto::Change;
use serde::Deserialize;
use std::collections::BTreeMap;

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
}

/// A system pwsync sets passwords on. `apply` must be idempotent: applying the same change
/// twice leaves the target as applying it once (deliveries are at least once).
pub trait Target: Send + Sync {
    /// Applies `change` to the account named `account` on this target (the user's name after
    /// the target's name mapping).
    fn apply(&self, change: &Change, account: &str) -> Outcome;
    /// Whether the target is usable at all (for `check` and start-up): a clear reason if not.
    fn check(&self) -> Result<(), String>;
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
}

fn all() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone)]
pub struct Routing {
    pub system: String,
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
    map: BTreeMap<String, String>,
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
            system: c.system,
            map: c.map,
        })
    }

    /// The account to apply `change` to here, or why it does not go here.
    pub fn route(&self, change: &Change) -> Result<String, &'static str> {
        if change.origin == self.system {
            return Err("came from this system");
        }
        if !self.include.iter().any(|p| p.matches(&change.user))
            || self.exclude.iter().any(|p| p.matches(&change.user))
        {
            return Err("user outside this target's scope");
        }
        Ok(self
            .map
            .get(&change.user)
            .cloned()
            .unwrap_or_else(|| change.user.clone()))
    }
}

/// A configured target: its name, routing, and implementation.
pub struct Configured {
    pub name: String,
    pub routing: Routing,
    pub target: Box<dyn Target>,
}

const ROUTING_KEYS: [&str; 4] = ["system", "include", "exclude", "map"];

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
                "[targets.{name}] needs type = \"htpasswd\", \"exec\", \"ldap\", \"postgres\" or \"null\""
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
                "[targets.{name}]: unknown target type {other:?} (known: htpasswd, exec, ldap, postgres, null)"
            ))
        }
    };
    Ok(Configured {
        name: name.into(),
        routing,
        target,
    })
}
