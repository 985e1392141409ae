//! The coordinator's side of the mesh's TLS: its mTLS server config and reading the
//! identity (certificate CN) and role (the [`ADMIN_ROLE_URI`] SAN) of a verified client. The client config and the PEM readers
//! are shared with the joiner in [`tabbify_api::tls`].

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
pub use tabbify_api::tls::{certs, client_config, key, provider, roots, TlsError};
pub use tabbify_api::ADMIN_ROLE_URI;

/// The coordinator's server config: serves `cert_pem`/`key_pem` and verifies a client
/// certificate against `ca_pem`. The certificate is optional at the TLS layer, so a load
/// balancer's health check and a browser reach the open routes (`/health`,
/// `/openapi.json`, `/swagger-ui`, `/ui`); every other route refuses a connection without
/// one (401, [`crate::server`]). A certificate that is presented must verify, or the
/// handshake fails.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    ca_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert_pem, "server certificate")?, key(key_pem)?)?;
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

/// Whether the first certificate of a verified chain carries the admin role: a URI
/// subject alternative name equal to [`ADMIN_ROLE_URI`]. Only the CA's `issue-admin`
/// writes it, so a peer certificate cannot claim the role by its name.
pub fn has_admin_role(chain: Option<&[CertificateDer<'_>]>) -> bool {
    let Some(der) = chain.and_then(|c| c.first()) else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == ADMIN_ROLE_URI))
}
