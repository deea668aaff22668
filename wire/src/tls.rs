//! TLS for both planes, from PEM bytes: the mutual-TLS configurations a receiver, the control
//! plane and their clients use (TLS 1.3, the ring provider, a client certificate signed by the
//! fleet's CA mandatory, revocation by CRL), and the names a peer's certificate is known by
//! (what a policy or a role grants to). Bytes in, configurations out: reading the files is the
//! caller's.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// The PEM texts one side of a connection presents and trusts.
#[derive(Clone, Copy)]
pub struct Pem<'a> {
    pub cert: &'a [u8],
    pub key: &'a [u8],
    pub ca: &'a [u8],
}

/// Which input was wrong, and how.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {message}")]
pub struct TlsError {
    /// `cert`, `key`, `ca` or `crl`.
    pub part: &'static str,
    pub message: String,
}

fn bad(part: &'static str, e: impl std::fmt::Display) -> TlsError {
    TlsError { part, message: e.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, rustls::RootCertStore);

fn parse(pem: Pem<'_>) -> Result<Identity, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.cert).collect::<Result<Vec<_>, _>>().map_err(|e| bad("cert", e))?;
    if certs.is_empty() {
        return Err(bad("cert", "no certificate in this file"));
    }
    let key = PrivateKeyDer::from_pem_slice(pem.key).map_err(|e| bad("key", e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(pem.ca) {
        roots.add(ca.map_err(|e| bad("ca", e))?).map_err(|e| bad("ca", e))?;
    }
    if roots.is_empty() {
        return Err(bad("ca", "no CA certificate in this file"));
    }
    Ok((certs, key, roots))
}

/// Server side: our certificate, and a client certificate signed by the CA is mandatory; with
/// `crl`, one whose serial that revocation list names is refused at the handshake.
pub fn server_config(pem: Pem<'_>, crl: Option<&[u8]>, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let (certs, key, roots) = parse(pem)?;
    let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if let Some(crl) = crl {
        let crls = CertificateRevocationListDer::pem_slice_iter(crl)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad("crl", e))?;
        if crls.is_empty() {
            return Err(bad("crl", "no revocation list in this file"));
        }
        // The CA is the trust anchor itself: only client certificates can be revoked.
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = builder.build().map_err(|e| bad(if crl.is_some() { "crl" } else { "ca" }, e))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("cert", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| bad("cert", e))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Client side: the server must present a certificate signed by the CA; we present ours.
pub fn client_config(pem: Pem<'_>, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let (certs, key, roots) = parse(pem)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad("cert", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| bad("cert", e))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The names a certificate is known by, for a policy: its DNS names, then its subject's common
/// name. Empty when it does not parse (the handshake already checked it).
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else { return vec![] };
    let mut names: Vec<String> = vec![];
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            if !names.iter().any(|n| n == cn) {
                names.push(cn.to_owned());
            }
        }
    }
    names
}

/// A short, stable name for a certificate in logs: the first 16 hex digits of its BLAKE3 hash.
pub fn fingerprint(der: &[u8]) -> String {
    blake3::hash(der).to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_names_the_part() {
        let e = client_config(Pem { cert: b"", key: b"", ca: b"" }, b"h2").unwrap_err();
        assert_eq!(e.part, "cert");
    }
}
