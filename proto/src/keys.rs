//! Key files and the four key types of pwsync.
//!
//! | type | algorithm | who holds the private half | used for |
//! |---|---|---|---|
//! | [`SigningKey`] / [`VerifyingKey`] | Ed25519 | each agent, the relay, each consumer group | envelopes, acks, deliveries, commits |
//! | [`DecryptionKey`] / [`EncryptionKey`] | RSA-OAEP-SHA256, 3072 bits by default | consumers | wrapping the per-epoch AES data key |
//!
//! Files are PEM: private keys as PKCS#8 `PRIVATE KEY`, public keys as X.509
//! `SubjectPublicKeyInfo` `PUBLIC KEY`, so `openssl pkey` reads them. Private key files are
//! created with mode 0600 and never overwritten, and loading one that group or others can read,
//! that another user owns, or that is a symbolic link is refused with an error that names the file
//! and the fix ([`check_private_mode`]). A key's [`KeyId`] is the SHA-256 of its
//! public key's DER.

use crate::error::KeyError;
use crate::ids::KeyId;
use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, ParsedPublicKey, ED25519};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use zeroize::Zeroizing;

const PRIVATE_TAG: &str = "PRIVATE KEY";
const PUBLIC_TAG: &str = "PUBLIC KEY";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), followed by the 32 key bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Length of an Ed25519 signature.
pub const SIGNATURE_BYTES: usize = 64;

fn invalid(path: &Path, expected: &'static str, reason: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        path: path.to_path_buf(),
        expected,
        reason: reason.into(),
    }
}

/// Writes a PEM file, refusing to overwrite. Private keys get mode 0600 from creation on.
fn write_pem(path: &Path, tag: &str, der: &[u8], private: bool) -> Result<(), KeyError> {
    let text = Zeroizing::new(pem::encode(&pem::Pem::new(tag, der)));
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_path_buf()),
            _ => KeyError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Refuses a private file (key, password, token) that others may read, or that a group other
/// than this process's own may read: 0600, or 0640 with the service's group (root owns the
/// file, the daemon's group reads it). Also refuses a symbolic link (the file is checked, not
/// what a link points to today) and a file owned by anyone but this process's effective user or
/// root (its owner could replace it, or chmod it open, at any time).
pub fn check_private_mode(path: &Path) -> Result<(), KeyError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.file_type().is_symlink() {
        return Err(KeyError::Symlink {
            path: path.to_path_buf(),
            target: std::fs::read_link(path).unwrap_or_default(),
        });
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(KeyError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    // SAFETY: getegid has no preconditions.
    let service_group = meta.gid() == unsafe { libc::getegid() };
    let group_read_only = mode & 0o037 == 0;
    if mode & 0o077 != 0 && !(group_read_only && service_group) {
        return Err(KeyError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn read_pem(
    path: &Path,
    tag: &str,
    expected: &'static str,
    private: bool,
) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    if private {
        check_private_mode(path)?;
    }
    let text = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?);
    parse_pem(&text, tag).map_err(|reason| invalid(path, expected, reason))
}

fn parse_pem(text: &[u8], tag: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    let parsed = pem::parse(text).map_err(|e| format!("not PEM ({e})"))?;
    if parsed.tag() != tag {
        return Err(format!("PEM block is {:?}, expected {tag:?}", parsed.tag()));
    }
    Ok(Zeroizing::new(parsed.into_contents()))
}

/// An Ed25519 private key: signs envelopes (agents), acks and deliveries (relay), commits (groups).
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.verifying_key().key_id())
    }
}

impl SigningKey {
    pub fn generate() -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::generate().map_err(|e| KeyError::Generate(e.to_string()))?;
        Ok(SigningKey { pair })
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(|pair| SigningKey { pair })
            .map_err(|e| format!("not an Ed25519 PKCS#8 key ({e})"))
    }

    /// Parses PEM text (for keys embedded in tests and golden vectors).
    pub fn from_pem(text: &str) -> Result<Self, String> {
        Self::from_pkcs8_der(&parse_pem(text.as_bytes(), PRIVATE_TAG)?)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let der = read_pem(path, PRIVATE_TAG, "Ed25519 private key", true)?;
        Self::from_pkcs8_der(&der).map_err(|r| invalid(path, "Ed25519 private key", r))
    }

    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let der = AsDer::<Pkcs8V1Der>::as_der(&self.pair)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        write_pem(path, PRIVATE_TAG, der.as_ref(), true)
    }

    pub fn sign(&self, message: &[u8]) -> [u8; SIGNATURE_BYTES] {
        let mut out = [0u8; SIGNATURE_BYTES];
        out.copy_from_slice(self.pair.sign(message).as_ref());
        out
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(self.pair.public_key().as_ref());
        // The public half of a key pair aws-lc-rs generated or validated: always parsable.
        #[allow(clippy::expect_used)]
        VerifyingKey::try_from_raw(raw).expect("the public half of a valid Ed25519 key pair")
    }
}

/// An Ed25519 public key.
#[derive(Clone)]
pub struct VerifyingKey {
    raw: [u8; 32],
    parsed: std::sync::Arc<ParsedPublicKey>,
}

impl PartialEq for VerifyingKey {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}
impl Eq for VerifyingKey {}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.key_id())
    }
}

impl VerifyingKey {
    fn try_from_raw(raw: [u8; 32]) -> Result<Self, String> {
        let parsed = ParsedPublicKey::new(&ED25519, raw)
            .map_err(|e| format!("not an Ed25519 public key ({e})"))?;
        Ok(VerifyingKey {
            raw,
            parsed: std::sync::Arc::new(parsed),
        })
    }

    pub fn from_spki_der(der: &[u8]) -> Result<Self, String> {
        match der.strip_prefix(&ED25519_SPKI_PREFIX[..]) {
            Some(raw) if raw.len() == 32 => {
                let mut key = [0u8; 32];
                key.copy_from_slice(raw);
                Self::try_from_raw(key)
            }
            _ => Err("not an Ed25519 SubjectPublicKeyInfo".into()),
        }
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        Self::from_spki_der(&parse_pem(text.as_bytes(), PUBLIC_TAG)?)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let der = read_pem(path, PUBLIC_TAG, "Ed25519 public key", false)?;
        Self::from_spki_der(&der).map_err(|r| invalid(path, "Ed25519 public key", r))
    }

    pub fn spki_der(&self) -> Vec<u8> {
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.raw);
        der
    }

    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new(PUBLIC_TAG, self.spki_der()))
    }

    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        write_pem(path, PUBLIC_TAG, &self.spki_der(), false)
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of_public_der(&self.spki_der())
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        signature.len() == SIGNATURE_BYTES && self.parsed.verify_sig(message, signature).is_ok()
    }
}

/// A consumer's RSA private key: unwraps the data keys agents sealed for it.
pub struct DecryptionKey {
    oaep: OaepPrivateDecryptingKey,
    der: Zeroizing<Vec<u8>>,
    public: EncryptionKey,
}

impl std::fmt::Debug for DecryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DecryptionKey({})", self.public.key_id())
    }
}

/// RSA modulus sizes pwsync generates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaBits {
    Rsa2048,
    Rsa3072,
    Rsa4096,
}

impl DecryptionKey {
    /// A new 3072-bit key (the default; ~128-bit security).
    pub fn generate() -> Result<Self, KeyError> {
        Self::generate_bits(RsaBits::Rsa3072)
    }

    pub fn generate_bits(bits: RsaBits) -> Result<Self, KeyError> {
        let size = match bits {
            RsaBits::Rsa2048 => KeySize::Rsa2048,
            RsaBits::Rsa3072 => KeySize::Rsa3072,
            RsaBits::Rsa4096 => KeySize::Rsa4096,
        };
        let key =
            PrivateDecryptingKey::generate(size).map_err(|e| KeyError::Generate(e.to_string()))?;
        let der =
            AsDer::<Pkcs8V1Der>::as_der(&key).map_err(|e| KeyError::Generate(e.to_string()))?;
        Self::from_pkcs8_der(der.as_ref()).map_err(KeyError::Generate)
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, String> {
        let key = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|e| format!("not an RSA PKCS#8 key ({e})"))?;
        if key.key_size_bits() < 2048 {
            return Err(format!(
                "RSA key of {} bits is too small (at least 2048)",
                key.key_size_bits()
            ));
        }
        let public = EncryptionKey::from_public(key.public_key()).map_err(|e| e.to_string())?;
        let oaep = OaepPrivateDecryptingKey::new(key).map_err(|e| e.to_string())?;
        Ok(DecryptionKey {
            oaep,
            der: Zeroizing::new(der.to_vec()),
            public,
        })
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        Self::from_pkcs8_der(&parse_pem(text.as_bytes(), PRIVATE_TAG)?)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let der = read_pem(path, PRIVATE_TAG, "RSA private key", true)?;
        Self::from_pkcs8_der(&der).map_err(|r| invalid(path, "RSA private key", r))
    }

    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        write_pem(path, PRIVATE_TAG, &self.der, true)
    }

    pub fn encryption_key(&self) -> &EncryptionKey {
        &self.public
    }

    pub fn key_id(&self) -> KeyId {
        self.public.key_id()
    }

    /// RSA-OAEP-SHA256 decryption of a wrapped 256-bit data key. The private-key operation.
    pub fn unwrap_data_key(&self, wrapped: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        let mut out = Zeroizing::new(vec![0u8; self.oaep.min_output_size()]);
        let plain = self
            .oaep
            .decrypt(&OAEP_SHA256_MGF1SHA256, wrapped, &mut out, None)
            .ok()?;
        if plain.len() != 32 {
            return None;
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(plain);
        Some(key)
    }
}

/// A consumer's RSA public key, held by agents to wrap their data keys.
#[derive(Clone)]
pub struct EncryptionKey {
    oaep: std::sync::Arc<OaepPublicEncryptingKey>,
    der: Vec<u8>,
    id: KeyId,
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncryptionKey({})", self.id)
    }
}

impl EncryptionKey {
    fn from_public(key: PublicEncryptingKey) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let der = AsDer::<PublicKeyX509Der>::as_der(&key)?.as_ref().to_vec();
        let id = KeyId::of_public_der(&der);
        Ok(EncryptionKey {
            oaep: std::sync::Arc::new(OaepPublicEncryptingKey::new(key)?),
            der,
            id,
        })
    }

    pub fn from_spki_der(der: &[u8]) -> Result<Self, String> {
        let key = PublicEncryptingKey::from_der(der)
            .map_err(|e| format!("not an RSA public key ({e})"))?;
        if key.key_size_bits() < 2048 {
            return Err(format!(
                "RSA key of {} bits is too small (at least 2048)",
                key.key_size_bits()
            ));
        }
        Self::from_public(key).map_err(|e| e.to_string())
    }

    pub fn from_pem(text: &str) -> Result<Self, String> {
        Self::from_spki_der(&parse_pem(text.as_bytes(), PUBLIC_TAG)?)
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let der = read_pem(path, PUBLIC_TAG, "RSA public key", false)?;
        Self::from_spki_der(&der).map_err(|r| invalid(path, "RSA public key", r))
    }

    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        write_pem(path, PUBLIC_TAG, &self.der, false)
    }

    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new(PUBLIC_TAG, self.der.clone()))
    }

    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// RSA-OAEP-SHA256 encryption of a 256-bit data key.
    pub fn wrap_data_key(&self, key: &[u8; 32]) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
        let mut out = vec![0u8; self.oaep.ciphertext_size()];
        let len = self
            .oaep
            .encrypt(&OAEP_SHA256_MGF1SHA256, key, &mut out, None)?
            .len();
        out.truncate(len);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_written_0600_and_0644_refused_with_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.key");
        let key = SigningKey::generate().unwrap();
        key.save(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            SigningKey::load(&path).unwrap().verifying_key(),
            key.verifying_key()
        );

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SigningKey::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains("0644"), "{err}");

        // 0640 is accepted when the group is this process's own (the service group), and
        // refused for any other group.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(SigningKey::load(&path).is_ok());
        // SAFETY: getegid has no preconditions.
        let other = if unsafe { libc::getegid() } == 65534 {
            0
        } else {
            65534
        };
        let c_path = std::ffi::CString::new(path.display().to_string()).unwrap();
        // SAFETY: chown of a file this test created; -1 keeps the owner.
        if unsafe { libc::chown(c_path.as_ptr(), u32::MAX, other) } == 0 {
            assert!(matches!(
                SigningKey::load(&path),
                Err(KeyError::TooOpen { .. })
            ));
        }
    }

    #[test]
    fn a_private_file_that_is_a_symlink_is_refused_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.key");
        SigningKey::generate().unwrap().save(&real).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let err = SigningKey::load(&link).unwrap_err();
        assert!(matches!(err, KeyError::Symlink { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains(&link.display().to_string()), "{err}");
        assert!(err.contains(&real.display().to_string()), "{err}");
        assert!(err.contains("point the config at the real file"), "{err}");
        assert!(check_private_mode(&real).is_ok());
        // Also a dangling link, and a link to a password file (the same check).
        std::fs::remove_file(&real).unwrap();
        assert!(matches!(
            check_private_mode(&link),
            Err(KeyError::Symlink { .. })
        ));
    }

    #[test]
    fn a_private_file_owned_by_another_user_is_refused_and_roots_0640_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.key");
        SigningKey::generate().unwrap().save(&path).unwrap();
        let c_path = std::ffi::CString::new(path.display().to_string()).unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if me != 0 {
            // Only root can give a file away.
            assert!(
                std::env::var_os("CI").is_none(),
                "in CI this test runs as root, to chown a file to another user"
            );
            eprintln!("skipped the other-owner case: not root");
            return;
        }
        // Root-owned, 0640 with this process's group: accepted (deploy/KEYS.md).
        // SAFETY: getegid has no preconditions.
        let gid = unsafe { libc::getegid() };
        // SAFETY: chown of a file this test created.
        assert_eq!(unsafe { libc::chown(c_path.as_ptr(), 0, gid) }, 0);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(SigningKey::load(&path).is_ok());
        // Owned by nobody (65534): refused, whatever the mode.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        // SAFETY: chown of a file this test created; -1 keeps the group.
        assert_eq!(unsafe { libc::chown(c_path.as_ptr(), 65534, u32::MAX) }, 0);
        let err = SigningKey::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::NotOwned { owner: 65534, .. }),
            "{err}"
        );
        let err = err.to_string();
        assert!(
            err.contains(&format!("chown {me} {}", path.display())),
            "{err}"
        );
        assert!(err.contains("uid 65534"), "{err}");
    }

    #[test]
    fn keys_are_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        SigningKey::generate().unwrap().save(&path).unwrap();
        assert!(matches!(
            SigningKey::generate().unwrap().save(&path),
            Err(KeyError::Exists(_))
        ));
    }

    #[test]
    fn rsa_and_ed25519_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let key = DecryptionKey::generate_bits(RsaBits::Rsa2048).unwrap();
        key.save(&dir.path().join("c.key")).unwrap();
        key.encryption_key()
            .save(&dir.path().join("c.pub"))
            .unwrap();
        let loaded = DecryptionKey::load(&dir.path().join("c.key")).unwrap();
        let public = EncryptionKey::load(&dir.path().join("c.pub")).unwrap();
        assert_eq!(loaded.key_id(), public.key_id());
        let wrapped = public.wrap_data_key(&[7u8; 32]).unwrap();
        assert_eq!(*loaded.unwrap_data_key(&wrapped).unwrap(), [7u8; 32]);

        let sk = SigningKey::generate().unwrap();
        sk.verifying_key().save(&dir.path().join("a.pub")).unwrap();
        let vk = VerifyingKey::load(&dir.path().join("a.pub")).unwrap();
        assert!(vk.verify(b"m", &sk.sign(b"m")));
        assert!(!vk.verify(b"n", &sk.sign(b"m")));
        // The wrong kind of key in a file is named as such.
        let err = SigningKey::load(&dir.path().join("c.key"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("Ed25519"), "{err}");
    }
}
