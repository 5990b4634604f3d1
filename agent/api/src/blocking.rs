//! A blocking client of the agent's socket (std only): what the PAM module uses.

use crate::{decode, encode_frame, FrameError, Request, Response, MAX_FRAME_BYTES};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source} (is `pwsync-agent run` running, and may this user use its socket?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Frame(#[from] FrameError),
    #[error("the agent sent a reply this client cannot read: {0}")]
    Decode(#[from] pwsync_proto::DecodeError),
}

/// Sends `req` and returns the agent's answer, without an async runtime (for hooks such as the
/// PAM module): the frames of [`crate`] over a blocking socket, every read and write bounded by
/// `timeout`.
pub fn request(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    use std::io::{Read, Write};
    let connect_err = |source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(connect_err)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(connect_err)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(connect_err)?;
    let frame = encode_frame("request", req)?;
    stream.write_all(&frame).map_err(FrameError::Io)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(FrameError::Io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len).into());
    }
    let mut buf = zeroize::Zeroizing::new(vec![0u8; len]);
    stream.read_exact(&mut buf).map_err(FrameError::Io)?;
    Ok(decode("response", &buf)?)
}
