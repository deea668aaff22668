//! What `verify` found: the report a receiver sends (as JSON) to a client that asked it to
//! verify the repository where it lies, and that the CLI prints.

/// One damaged object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Damage {
    /// `index`, `snapshot`, `pack`, `blob` or `file`.
    pub kind: String,
    /// What is damaged: a path in the repository, a blob id, or `snapshot:path` for a file.
    pub name: String,
    pub detail: String,
}

/// The counts verify checked, and the damage it found.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub snapshots: u64,
    pub packs: u64,
    pub blobs: u64,
    pub bytes_read: u64,
    /// Packs no index run names: left by an interrupted backup, harmless.
    pub unindexed_packs: u64,
    pub damage: Vec<Damage>,
    /// Files in the repository's folders that are no cbcr object (other commands skip them).
    #[serde(default)]
    pub strays: Vec<String>,
    /// Chunk lists (hex ids) that name a damaged or missing chunk: the files they describe
    /// cannot be restored whole, and a backup must not reuse them.
    #[serde(default)]
    pub damaged_lists: Vec<String>,
}
