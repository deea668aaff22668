//! Certificates: a development PKI, client certificates issued by its CA, and their revocation
//! list.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationList, CertificateRevocationListParams,
    DnType, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

use crate::error::{Error, IoContext, Result};

/// The CA's revocation list in a PKI directory, as `cert revoke` writes it.
pub const CRL_FILE: &str = "crl.pem";

fn gen(e: rcgen::Error) -> Error {
    Error::Internal(format!("certificate generation: {e}"))
}

fn bad(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{}: {e}", path.display()))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().create_new(true).write(true).mode(mode).open(path).at(path)?;
    f.write_all(text.as_bytes()).at(path)
}

fn random_serial() -> Result<SerialNumber> {
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    serial[0] &= 0x7f; // a positive DER integer
    Ok(SerialNumber::from_slice(&serial))
}

/// A leaf certificate for `name` (its CN and DNS name, plus `sans`) signed by the CA.
fn leaf(name: &str, sans: &[&str], expired: bool, ca: &Certificate, ca_key: &KeyPair) -> Result<(String, String)> {
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate().map_err(gen)?;
    let mut all = vec![name.to_owned()];
    all.extend(sans.iter().map(|s| s.to_string()));
    let mut params = CertificateParams::new(all).map_err(gen)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.serial_number = Some(random_serial()?);
    params.not_before = now - time::Duration::days(if expired { 30 } else { 1 });
    params.not_after = if expired { now - time::Duration::days(1) } else { now + time::Duration::days(825) };
    let cert = params.signed_by(&key, ca, ca_key).map_err(gen)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes a development PKI into `out`: `ca.crt`/`ca.key`, `receiver.crt`/`.key` and
/// `control.crt`/`.key` (the receiver's and `cbcr-control serve`'s, for `localhost` and
/// 127.0.0.1) and `client.crt`/`.key` (named `cbcr-client`). With
/// `expired_client`, the client certificate's validity ended yesterday (to check that
/// receivers refuse it).
pub fn write_dev_pki(out: &Path, expired_client: bool) -> Result<()> {
    std::fs::create_dir_all(out).at(out)?;
    let now = time::OffsetDateTime::now_utc();
    let ca_key = KeyPair::generate().map_err(gen)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca_params.distinguished_name.push(DnType::CommonName, "cbcr development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::days(1);
    ca_params.not_after = now + time::Duration::days(3650);
    let ca = ca_params.self_signed(&ca_key).map_err(gen)?;
    let receiver = leaf("localhost", &["127.0.0.1"], false, &ca, &ca_key)?;
    let control = leaf("localhost", &["127.0.0.1", "cbcr-control"], false, &ca, &ca_key)?;
    let client = leaf("cbcr-client", &[], expired_client, &ca, &ca_key)?;
    write_file(&out.join("ca.crt"), &ca.pem(), 0o644)?;
    write_file(&out.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    write_file(&out.join("receiver.crt"), &receiver.0, 0o644)?;
    write_file(&out.join("receiver.key"), &receiver.1, 0o600)?;
    write_file(&out.join("control.crt"), &control.0, 0o644)?;
    write_file(&out.join("control.key"), &control.1, 0o600)?;
    write_file(&out.join("client.crt"), &client.0, 0o644)?;
    write_file(&out.join("client.key"), &client.1, 0o600)
}

/// The CA of the PKI directory `dir`, able to sign.
fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair)> {
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    let cert_pem = std::fs::read_to_string(&cert_path).at(&cert_path)?;
    let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).at(&key_path)?).map_err(|e| bad(&key_path, e))?;
    // The same name and key as the CA certificate: what it signs verifies under it.
    let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| bad(&cert_path, e))?;
    let ca = params.self_signed(&key).map_err(gen)?;
    Ok((ca, key))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        && !name.starts_with(['-', '.'])
}

/// Issues a client certificate for `name` (its CN and DNS name: the identity a receiver's
/// policy grants to) signed by the CA in `dir`; writes `dir/NAME.crt` and `dir/NAME.key`.
pub fn issue(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    if !valid_name(name) || ["ca", "crl"].contains(&name) {
        return Err(Error::Usage(format!(
            "certificate name {name:?}: use a DNS-style name (letters, digits, '-' and '.'), not ca or crl"
        )));
    }
    let (ca, ca_key) = load_ca(dir)?;
    let (cert, key) = leaf(name, &[], false, &ca, &ca_key)?;
    let (cert_path, key_path) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    write_file(&cert_path, &cert, 0o644)?;
    write_file(&key_path, &key, 0o600)?;
    Ok((cert_path, key_path))
}

/// Revokes the certificate `dir/NAME.crt`: rewrites `dir/crl.pem`, signed by the CA, with its
/// serial added to those already revoked there. Returns the CRL's path.
pub fn revoke(dir: &Path, name: &str) -> Result<PathBuf> {
    let cert_path = dir.join(format!("{name}.crt"));
    let pem = std::fs::read(&cert_path).at(&cert_path)?;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(&cert_path, e))?;
    let cert = parsed.parse_x509().map_err(|e| bad(&cert_path, e))?;
    let serial = cert.raw_serial().to_vec();
    let crl_path = dir.join(CRL_FILE);
    let (mut serials, mut number) = (vec![], 0u64);
    if let Ok(old) = std::fs::read(&crl_path) {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&old).map_err(|e| bad(&crl_path, e))?;
        let (_, crl) = x509_parser::parse_x509_crl(&parsed.contents).map_err(|e| bad(&crl_path, e))?;
        serials = crl.iter_revoked_certificates().map(|r| r.raw_serial().to_vec()).collect();
        number = crl.crl_number().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
    }
    if !serials.contains(&serial) {
        serials.push(serial);
    }
    let (ca, ca_key) = load_ca(dir)?;
    let now = time::OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(365),
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: serials
            .into_iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(&s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl: CertificateRevocationList = params.signed_by(&ca, &ca_key).map_err(gen)?;
    write_file(&crl_path, &crl.pem().map_err(gen)?, 0o644)?;
    Ok(crl_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::tls::certificate_names;

    fn client_der() -> Vec<u8> {
        static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        DER.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            write_dev_pki(dir.path(), false).unwrap();
            let pem = std::fs::read(dir.path().join("client.crt")).unwrap();
            x509_parser::pem::parse_x509_pem(&pem).unwrap().1.contents
        })
        .clone()
    }

    proptest::proptest! {
        #[test]
        fn garbage_has_no_names(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            proptest::prop_assert!(certificate_names(&bytes).is_empty());
        }

        #[test]
        fn a_damaged_certificate_never_panics(at in 0usize..2000, flip in 1u8..=255, cut in 0usize..2000) {
            let mut der = client_der();
            let at = at % der.len();
            der[at] ^= flip;
            der.truncate(cut.max(1));
            let _ = certificate_names(&der);
        }
    }

    #[test]
    fn issued_certificates_are_known_by_their_name_and_revocations_accumulate() {
        let dir = tempfile::tempdir().unwrap();
        write_dev_pki(dir.path(), false).unwrap();
        let client = std::fs::read(dir.path().join("client.crt")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&client).unwrap();
        assert_eq!(certificate_names(&pem.contents), vec!["cbcr-client".to_string()]);
        let (a, _) = issue(dir.path(), "db1.tenant-a").unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&std::fs::read(&a).unwrap()).unwrap();
        assert_eq!(certificate_names(&pem.contents), vec!["db1.tenant-a".to_string()]);
        issue(dir.path(), "db2").unwrap();
        revoke(dir.path(), "db1.tenant-a").unwrap();
        let crl = revoke(dir.path(), "db2").unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&std::fs::read(crl).unwrap()).unwrap();
        let (_, crl) = x509_parser::parse_x509_crl(&pem.contents).unwrap();
        assert_eq!(crl.iter_revoked_certificates().count(), 2, "the second revocation keeps the first");
        assert!(issue(dir.path(), "../x").is_err() && issue(dir.path(), "ca").is_err());
        assert!(certificate_names(b"not a certificate").is_empty());
    }
}
