//! The spool export file: how a dead host's backlog travels by hand from
//! `pwsync-agent spool export` to `pwsync-relay journal import`.
//!
//! ```text
//! file   = magic "PWSYNCX1" · record*
//! record = length:u32le · encoded Envelope
//! ```
//! Envelopes stay sealed and signed, so the file holds no cleartext and the relay verifies each
//! one as if it had arrived over MQTT.

use crate::envelope::Envelope;
use crate::error::DecodeError;
use crate::limits::MAX_ENVELOPE_BYTES;
use std::io::{Read, Write};

pub const MAGIC: &[u8; 8] = b"PWSYNCX1";

pub fn write_header<W: Write>(w: &mut W) -> std::io::Result<()> {
    w.write_all(MAGIC)
}

pub fn write_record<W: Write>(w: &mut W, envelope: &[u8]) -> std::io::Result<()> {
    w.write_all(&(envelope.len() as u32).to_le_bytes())?;
    w.write_all(envelope)
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not a pwsync spool export (bad magic)")]
    BadMagic,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("record {index}: {source}")]
    Record { index: u64, source: DecodeError },
    #[error(
        "record {index} claims {len} bytes, more than an envelope can have; the file is damaged"
    )]
    TooLarge { index: u64, len: usize },
}

/// Reads an export file record by record.
pub struct ExportReader<R: Read> {
    r: R,
    index: u64,
}

impl<R: Read> ExportReader<R> {
    pub fn new(mut r: R) -> Result<Self, ImportError> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|_| ImportError::BadMagic)?;
        if &magic != MAGIC {
            return Err(ImportError::BadMagic);
        }
        Ok(ExportReader { r, index: 0 })
    }

    /// The next envelope (its raw bytes and decoded form), or `None` at the end of the file.
    pub fn next_envelope(&mut self) -> Result<Option<(Vec<u8>, Envelope)>, ImportError> {
        let mut len = [0u8; 4];
        match self.r.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        self.index += 1;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_ENVELOPE_BYTES {
            return Err(ImportError::TooLarge {
                index: self.index,
                len,
            });
        }
        let mut buf = vec![0u8; len];
        self.r.read_exact(&mut buf)?;
        let env = Envelope::decode(&buf).map_err(|source| ImportError::Record {
            index: self.index,
            source,
        })?;
        Ok(Some((buf, env)))
    }
}
