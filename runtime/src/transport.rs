//! How a pwsync client (agent, consumer, relay on an external broker) reaches an MQTT listener:
//! TLS and its login. One `[transport]` section, the same in every component's config.
//!
//! Guarantees: TLS is on unless the config says `insecure_plaintext = true`, and then every start
//! logs a warning; the server is verified against `ca_file` (or the system's roots); the login's
//! password is read from a private file (mode 0600), never from the config, and is wiped from
//! this side's buffers once handed to the MQTT client.

use crate::resolve;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// The CA (PEM) that signed the relay's certificate. Default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (mode 0600), when the relay asks for one (mTLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The login `pwsync-relay enroll` printed (`agent:NAME` or `consumer:GROUP`).
    #[serde(default)]
    pub username: Option<String>,
    /// The file `pwsync-relay enroll` wrote the login's password to (mode 0600).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Speak plain TCP. Only for a broker on the same host or a test; warned at every start.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("[transport] has cert_file without key_file or key_file without cert_file; give both for a client certificate")]
    HalfClientCert,
    #[error("[transport] has username without password_file (or the reverse); `pwsync-relay enroll` gives both")]
    HalfLogin,
    #[error("[transport] password_file {path}: {why}")]
    PasswordFile { path: PathBuf, why: String },
    #[error("[transport] TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl TransportConfig {
    /// Makes the config's relative paths relative to the config file `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [
            &mut self.ca_file,
            &mut self.cert_file,
            &mut self.key_file,
            &mut self.password_file,
        ]
        .into_iter()
        .flatten()
        {
            *p = resolve(base, p);
        }
    }

    /// Checks what can be checked without connecting: pairs complete, files readable and
    /// private, the CA parseable.
    pub fn validate(&self) -> Result<(), TransportError> {
        let mut probe = rumqttc::MqttOptions::new("probe", "127.0.0.1", 1);
        self.apply(&mut probe)
    }

    /// Sets `options`' transport (TLS or, if configured so, plain TCP) and login.
    pub fn apply(&self, options: &mut rumqttc::MqttOptions) -> Result<(), TransportError> {
        match (&self.username, &self.password_file) {
            (Some(user), Some(file)) => {
                let password = read_password(file)?;
                options.set_credentials(user.clone(), password.as_str());
            }
            (None, None) => {}
            _ => return Err(TransportError::HalfLogin),
        }
        if self.insecure_plaintext {
            options.set_transport(rumqttc::Transport::Tcp);
            return Ok(());
        }
        let client = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => return Err(TransportError::HalfClientCert),
        };
        let config = crate::tls::client_config(self.ca_file.as_deref(), client)?;
        options.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
        Ok(())
    }

    /// Logs how this client will connect; a warning when it is without TLS.
    pub fn log_mode(&self, peer: &str) {
        if self.insecure_plaintext {
            tracing::warn!(
                peer,
                "insecure_plaintext = true: MQTT to the relay is NOT encrypted; use it only on one host or in a test"
            );
        } else {
            tracing::info!(peer, ca = ?self.ca_file, client_cert = self.cert_file.is_some(), "MQTT over TLS");
        }
    }
}

/// A password file's first line, refused unless the file is private.
pub fn read_password(file: &Path) -> Result<Zeroizing<String>, TransportError> {
    let err = |why: String| TransportError::PasswordFile {
        path: file.into(),
        why,
    };
    pwsync_proto::keys::check_private_mode(file).map_err(|e| err(e.to_string()))?;
    let text = Zeroizing::new(std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?);
    let line = Zeroizing::new(text.lines().next().unwrap_or("").to_string());
    if line.is_empty() {
        return Err(err("it is empty".into()));
    }
    Ok(line)
}
