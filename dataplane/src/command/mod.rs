//! The commands, as library entry points a CLI or a daemon calls: each takes a repository,
//! its options and a [`crate::events::Run`] (where events go, how it is cancelled).

pub mod agent;
pub mod backup;
pub mod jobs;
pub mod receiver;
pub mod repair;
pub mod repair_snapshots;
pub mod restore;
pub mod verify;
