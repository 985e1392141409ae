//! The mesh certificate authority: mints the CA, peer client certificates (CN = peer name),
//! admin client certificates (CN = admin name plus the admin role SAN) and coordinator
//! server certificates, and writes them to disk.
//!
//! Invariants: every key is ECDSA P-256; every private key file is created with mode 0600
//! and no file is ever overwritten unless the caller passes `force`. Files in a directory
//! written here: `ca.pem` (the CA certificate, also copied next to every issued
//! certificate so the holder knows which CA to trust), `cert.pem` and `key.pem` (an issued
//! certificate and its key) or `ca.key` (the CA's key, only in the CA directory).

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// File name of a CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (only in the CA directory).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of an issued certificate.
pub const CERT_FILE: &str = "cert.pem";
/// File name of an issued certificate's private key.
pub const KEY_FILE: &str = "key.pem";

/// Default lifetime of the CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Default lifetime of an issued certificate.
pub const LEAF_VALIDITY_DAYS: i64 = 365;

/// What can go wrong while minting or storing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused to build or sign the certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file exists and `force` was not given.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    /// A name is not usable as a certificate common name.
    #[error("invalid name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    InvalidName(String),
    /// The validity window is empty.
    #[error("the validity window is empty (not_after is not after not_before)")]
    EmptyValidity,
}

/// A certificate's validity window.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: OffsetDateTime,
    /// Last instant the certificate is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from one hour ago (clock skew) for `days` days.
    pub fn days_from_now(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }
}

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM.
    pub key_pem: String,
}

/// A loaded or freshly generated CA: its certificate and its signing key.
#[derive(Debug, Clone)]
pub struct Ca {
    cert_pem: String,
    key_pem: String,
}

/// Checks that `name` is usable as a common name (and as a peer identity).
pub fn validate_name(name: &str) -> Result<(), CaError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CaError::InvalidName(name.to_owned()))
    }
}

impl Ca {
    /// Generates a new CA named `name`, valid for `validity`.
    pub fn generate(name: &str, validity: Validity) -> Result<Self, CaError> {
        validate_name(name)?;
        check_validity(&validity)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = common_name(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Loads the CA from `dir` (`ca.pem` and `ca.key`).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_pem = read(&dir.join(CA_CERT_FILE))?;
        let key_pem = read(&dir.join(CA_KEY_FILE))?;
        // Parse both now so that a broken CA directory fails here, not at signing time.
        let key = KeyPair::from_pem(&key_pem)?;
        Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { cert_pem, key_pem })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a client certificate for the peer `name` (CN = `name`, client-auth usage).
    pub fn issue_peer(&self, name: &str, validity: Validity) -> Result<Issued, CaError> {
        validate_name(name)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, params, validity)
    }

    /// Issues an admin client certificate for `name`: CN = `name`, client-auth usage,
    /// and the admin role as the URI SAN [`ADMIN_ROLE_URI`](tabbify_api::ADMIN_ROLE_URI).
    /// The role is in the certificate, not the name: [`Ca::issue_peer`] never writes a
    /// SAN, so no peer certificate is an admin, whatever it is called.
    pub fn issue_admin(&self, name: &str, validity: Validity) -> Result<Issued, CaError> {
        validate_name(name)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![SanType::URI(tabbify_api::ADMIN_ROLE_URI.try_into()?)];
        self.issue(name, params, validity)
    }

    /// Issues a server certificate for the coordinator `name`; `name` and every entry of
    /// `sans` become subject alternative names (IP literals as IP SANs, the rest as DNS).
    pub fn issue_coordinator(
        &self,
        name: &str,
        sans: &[String],
        validity: Validity,
    ) -> Result<Issued, CaError> {
        validate_name(name)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut names: Vec<&str> = vec![name];
        names.extend(sans.iter().map(String::as_str));
        for san in names {
            let san_type = match san.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    validate_name(san)?;
                    SanType::DnsName(san.try_into()?)
                }
            };
            if !params.subject_alt_names.contains(&san_type) {
                params.subject_alt_names.push(san_type);
            }
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(name, params, validity)
    }

    fn issue(
        &self,
        name: &str,
        mut params: CertificateParams,
        validity: Validity,
    ) -> Result<Issued, CaError> {
        check_validity(&validity)?;
        params.distinguished_name = common_name(name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem` and `ca.key` (0600) into `dir`, creating it.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(), CaError> {
        create_dir(dir)?;
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        refuse_existing(&[&cert, &key], force)?;
        write_file(&key, self.key_pem.as_bytes(), 0o600)?;
        write_file(&cert, self.cert_pem.as_bytes(), 0o644)
    }

    /// Writes an issued certificate into `dir`: `cert.pem`, `key.pem` (0600) and a copy of
    /// this CA's certificate as `ca.pem`.
    pub fn write_issued(&self, issued: &Issued, dir: &Path, force: bool) -> Result<(), CaError> {
        create_dir(dir)?;
        let cert = dir.join(CERT_FILE);
        let key = dir.join(KEY_FILE);
        let ca = dir.join(CA_CERT_FILE);
        refuse_existing(&[&cert, &key, &ca], force)?;
        write_file(&key, issued.key_pem.as_bytes(), 0o600)?;
        write_file(&cert, issued.cert_pem.as_bytes(), 0o644)?;
        write_file(&ca, self.cert_pem.as_bytes(), 0o644)
    }
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn check_validity(validity: &Validity) -> Result<(), CaError> {
    if validity.not_after <= validity.not_before {
        return Err(CaError::EmptyValidity);
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_owned(),
        source,
    })
}

fn refuse_existing(paths: &[&PathBuf], force: bool) -> Result<(), CaError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CaError::Exists((*p).clone())),
        None => Ok(()),
    }
}

/// Writes `bytes` to `path` with `mode`. A new file is created with `mode` from the start
/// (never world-readable, even briefly); an existing one (only reached with `force`) is
/// removed first so that its old permissions do not carry over.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(pem: &str) -> Vec<u8> {
        let der = rustls_pemfile::certs(&mut pem.as_bytes())
            .next()
            .unwrap()
            .unwrap();
        der.to_vec()
    }

    #[test]
    fn peer_cert_has_cn_and_is_signed_by_ca() {
        let ca = Ca::generate("mesh-ca", Validity::days_from_now(10)).unwrap();
        let peer = ca.issue_peer("node-1", Validity::days_from_now(1)).unwrap();
        let der = parse(&peer.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "node-1");
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        // A real chain check, as the coordinator's TLS stack does it.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone().into()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider,
        )
        .build()
        .unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(&der.clone().into(), &[], now)
            .unwrap();
        let stranger = Ca::generate("other-ca", Validity::days_from_now(10)).unwrap();
        let foreign = stranger
            .issue_peer("node-1", Validity::days_from_now(1))
            .unwrap();
        let foreign_der = parse(&foreign.cert_pem);
        assert!(verifier
            .verify_client_cert(&foreign_der.into(), &[], now)
            .is_err());
    }

    #[test]
    fn only_issue_admin_grants_the_admin_role() {
        let ca = Ca::generate("mesh-ca", Validity::days_from_now(10)).unwrap();
        let admin = ca.issue_admin("ops-1", Validity::days_from_now(1)).unwrap();
        let der = parse(&admin.cert_pem);
        assert!(crate::tls::has_admin_role(Some(&[der.into()])));
        for name in ["admin", "ops-1", "urn.tabbify.role.admin"] {
            let peer = ca.issue_peer(name, Validity::days_from_now(1)).unwrap();
            let der = parse(&peer.cert_pem);
            assert!(!crate::tls::has_admin_role(Some(&[der.into()])), "{name}");
        }
        assert!(!crate::tls::has_admin_role(None));
    }

    #[test]
    fn coordinator_cert_carries_ip_and_dns_sans() {
        let ca = Ca::generate("mesh-ca", Validity::days_from_now(10)).unwrap();
        let server = ca
            .issue_coordinator(
                "coord",
                &["127.0.0.1".into(), "coord.example".into()],
                Validity::days_from_now(1),
            )
            .unwrap();
        let der = parse(&server.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", san.value.general_names);
        assert!(text.contains("coord.example"), "{text}");
        assert!(text.contains("coord"), "{text}");
        assert!(text.contains("IPAddress([127, 0, 0, 1])"), "{text}");
    }

    #[test]
    fn bad_names_are_rejected() {
        for name in ["", "a b", "x/y", &"n".repeat(65)] {
            assert!(matches!(validate_name(name), Err(CaError::InvalidName(_))));
        }
        validate_name("node-1.example_x").unwrap();
    }

    #[test]
    fn files_are_private_and_never_overwritten_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("mesh-ca", Validity::days_from_now(10)).unwrap();
        ca.write(dir.path(), false).unwrap();
        let key_mode = fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        let before = fs::read(dir.path().join(CA_KEY_FILE)).unwrap();
        let other = Ca::generate("other", Validity::days_from_now(10)).unwrap();
        assert!(matches!(
            other.write(dir.path(), false),
            Err(CaError::Exists(_))
        ));
        assert_eq!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);
        other.write(dir.path(), true).unwrap();
        assert_ne!(fs::read(dir.path().join(CA_KEY_FILE)).unwrap(), before);
        let loaded = Ca::load(dir.path()).unwrap();
        assert_eq!(loaded.cert_pem(), other.cert_pem());
    }

    #[test]
    fn empty_validity_is_rejected() {
        let now = OffsetDateTime::now_utc();
        let v = Validity {
            not_before: now,
            not_after: now - Duration::days(1),
        };
        assert!(matches!(Ca::generate("ca", v), Err(CaError::EmptyValidity)));
    }
}
