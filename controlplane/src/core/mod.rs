//! The pure core. Built so far: the registry of databases and nodes ([`registry`]), the
//! scheduler's order of waiting backups with aging ([`order`]), leases with fencing tokens
//! ([`leases`]), how many shards a backup is cut into ([`planner`]) and where one runs within
//! its source host's caps ([`placement`]), and the event loop that joins them into decisions
//! ([`machine`]), an AIMD loop for read caps ([`throttle`]) and the desired node count with
//! hysteresis ([`scale`]). Wiring those two into the event loop, and the simulator that drives
//! the core, come next.

pub mod leases;
pub mod machine;
#[cfg(test)]
mod machine_props;
pub mod model;
pub mod order;
pub mod placement;
pub mod planner;
pub mod registry;
pub mod scale;
pub mod throttle;

pub use model::{DbName, HostName, Millis, NodeName, Priority};
