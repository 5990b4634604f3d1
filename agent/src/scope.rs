//! Scope filters (TDI's syncBase): which user names this agent forwards at all. Changes for
//! users outside the scope (root, service accounts) are answered "ignored" and never spooled.

use glob::Pattern;
use serde::Deserialize;

/// Which user names this agent forwards (shell-style patterns). A user must match an include
/// pattern and no exclude pattern; the others are answered "ignored".
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

impl Default for ScopeConfig {
    fn default() -> Self {
        ScopeConfig {
            include: default_include(),
            exclude: vec![],
        }
    }
}

fn default_include() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone)]
pub struct Scope {
    include: Vec<Pattern>,
    exclude: Vec<Pattern>,
}

impl Scope {
    pub fn new(c: &ScopeConfig) -> Result<Scope, String> {
        let compile = |list: &[String], key: &str| {
            list.iter()
                .map(|p| Pattern::new(p).map_err(|e| format!("scope.{key} pattern {p:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Scope {
            include: compile(&c.include, "include")?,
            exclude: compile(&c.exclude, "exclude")?,
        })
    }

    /// Whether changes for `user` are forwarded.
    pub fn admits(&self, user: &str) -> bool {
        self.include.iter().any(|p| p.matches(user))
            && !self.exclude.iter().any(|p| p.matches(user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_then_exclude() {
        let s = Scope::new(&ScopeConfig {
            include: vec!["*".into()],
            exclude: vec!["root".into(), "svc-*".into()],
        })
        .unwrap();
        assert!(s.admits("alice"));
        assert!(!s.admits("root"));
        assert!(!s.admits("svc-backup"));
        let none = Scope::new(&ScopeConfig {
            include: vec![],
            exclude: vec![],
        })
        .unwrap();
        assert!(!none.admits("alice"));
        assert!(Scope::new(&ScopeConfig {
            include: vec!["[".into()],
            exclude: vec![]
        })
        .is_err());
    }
}
