//! cbcr's data plane: thread-per-core backup, restore and verify against a repository.
//!
//! See `docs/ARCHITECTURE.md` for the map. Folders by concern: `pipeline` (the stages, plain
//! functions over byte slices, and packs), `repo` (an open repository and the `Backend` its
//! data goes through: its own store, or a receiver), `index`, `net` (QUIC), `store` (where a
//! repository's objects live), `source` (generated sources), `command` (the library entry
//! points a CLI or daemon calls). `runtime` is the only module that knows about glommio;
//! `events`, `error` and `limits` serve them all.

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

/// Parses `123`, `64KiB`, `1MiB`, `1GiB`, `2TiB` (also `K`, `M`, `G`, `T`, `KB`.. as powers of
/// 1024, as the options document them), through the parse-size crate.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s.trim())
        .map_err(|e| format!("{s:?} is not a size like 64KiB or 1GiB: {e}"))
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

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_are_powers_of_1024_whatever_the_unit_is_spelled() {
        for (text, bytes) in [
            ("123", 123),
            ("64KiB", 64 << 10),
            ("64K", 64 << 10),
            ("64kb", 64 << 10),
            ("1MiB", 1 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1 GiB", 1 << 30),
        ] {
            assert_eq!(super::parse_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "GiB", "12 apples", "-1", "99999999999999999999TiB"] {
            assert!(super::parse_size(bad).is_err(), "{bad}");
        }
    }
}
