//! The values every part of the core shares: time, names, priority classes, and the bounds a
//! registration must stay within.

use std::fmt;
use std::sync::Arc;

/// Time as the core sees it: milliseconds since an origin the caller chooses (the service's
/// start, or the simulator's zero). The core never reads a clock; every event carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub const fn from_secs(s: u64) -> Self {
        Self(s * 1000)
    }

    /// `self + d`, saturating (a deadline past the end of time is the end of time).
    pub fn after(self, d: Millis) -> Self {
        Self(self.0.saturating_add(d.0))
    }

    /// How long from `earlier` to `self`; zero when `earlier` is later.
    pub fn since(self, earlier: Millis) -> Millis {
        Millis(self.0.saturating_sub(earlier.0))
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

// Names are shared, not copied: the core keeps each in several indexes, and a clone of an
// `Arc<str>` is a counter increment where a `String`'s is an allocation.

/// A database's name, unique in the fleet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DbName(pub Arc<str>);

/// A node's name (a host that runs backups), unique in the fleet.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(pub Arc<str>);

/// A source host's name: the production host a database's backup reads from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostName(pub Arc<str>);

impl fmt::Display for DbName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A database's priority class. Classes are strictly ordered: a waiting backup of a higher class
/// is always placed before one of a lower class, except as aging ([`crate::core::order`]) allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
}

impl Priority {
    /// 0 for critical up to 3 for low: the rank the scheduler's order sorts by.
    pub fn rank(self) -> u8 {
        self as u8
    }

    /// What [`Priority::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "critical" => Self::Critical,
            "high" => Self::High,
            "normal" => Self::Normal,
            "low" => Self::Low,
            _ => return None,
        })
    }
}

/// The largest size estimate a registration may give (1 EiB): anything larger is a unit mistake.
pub const MAX_SIZE_ESTIMATE: u64 = 1 << 60;
/// The shortest RPO a registration may ask for: the scheduler cannot keep promises tighter than
/// its own pass interval.
pub const MIN_RPO: Millis = Millis::from_secs(60);
