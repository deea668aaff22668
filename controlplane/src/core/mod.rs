//! The pure core: the registry of databases and nodes ([`registry`]), the scheduler's order of
//! waiting backups with aging ([`order`]), leases with fencing tokens ([`leases`]), how many
//! shards a backup is cut into ([`planner`]), where one runs within its source host's caps
//! ([`placement`]), the AIMD loops for read caps (`wire::throttle`, shared with the agents), the
//! desired node count with
//! hysteresis ([`scale`]), and the event loop that joins them into decisions ([`machine`]).

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

pub use model::{DbName, HostName, Millis, NodeName, Priority};
