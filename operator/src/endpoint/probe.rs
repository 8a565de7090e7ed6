//! One health probe of a Redis server: connect through the data plane's [`Upstream`] (TLS,
//! AUTH and SELECT exactly as Eden's own connections do them), PING for latency, INFO for
//! version and role. The whole probe has a deadline, so an unreachable server costs the
//! reconciler at most [`PROBE_TIMEOUT`].

use std::time::{Duration, Instant};

use eden_sidecar::upstream::{Server, Upstream, UpstreamError, UpstreamStream};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a successful probe saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub server_version: String,
    /// `master` or `slave`, as INFO replication says.
    pub role: String,
    pub latency: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("{addr} did not answer within {PROBE_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("{addr} failed during {command}: {source}")]
    Io { addr: String, command: &'static str, source: std::io::Error },
    #[error("{addr} refused {command}: {reply}")]
    Refused { addr: String, command: &'static str, reply: String },
    #[error("{addr} sent a reply that is not RESP: {reason}")]
    Protocol { addr: String, reason: String },
}

/// Probes `server`.
pub async fn probe(server: &Server) -> Result<ProbeReport, ProbeError> {
    within_timeout(server, async {
        let mut conversation = Conversation::open(server).await?;
        let started = Instant::now();
        conversation.ask("PING", &["PING"]).await?;
        let latency = started.elapsed();
        let server = conversation.info("server").await?;
        let replication = conversation.info("replication").await?;
        Ok(ProbeReport {
            server_version: info_field(&server, "redis_version").unwrap_or("unknown").to_string(),
            role: info_field(&replication, "role").unwrap_or("unknown").to_string(),
            latency,
        })
    })
    .await
}

/// Deletes the record the `sync` engine keeps on the target (its stream position), once the
/// migration no longer needs it: it is Eden's, not the application's.
pub async fn forget_sync_position(server: &Server) -> Result<(), ProbeError> {
    within_timeout(server, async {
        let mut conversation = Conversation::open(server).await?;
        // The engine keeps the record in database 0 whatever database the URI names.
        conversation.ask("SELECT", &["SELECT", "0"]).await?;
        conversation.ask("DEL", &["DEL", eden_sidecar::replicate::POSITION_KEY]).await?;
        Ok(())
    })
    .await
}

/// Bounds a whole conversation, connecting included, by [`PROBE_TIMEOUT`].
async fn within_timeout<T>(
    server: &Server,
    conversation: impl Future<Output = Result<T, ProbeError>>,
) -> Result<T, ProbeError> {
    tokio::time::timeout(PROBE_TIMEOUT, conversation)
        .await
        .unwrap_or_else(|_| Err(ProbeError::Timeout { addr: server.addr() }))
}

/// One connection to an Endpoint, commands asked one at a time.
struct Conversation {
    stream: UpstreamStream,
    addr: String,
    buffer: Vec<u8>,
}

impl Conversation {
    async fn open(server: &Server) -> Result<Self, ProbeError> {
        let upstream = Upstream::to(server, PROBE_TIMEOUT)?;
        let addr = upstream.addr().to_string();
        Ok(Conversation { stream: upstream.connect().await?, addr, buffer: Vec::with_capacity(4096) })
    }

    /// Sends one command and reads its reply; an error reply is a [`ProbeError::Refused`].
    async fn ask(&mut self, command: &'static str, args: &[&str]) -> Result<OwnedFrame, ProbeError> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        let io_error = |source| ProbeError::Io { addr: self.addr.clone(), command, source };
        self.stream.write_all(request.as_bytes()).await.map_err(io_error)?;
        loop {
            match decode(&self.buffer) {
                Ok(Some((frame, used))) => {
                    self.buffer.drain(..used);
                    return match frame {
                        OwnedFrame::Error(reply) => {
                            Err(ProbeError::Refused { addr: self.addr.clone(), command, reply })
                        }
                        frame => Ok(frame),
                    };
                }
                Ok(None) => {}
                Err(err) => return Err(ProbeError::Protocol { addr: self.addr.clone(), reason: err.to_string() }),
            }
            let read = self.stream.read_buf(&mut self.buffer).await;
            match read {
                Ok(0) => {
                    let closed = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed");
                    return Err(ProbeError::Io { addr: self.addr.clone(), command, source: closed });
                }
                Ok(_) => {}
                Err(source) => return Err(ProbeError::Io { addr: self.addr.clone(), command, source }),
            }
        }
    }

    /// One INFO section as text.
    async fn info(&mut self, section: &str) -> Result<String, ProbeError> {
        match self.ask("INFO", &["INFO", section]).await? {
            OwnedFrame::BulkString(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            other => Err(ProbeError::Protocol { addr: self.addr.clone(), reason: format!("INFO replied {other:?}") }),
        }
    }
}

fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| line.strip_prefix(field)?.strip_prefix(':')).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_fields_are_read_by_exact_name() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_version_extra:x\r\n";
        assert_eq!(info_field(info, "redis_version"), Some("7.0.15"));
        assert_eq!(info_field("role:master\r\n", "role"), Some("master"));
        assert_eq!(info_field(info, "role"), None);
    }
}
