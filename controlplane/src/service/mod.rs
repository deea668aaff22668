//! The service around the pure core: the registry as operators write it ([`registry_file`])
//! and the embedded store that keeps the control plane's state ([`store`]).

pub mod registry_file;
pub mod store;
