//! The service around the pure core: the registry as operators write it ([`registry_file`]),
//! the embedded store that keeps the control plane's state ([`store`]), who may call what
//! ([`roles`]), the core's events and decisions as the API's records ([`fleet`]), and the
//! HTTPS API that carries them ([`api`]), and what systemd is told ([`notify`]).

pub mod api;
pub mod fleet;
mod notify;
pub mod registry_file;
pub mod roles;
pub mod store;
