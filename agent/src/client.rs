//! A client of the agent's socket: what `submit`, `status` and the PAM module use.

use crate::api::{self, Request, Response};
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {path}: {source} (is `pwsync-agent run` running, and may this user use its socket?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Frame(#[from] api::FrameError),
    #[error("the agent sent a reply this client cannot read: {0}")]
    Decode(#[from] pwsync_proto::DecodeError),
}

/// [`request`] without an async runtime, for hooks such as the PAM module: the same frames over
/// a blocking socket, every read and write bounded by `timeout`.
pub fn request_blocking(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
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
    let frame = api::encode_frame("request", req)?;
    stream.write_all(&frame).map_err(api::FrameError::Io)?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(api::FrameError::Io)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > api::MAX_FRAME_BYTES {
        return Err(api::FrameError::TooLarge(len).into());
    }
    let mut buf = zeroize::Zeroizing::new(vec![0u8; len]);
    stream.read_exact(&mut buf).map_err(api::FrameError::Io)?;
    Ok(api::decode("response", &buf)?)
}

/// Sends one request and waits up to `timeout` for the answer.
pub async fn request(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    Connection::open(socket, timeout).await?.ask(req).await
}

/// A connection kept open for many requests, one after another: what a source that submits
/// in bulk (a directory sync, an import) uses instead of connecting once per change.
pub struct Connection {
    stream: UnixStream,
    timeout: Duration,
}

impl Connection {
    /// Connects to the agent's socket within `timeout`.
    pub async fn open(socket: &Path, timeout: Duration) -> Result<Connection, ClientError> {
        let connect_err = |source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        };
        let stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
            .await
            .map_err(|_| {
                connect_err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "timed out",
                ))
            })?
            .map_err(connect_err)?;
        Ok(Connection { stream, timeout })
    }

    /// Sends one request and waits up to the connection's timeout for its answer.
    pub async fn ask(&mut self, req: &Request) -> Result<Response, ClientError> {
        api::write_frame(&mut self.stream, "request", req).await?;
        let frame = api::read_frame(&mut self.stream, self.timeout).await?;
        Ok(api::decode("response", &frame)?)
    }
}
