//! The agent's local socket protocol (defined in `pwsync-agent-api`, which the PAM module links
//! alone), with the async framing the daemon and its async clients use.

pub use pwsync_agent_api::{
    decode, encode_frame, FrameError, Request, Response, StatusReport, API_VERSION,
    COMMITTED_ATTRIBUTE, MAX_FRAME_BYTES,
};
use serde::Serialize;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

/// Reads one frame's payload (after the version byte), zeroizing its buffer when dropped.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Zeroizing<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match tokio::time::timeout(timeout, r.read_exact(&mut len)).await {
        Err(_) => return Err(FrameError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(FrameError::Closed)
        }
        Ok(r) => r?,
    };
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Zeroizing::new(vec![0u8; len]);
    tokio::time::timeout(timeout, r.read_exact(&mut buf))
        .await
        .map_err(|_| FrameError::Timeout)??;
    Ok(buf)
}

/// Writes one frame; the encoded copy is zeroized afterwards.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    what: &'static str,
    msg: &T,
) -> Result<(), FrameError> {
    let frame = encode_frame(what, msg)?;
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}
