//! A private certificate authority for pwsync's TLS: the CA `quickstart` creates, and the server
//! and client certificates it issues for the relay's listener and for the clients (mTLS).
//!
//! Keys are ECDSA P-256, made with aws-lc-rs. Every private key leaves this module in a
//! zeroizing PEM string that the caller writes with mode 0600 ([`write_private`]); nothing here
//! logs or prints one. A CA is reloaded from its two PEM files to issue more certificates later,
//! so the CA key need never exist anywhere but the relay host. Certificates are valid from a year
//! ago (clock skew) for ten years.

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

/// A CA able to issue certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn params(common_name: &str, names: &[&str]) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.distinguished_name
        .push(DnType::OrganizationName, "pwsync");
    let year = this_year();
    p.not_before = date_time_ymd(year - 1, 1, 1);
    p.not_after = date_time_ymd(year + 10, 1, 1);
    Ok(p)
}

fn ca_params(common_name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = params(common_name, &[])?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate(common_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let params = ca_params(common_name)?;
        let cert_pem = params.self_signed(&key)?.pem();
        let key_pem = Zeroizing::new(key.serialize_pem());
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
            key_pem,
        })
    }

    /// The CA in `cert_file` with its key in `key_file` (which must be private).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Ca, PkiError> {
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| PkiError::Io { path: p, source }
        };
        pwsync_proto::keys::check_private_mode(key_file).map_err(|e| PkiError::Io {
            path: key_file.display().to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let cert_pem = std::fs::read_to_string(cert_file).map_err(io(cert_file))?;
        let key_pem = Zeroizing::new(std::fs::read_to_string(key_file).map_err(io(key_file))?);
        let key = KeyPair::from_pem(&key_pem)?;
        Ok(Ca {
            issuer: Issuer::from_ca_cert_pem(&cert_pem, key)?,
            cert_pem,
            key_pem,
        })
    }

    fn issue(&self, params: CertificateParams) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// A server certificate for the host names and IP addresses in `names`.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let mut p = params(names.first().copied().unwrap_or("pwsync"), names)?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(p)
    }

    /// A certificate for a peer that both serves and dials others with it (a NATS cluster
    /// route: server and client authentication).
    pub fn issue_peer(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let mut p = params(names.first().copied().unwrap_or("pwsync"), names)?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(p)
    }

    /// A client certificate whose common name is `name` (mTLS).
    pub fn issue_client(&self, name: &str) -> Result<Issued, PkiError> {
        let mut p = params(name, &[])?;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p)
    }
}

/// Writes `contents` to a new file readable by its owner only (0600), replacing any old one.
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_ca_issues_certificates_its_clients_trust() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test CA").unwrap();
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        write_private(&key, &ca.key_pem).unwrap();
        let again = Ca::load(&cert, &key).unwrap();
        let server = again.issue_server(&["127.0.0.1", "localhost"]).unwrap();
        assert!(server.cert_pem.contains("BEGIN CERTIFICATE"));
        // A client trusting the CA file accepts the server certificate the reloaded CA signed.
        let roots = pwsync_runtime::tls::roots(Some(&cert)).unwrap();
        assert_eq!(roots.len(), 1);
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(
            Ca::load(&cert, &key).is_err(),
            "a readable CA key is refused"
        );
    }
}
