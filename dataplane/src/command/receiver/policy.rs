//! Who may do what on a receiver: the policy file's repositories and grants, and the decision
//! for one request. Pure: text in, decisions out; the receiver reads the file and reloads it.
//!
//! ```toml
//! [repositories.tenant-a]
//! store = "/srv/cbcr/tenant-a"
//!
//! [[grants]]
//! identity = "db1.tenant-a"      # a DNS name in the certificate, or its subject's CN
//! repository = "tenant-a"
//! allow = ["backup", "restore", "list"]
//! writes_as = ["db1.tenant-a"]   # whose snapshots it commits and takes parents from
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use serde::Deserialize;

/// What a request does, as a grant names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Op {
    /// Ask which blobs are stored, send packs, commit snapshots.
    Backup,
    /// Read blobs back.
    Restore,
    /// List snapshots.
    List,
    /// Verify the repository next to the data.
    Verify,
    /// Remove snapshots. A grant without it is append-only.
    Forget,
    /// Reclaim unreferenced data (no request uses it yet).
    Gc,
    /// Manage the repository (no request uses it yet).
    Admin,
}

/// One repository the receiver serves.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(super) struct RepositoryEntry {
    /// A directory or `s3://BUCKET/PREFIX`.
    pub(super) store: String,
    /// The repository's password, for a trusted storage host that verifies next to the data;
    /// without it the repository is served sealed.
    pub(super) password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    identity: String,
    repository: String,
    allow: BTreeSet<Op>,
    writes_as: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    repositories: BTreeMap<String, RepositoryEntry>,
    #[serde(default)]
    grants: Vec<GrantEntry>,
}

/// What one identity may do on one repository.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Access {
    pub(super) allow: BTreeSet<Op>,
    /// The writer names its commits carry and whose snapshots it may take as parents; `None`
    /// without a policy (every certified client is trusted alike).
    pub(super) writes_as: Option<BTreeSet<String>>,
    /// The name its commits are recorded under: its own identity when `writes_as` has it,
    /// else the first `writes_as` gives.
    writer: Option<String>,
}

impl Access {
    /// A receiver without a policy: everything, as any writer.
    pub(super) fn unrestricted() -> Self {
        use Op::*;
        Access { allow: [Backup, Restore, List, Verify, Forget, Gc, Admin].into(), writes_as: None, writer: None }
    }

    /// Whether the snapshots' writers decide what may be a parent.
    pub(super) fn restricted(&self) -> bool {
        self.writes_as.is_some()
    }

    /// The name its commits are recorded under.
    pub(super) fn writer(&self) -> Option<&str> {
        self.writer.as_deref()
    }

    /// Whether a snapshot written by `writer` (`None`: written on the store itself, by its
    /// owner, or before any policy) may be this session's parent.
    pub(super) fn may_parent(&self, writer: Option<&str>) -> bool {
        match (&self.writes_as, writer) {
            (Some(allowed), Some(w)) => allowed.contains(w),
            _ => true,
        }
    }
}

/// A policy file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
pub(super) enum PolicyError {
    #[error("{0}")]
    Syntax(String),
    #[error("repository name {0:?}: use letters, digits, '.', '-' and '_' (it is the NAME of quic://HOST:PORT/NAME)")]
    BadName(String),
    #[error(
        "grant {index}: identity {identity:?} names repository {repository:?}, which [repositories] does not define"
    )]
    UnknownRepository { index: usize, identity: String, repository: String },
    #[error("grant {index}: writer name {writer:?}: use letters, digits, '.', '-' and '_'")]
    BadWriter { index: usize, writer: String },
    #[error("grant {index}: {what} is empty")]
    Empty { index: usize, what: &'static str },
    #[error("grants {first} and {second} both give {identity:?} access to {repository:?}: merge them into one")]
    Duplicate { first: usize, second: usize, identity: String, repository: String },
}

/// The decision against a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum Denied {
    #[error("no repository {0:?} on this receiver")]
    NoRepository(String),
    #[error("certificate {identities} has no grant on repository {repository:?}")]
    NoGrant { identities: String, repository: String },
    #[error("certificate {identities} may not {op:?} on repository {repository:?} (its grant allows {allowed})")]
    NotAllowed { identities: String, repository: String, op: Op, allowed: String },
}

/// A parsed, checked policy.
#[derive(Debug, Default)]
pub(super) struct Policy {
    repositories: BTreeMap<String, RepositoryEntry>,
    /// (identity, repository) -> what it may do; grants numbered from 1 as in messages.
    grants: HashMap<(String, String), (usize, Access)>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Policy {
    /// Parses and checks a policy file's text.
    pub(super) fn parse(text: &str) -> Result<Policy, PolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| PolicyError::Syntax(e.to_string()))?;
        if let Some(bad) = file.repositories.keys().find(|n| !valid_name(n)) {
            return Err(PolicyError::BadName(bad.clone()));
        }
        let mut grants: HashMap<(String, String), (usize, Access)> = HashMap::new();
        for (i, g) in file.grants.into_iter().enumerate() {
            let index = i + 1;
            if g.identity.is_empty() {
                return Err(PolicyError::Empty { index, what: "identity" });
            }
            if !file.repositories.contains_key(&g.repository) {
                return Err(PolicyError::UnknownRepository { index, identity: g.identity, repository: g.repository });
            }
            let listed = g.writes_as.unwrap_or_else(|| vec![g.identity.clone()]);
            let writer = listed.iter().find(|w| **w == g.identity).or(listed.first()).cloned();
            let writes_as: BTreeSet<String> = listed.into_iter().collect();
            if let Some(bad) = writes_as.iter().find(|w| !valid_name(w)) {
                return Err(PolicyError::BadWriter { index, writer: bad.clone() });
            }
            if g.allow.contains(&Op::Backup) && writes_as.is_empty() {
                return Err(PolicyError::Empty { index, what: "writes_as (a grant that allows backup)" });
            }
            let key = (g.identity.clone(), g.repository.clone());
            if let Some((first, _)) = grants.get(&key) {
                return Err(PolicyError::Duplicate {
                    first: *first,
                    second: index,
                    identity: g.identity,
                    repository: g.repository,
                });
            }
            grants.insert(key, (index, Access { allow: g.allow, writes_as: Some(writes_as), writer }));
        }
        Ok(Policy { repositories: file.repositories, grants })
    }

    /// The repositories it defines, by name.
    pub(super) fn repositories(&self) -> &BTreeMap<String, RepositoryEntry> {
        &self.repositories
    }

    /// What a certificate known by `identities` (its DNS names and CN) may do on
    /// `repository`: the union of the grants of each.
    pub(super) fn access(&self, identities: &[String], repository: &str) -> Result<Access, Denied> {
        if !self.repositories.contains_key(repository) {
            return Err(Denied::NoRepository(repository.to_owned()));
        }
        let mut access: Option<Access> = None;
        for identity in identities {
            if let Some((_, grant)) = self.grants.get(&(identity.clone(), repository.to_owned())) {
                let a = access.get_or_insert_with(|| Access {
                    allow: BTreeSet::new(),
                    writes_as: Some(BTreeSet::new()),
                    writer: None,
                });
                a.allow.extend(grant.allow.iter().copied());
                if a.writer.is_none() {
                    a.writer.clone_from(&grant.writer);
                }
                a.writes_as.get_or_insert_default().extend(grant.writes_as.iter().flatten().cloned());
            }
        }
        access.ok_or_else(|| Denied::NoGrant { identities: names(identities), repository: repository.to_owned() })
    }

    /// The repositories `identities` have a grant on, for the message that asks to name one.
    pub(super) fn granted(&self, identities: &[String]) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .grants
            .keys()
            .filter(|(identity, _)| identities.contains(identity))
            .map(|(_, repository)| repository.as_str())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The refusal of `op`, which `access` does not allow, saying what it does allow.
pub(super) fn not_allowed(access: &Access, op: Op, identities: &[String], repository: &str) -> Denied {
    let allowed = access.allow.iter().map(|o| format!("{o:?}").to_lowercase()).collect::<Vec<_>>().join(", ");
    Denied::NotAllowed {
        identities: names(identities),
        repository: repository.to_owned(),
        op,
        allowed: if allowed.is_empty() { "nothing".into() } else { allowed },
    }
}

fn names(identities: &[String]) -> String {
    if identities.is_empty() {
        return "(no name in the certificate)".into();
    }
    identities.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(" / ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_TENANTS: &str = r#"
        [repositories.a]
        store = "/srv/a"
        [repositories.b]
        store = "s3://bucket/b"
        password_file = "/etc/cbcr/b.pass"

        [[grants]]
        identity = "db1.a"
        repository = "a"
        allow = ["backup", "restore", "list"]

        [[grants]]
        identity = "ops.a"
        repository = "a"
        allow = ["list", "verify", "forget"]
        writes_as = []

        [[grants]]
        identity = "db2.a"
        repository = "a"
        allow = ["backup"]
        writes_as = ["db2.a", "db1.a"]
    "#;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn grants_decide_by_identity_repository_and_operation() {
        let p = Policy::parse(TWO_TENANTS).unwrap();
        assert_eq!(p.repositories()["b"].password_file.as_deref(), Some(std::path::Path::new("/etc/cbcr/b.pass")));
        let db1 = p.access(&ids(&["db1.a"]), "a").unwrap();
        assert!(db1.allow.contains(&Op::Backup) && !db1.allow.contains(&Op::Forget));
        let err = not_allowed(&db1, Op::Forget, &ids(&["db1.a"]), "a").to_string();
        assert!(err.contains("may not Forget") && err.contains("backup, restore, list"), "{err}");
        assert_eq!(db1.writer(), Some("db1.a"), "writes as itself by default");
        assert!(matches!(p.access(&ids(&["db1.a"]), "b"), Err(Denied::NoGrant { .. })), "tenant a's host on b");
        assert!(matches!(p.access(&ids(&["db1.a"]), "c"), Err(Denied::NoRepository(_))));
        assert!(matches!(p.access(&ids(&["stranger"]), "a"), Err(Denied::NoGrant { .. })));
        assert!(matches!(p.access(&[], "a"), Err(Denied::NoGrant { .. })));
        assert_eq!(p.granted(&ids(&["db1.a", "ops.a"])), vec!["a"]);
    }

    #[test]
    fn parents_come_only_from_writers_one_may_write_as() {
        let p = Policy::parse(TWO_TENANTS).unwrap();
        let db1 = p.access(&ids(&["db1.a"]), "a").unwrap();
        assert!(db1.may_parent(Some("db1.a")));
        assert!(!db1.may_parent(Some("db2.a")), "another host's snapshot is never db1's parent");
        assert!(db1.may_parent(None), "written on the store itself");
        let db2 = p.access(&ids(&["db2.a"]), "a").unwrap();
        assert!(db2.may_parent(Some("db1.a")), "granted explicitly");
    }

    #[test]
    fn several_names_of_one_certificate_add_up() {
        let p = Policy::parse(TWO_TENANTS).unwrap();
        let both = p.access(&ids(&["db1.a", "ops.a"]), "a").unwrap();
        assert!(both.allow.contains(&Op::Forget) && both.allow.contains(&Op::Backup));
    }

    #[test]
    fn bad_policies_are_refused_with_what_is_wrong() {
        let cases = [
            ("[repositories.a]\nstore = \"/x\"\n[[grants]]\nidentity = \"h\"\nrepository = \"z\"\nallow = [\"list\"]\n", "which [repositories] does not define"),
            ("[repositories.a]\nstore = \"/x\"\n[[grants]]\nidentity = \"h\"\nrepository = \"a\"\nallow = [\"delete\"]\n", "unknown variant"),
            ("[repositories.a]\nstore = \"/x\"\nstor = 1\n", "unknown field"),
            ("[repositories.\"a/b\"]\nstore = \"/x\"\n", "repository name"),
            ("[repositories.a\n", "TOML parse error"),
            ("[repositories.a]\nstore = \"/x\"\n[[grants]]\nidentity = \"\"\nrepository = \"a\"\nallow = []\n", "identity is empty"),
            ("[repositories.a]\nstore = \"/x\"\n[[grants]]\nidentity = \"h\"\nrepository = \"a\"\nallow = [\"backup\"]\nwrites_as = []\n", "writes_as"),
            ("[repositories.a]\nstore = \"/x\"\n[[grants]]\nidentity = \"h\"\nrepository = \"a\"\nallow = [\"list\"]\n[[grants]]\nidentity = \"h\"\nrepository = \"a\"\nallow = [\"backup\"]\n", "grants 1 and 2"),
        ];
        for (text, expected) in cases {
            let err = Policy::parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_a_panic(text in "(\\[|\\]|[a-z_.\"= \n\\[\\],]){0,200}") {
            let _ = Policy::parse(&text);
        }

        #[test]
        fn a_policy_cut_anywhere_parses_or_is_refused(cut in 0usize..1000) {
            let _ = Policy::parse(&TWO_TENANTS[..cut.min(TWO_TENANTS.len())]);
        }
    }

    #[test]
    fn an_empty_policy_allows_nothing() {
        let p = Policy::parse("").unwrap();
        assert!(p.repositories().is_empty());
        assert!(p.access(&ids(&["h"]), "a").is_err());
    }
}
