//! Strict postcard decoding shared by every message type.
//!
//! Every pwsync message starts with a format version byte, checked by name before anything else
//! is read. Decoding uses `take_from_bytes` and refuses trailing bytes, and the input length is
//! checked against a limit first, so no decoder allocates more than its input could hold.

use crate::error::DecodeError;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Decodes exactly one `T` from `bytes`: every byte must be used.
pub fn decode_exact<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| DecodeError::Malformed {
            what,
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            what,
            extra: rest.len(),
        });
    }
    Ok(value)
}

/// Checks the length limit and the version byte; returns the bytes after the version.
pub fn check_frame<'a>(
    what: &'static str,
    bytes: &'a [u8],
    max: usize,
    version: u8,
) -> Result<&'a [u8], DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (&first, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if first != version {
        return Err(DecodeError::UnknownVersion {
            what,
            version: first,
            supported: version,
        });
    }
    Ok(rest)
}

/// Encodes with postcard. Only fails for types serde cannot encode, which none of ours are.
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, DecodeError> {
    postcard::to_allocvec(value).map_err(|e| DecodeError::Malformed {
        what,
        reason: e.to_string(),
    })
}

/// `version · postcard(value)`: how every stored record (spool, journal) is written.
pub fn encode_versioned<T: Serialize>(
    what: &'static str,
    version: u8,
    value: &T,
) -> Result<Vec<u8>, DecodeError> {
    let mut out = vec![version];
    out.extend(encode(what, value)?);
    Ok(out)
}

/// Reads what [`encode_versioned`] wrote: the version byte is checked by name, every byte used.
pub fn decode_versioned<T: DeserializeOwned>(
    what: &'static str,
    version: u8,
    bytes: &[u8],
) -> Result<T, DecodeError> {
    decode_exact(what, check_frame(what, bytes, usize::MAX, version)?)
}
