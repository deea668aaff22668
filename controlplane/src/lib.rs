//! The control plane of cbcr: what decides which database is backed up when, on which node.
//!
//! [`core`] is a pure state machine in the manner of quinn-proto under quinn: it takes events and
//! the time as arguments and returns decisions, never reading a clock, a socket or a file, so a
//! seeded simulation can drive it through a fleet in seconds and every decision is repeatable.

pub mod core;
pub mod service;
pub mod sim;
