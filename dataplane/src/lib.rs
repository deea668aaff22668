//! cbcr's data plane: thread-per-core backup, restore and verify against a repository.
//!
//! See `docs/ARCHITECTURE.md` for the map. Folders by concern: `pipeline` (the stages, plain
//! functions over byte slices, and packs), `index`, `store` (where a repository lives) under
//! `repo`, `net` (QUIC), `source` (generated sources), `command` (the library entry points a CLI
//! or daemon calls). `runtime` is the only module that knows about glommio; `events`, `error`
//! and `limits` serve them all.

pub mod command;
pub mod error;
pub mod events;
pub(crate) mod fault;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod pipeline;
pub mod repo;
pub mod runtime;
pub mod source;
pub mod store;

/// Parses `123`, `64KiB`, `1MiB`, `1GiB`, `2TiB` (also `K`, `M`, `G`, `T`, `KB`.. as powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 64KiB or 1GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use KiB, MiB, GiB or TiB)")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Bytes in binary units for people: `1.5 GiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
