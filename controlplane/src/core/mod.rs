//! The pure core. Built so far: the registry of databases and nodes ([`registry`]), the
//! scheduler's order of waiting backups with aging ([`order`]), and leases with fencing tokens
//! ([`leases`]). Planning, placement, throttle and scale decisions, and the simulator that drives
//! them, come next.

pub mod leases;
pub mod model;
pub mod order;
pub mod registry;

pub use model::{DbName, Millis, NodeName, Priority};
