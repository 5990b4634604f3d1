//! TLS client settings shared by every pwsync component that connects to a server: the MQTT
//! clients (agents, consumers) and the targets that speak TLS (LDAPS/StartTLS).
//!
//! It owns one rule: a server is trusted only through the CA file the config names, or, when the
//! config names none, through the system's roots. A client certificate (mTLS) is optional and its
//! private key must be a private file (mode 0600, see [`pwsync_proto::keys::check_private_mode`]). The
//! crypto provider is always aws-lc-rs, named explicitly, so a build that links several providers
//! cannot panic choosing one.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use rustls::ClientConfig;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a TLS client configuration could not be built; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the CA file {path}: {why}")]
    CaFile { path: PathBuf, why: String },
    #[error("the CA file {0} holds no certificate (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCa(PathBuf),
    #[error("reading the client certificate {path}: {why}")]
    ClientCert { path: PathBuf, why: String },
    #[error("the client key {path}: {why}")]
    ClientKey { path: PathBuf, why: String },
    #[error("the system's root certificates could not be loaded: {0}")]
    SystemRoots(String),
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The certificates in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// A private key from a PEM file (PKCS#8, PKCS#1 or SEC1), refused unless the file is private.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    pwsync_proto::keys::check_private_mode(path).map_err(|e| e.to_string())?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| e.to_string())
}

/// The roots a client trusts: the certificates of `ca_file`, or the system's when `None`.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = load_certs(path).map_err(|why| TlsError::CaFile {
                path: path.into(),
                why,
            })?;
            if certs.is_empty() {
                return Err(TlsError::NoCa(path.into()));
            }
            for c in certs {
                store.add(c).map_err(|e| TlsError::CaFile {
                    path: path.into(),
                    why: e.to_string(),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            if found.certs.is_empty() {
                return Err(TlsError::SystemRoots(format!("{:?}", found.errors)));
            }
            let _ = store.add_parsable_certificates(found.certs);
        }
    }
    Ok(store)
}

/// A rustls client configuration: server verified against `ca_file` (or the system roots), and
/// with a client certificate when `client` names a certificate and a key file.
pub fn client_config(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file)?);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = load_certs(cert).map_err(|why| TlsError::ClientCert {
                path: cert.into(),
                why,
            })?;
            let key = load_private_key(key).map_err(|why| TlsError::ClientKey {
                path: key.into(),
                why,
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    Ok(Arc::new(config))
}
