//! Mutual TLS for TCP listeners and for clients: PEM files in, rustls
//! configs (ring provider) out. The server accepts only clients whose
//! certificate chains to the given CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The three PEM files of one side of a mutual-TLS connection.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate (chain).
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
    /// The CA the other side's certificate must chain to.
    pub ca: PathBuf,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: bad PEM certificate", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate in the file", path.display());
    Ok(certs)
}

fn key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).with_context(|| format!("{}: no usable PEM private key", path.display()))
}

fn roots(path: &Path) -> anyhow::Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).with_context(|| format!("{}: bad CA certificate", path.display()))?;
    }
    Ok(Arc::new(roots))
}

/// The server side: present `files.cert`, require a client certificate
/// signed by `files.ca`.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
        .build()
        .context("building the client certificate verifier")?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)
        .context("the daemon's certificate and key do not match")?;
    Ok(Arc::new(config))
}

/// The client side: trust `files.ca` for the daemon, present `files.cert`.
pub fn client_config(files: &TlsFiles) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)
        .context("the client certificate and key do not match")?;
    Ok(Arc::new(config))
}
