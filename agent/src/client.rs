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

/// Sends one request and waits up to `timeout` for the answer.
pub async fn request(
    socket: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let mut stream = tokio::time::timeout(timeout, UnixStream::connect(socket))
        .await
        .map_err(|_| ClientError::Connect {
            path: socket.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
        })?
        .map_err(|source| ClientError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    api::write_frame(&mut stream, "request", req).await?;
    let frame = api::read_frame(&mut stream, timeout).await?;
    Ok(api::decode("response", &frame)?)
}
