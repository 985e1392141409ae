//! rustls configuration for the mesh: the coordinator's mTLS server config, the client
//! config peers use (trusting only the mesh CA, never system roots), and reading the
//! identity (certificate CN) of a verified client. One crypto provider: ring, passed
//! explicitly, so nothing depends on a process-wide default.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem, "CA")? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// The coordinator's server config: serves `cert_pem`/`key_pem` and requires a client
/// certificate signed by `ca_pem`.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "server certificate")?, key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
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

/// The CN of the first certificate of a verified chain.
pub fn common_name(chain: Option<&[CertificateDer<'_>]>) -> Option<String> {
    let der = chain?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
