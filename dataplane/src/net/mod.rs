//! The network: QUIC with mutual TLS and the protocol's frames on streams, certificates, and the
//! client side of a `quic://` repository.

pub mod admin;
pub mod pki;
pub mod quic;
pub(crate) mod remote;
