//! Who may call what: a role per client certificate identity (its DNS names and common name),
//! from a TOML file an operator writes:
//!
//! ```toml
//! operators = ["ops-alice"]
//! readers = ["dashboard"]
//! agents = ["agent-*"]      # a trailing * matches any rest of the name
//! ```
//!
//! An operator may do everything, a reader only read, an agent only act as the node its
//! certificate names (the API checks the node in every agent call). A name no list matches is
//! refused. The first role a certificate's names match wins, operators first.

use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Operator,
    Reader,
    Agent,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    #[serde(default)]
    operators: Vec<String>,
    #[serde(default)]
    readers: Vec<String>,
    #[serde(default)]
    agents: Vec<String>,
}

fn matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

impl Roles {
    pub fn parse(text: &str) -> Result<Self, String> {
        let roles: Roles = toml::from_str(text).map_err(|e| e.to_string())?;
        for p in roles.operators.iter().chain(&roles.readers).chain(&roles.agents) {
            if p.is_empty() || p[..p.len() - 1].contains('*') {
                return Err(format!("pattern {p:?}: a name, or a prefix followed by one trailing *"));
            }
        }
        Ok(roles)
    }

    /// The role of a client known by `names`, and the name that earned it.
    pub fn role<'a>(&self, names: &'a [String]) -> Option<(Role, &'a str)> {
        for (role, patterns) in
            [(Role::Operator, &self.operators), (Role::Reader, &self.readers), (Role::Agent, &self.agents)]
        {
            for name in names {
                if patterns.iter().any(|p| matches(p, name)) {
                    return Some((role, name));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn roles_by_name_and_prefix_operators_first() {
        let r = Roles::parse("operators = [\"ops\"]\nreaders = [\"dash\"]\nagents = [\"agent-*\"]\n").unwrap();
        assert_eq!(r.role(&names(&["agent-7"])), Some((Role::Agent, "agent-7")));
        assert_eq!(r.role(&names(&["dash"])), Some((Role::Reader, "dash")));
        assert_eq!(r.role(&names(&["agent-1", "ops"])), Some((Role::Operator, "ops")));
        assert_eq!(r.role(&names(&["agent"])), None, "the prefix needs its dash");
        assert_eq!(r.role(&names(&[])), None);
    }

    #[test]
    fn bad_files_are_refused() {
        assert!(Roles::parse("admins = [\"x\"]").unwrap_err().contains("admins"));
        assert!(Roles::parse("agents = [\"a*b*\"]").unwrap_err().contains("trailing"));
        assert!(Roles::parse("agents = [\"\"]").is_err());
    }
}
