//! Typed errors of the wire format. Messages say what happened and never carry secret bytes.

use std::path::PathBuf;

/// A byte string could not be decoded into a pwsync message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error(
        "unknown {what} format version {version} (this build understands version {supported})"
    )]
    UnknownVersion {
        what: &'static str,
        version: u8,
        supported: u8,
    },
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{what} has {extra} trailing bytes after its end")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

/// An envelope or signed message could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot decode: {0}")]
    Decode(#[from] DecodeError),
    #[error("bad signature: the message was not signed by the expected key or was altered")]
    BadSignature,
    #[error("sealed for key {0}, which this consumer does not hold")]
    UnknownKey(String),
    #[error("the data key could not be unwrapped with key {0}")]
    KeyUnwrap(String),
    #[error("decryption failed: ciphertext or header altered")]
    Decrypt,
    #[error("sealing failed: {0}")]
    Seal(String),
}

/// A key could not be generated, read or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to overwrite existing key file {0}; move it away first if you mean to replace it"
    )]
    Exists(PathBuf),
    #[error(
        "private key file {path} has mode {mode:04o}: group or others can read it; \
         fix it with `chmod 600 {path}` (or 0640 with the group the daemon runs as)"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "private file {path} is a symbolic link (to {target}): whoever can change the link \
         could swap the file; point the config at the real file"
    )]
    Symlink { path: PathBuf, target: PathBuf },
    #[error(
        "private file {path} is owned by uid {owner}, neither this process's user (uid {me}) nor \
         root, so that user could replace or read it; fix it with `chown {me} {path}` (or \
         `chown root:GROUP` with mode 0640 and the group the daemon runs as)"
    )]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    #[error("key file {path} is not a valid {expected}: {reason}")]
    Invalid {
        path: PathBuf,
        expected: &'static str,
        reason: String,
    },
    #[error("key generation failed: {0}")]
    Generate(String),
}
