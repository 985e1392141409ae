//! The client side of the mesh's TLS: the rustls config peers use towards the coordinator
//! (trusting only the mesh CA, never system roots, and presenting the member's
//! certificate), and the PEM readers the coordinator's server config shares. One crypto
//! provider: ring, passed explicitly, so nothing depends on a process-wide default.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM input held no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(&'static str),
    /// A PEM input held no private key.
    #[error("no private key found")]
    NoKey,
    /// PEM could not be read.
    #[error("reading PEM: {0}")]
    Pem(#[from] std::io::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider every config here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Certificates in a PEM text.
pub fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// The first private key in a PEM text.
pub fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())?.ok_or(TlsError::NoKey)
}

/// The mesh CA of `ca_pem` as the only trust root.
pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA")? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// A client config that trusts only `ca_pem` and, if given, presents `client` (cert PEM,
/// key PEM) — what a joiner uses to talk to the coordinator.
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match client {
        Some((cert, k)) => {
            builder.with_client_auth_cert(certs(cert, "client certificate")?, key(k)?)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
