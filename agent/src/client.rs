//! A client of the agent's socket: what `submit`, `status` and the PAM module use.

use crate::api::{self, Request, Response};
pub use pwsync_agent_api::blocking::{request as request_blocking, ClientError};
use std::path::Path;
use std::time::Duration;
use tokio::net::UnixStream;

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
