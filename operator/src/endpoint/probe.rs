//! One health probe of a Redis server: a [`Conversation`] of the data plane (dialled by its
//! `Upstream`: TLS, AUTH and SELECT exactly as Eden's own connections do them), PING for
//! latency, INFO for version and role. The whole probe has a deadline, so an unreachable server costs the
//! reconciler at most [`PROBE_TIMEOUT`].

use std::time::{Duration, Instant};

use eden_sidecar::conversation::{Conversation, ConversationError};
use eden_sidecar::upstream::{Server, Upstream, UpstreamError};
use redis_protocol::resp2::types::BytesFrame;

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
    #[error(transparent)]
    Conversation(#[from] ConversationError),
    #[error("{addr} did not answer within {PROBE_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("{addr} answered INFO with {reply}, not text")]
    NotInfo { addr: String, reply: String },
}

/// Probes `server`.
pub async fn probe(server: &Server) -> Result<ProbeReport, ProbeError> {
    within_timeout(server, async {
        let mut conversation = open(server).await?;
        let started = Instant::now();
        conversation.ask(&[b"PING"]).await?;
        let latency = started.elapsed();
        let server = info(&mut conversation, "server").await?;
        let replication = info(&mut conversation, "replication").await?;
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
        let mut conversation = open(server).await?;
        // The engine keeps the record in database 0 whatever database the URI names.
        conversation.ask(&[b"SELECT", b"0"]).await?;
        conversation.ask(&[b"DEL", eden_sidecar::replicate::POSITION_KEY.as_bytes()]).await?;
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

async fn open(server: &Server) -> Result<Conversation, ProbeError> {
    Ok(Conversation::open(&Upstream::to(server, PROBE_TIMEOUT)?).await?)
}

/// One INFO section as text.
async fn info(conversation: &mut Conversation, section: &str) -> Result<String, ProbeError> {
    match conversation.ask(&[b"INFO", section.as_bytes()]).await? {
        BytesFrame::BulkString(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        other => Err(ProbeError::NotInfo { addr: conversation.addr().to_string(), reply: format!("{other:?}") }),
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
