//! Learning the command table from the upstream at start (`COMMAND`), so that commands the
//! built-in table does not know — module commands above all — are routed by what the server
//! says they do rather than as unknown.
//!
//! An upstream that is not up yet is asked again (with backoff); one that refuses (a password
//! the sidecar does not have: clients' AUTH goes through to the source as it is, DESIGN §6) is
//! not asked again, and the built-in table goes on classifying.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::command::{self, CommandInfo};
use crate::upstream::{Upstream, UpstreamError};

/// The largest `COMMAND` reply read (a stock server's is about 100 KiB; modules add some).
const MAX_REPLY: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CommandInfoError {
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("reading the COMMAND reply: {0}")]
    Io(#[from] std::io::Error),
    #[error("the COMMAND reply is not what Redis sends: {0}")]
    Protocol(String),
    #[error("COMMAND refused: {0}")]
    Refused(String),
}

impl CommandInfoError {
    /// Whether asking again may work: the upstream was unreachable, not unwilling.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            CommandInfoError::Io(_)
                | CommandInfoError::Connect(UpstreamError::Unreachable { .. } | UpstreamError::ConnectTimeout { .. })
        )
    }
}

/// Asks `upstream` for its commands.
pub async fn fetch(upstream: &Upstream) -> Result<Vec<CommandInfo>, CommandInfoError> {
    let mut stream = upstream.connect().await?;
    stream.write_all(b"*1\r\n$7\r\nCOMMAND\r\n").await?;
    let mut buffer = Vec::with_capacity(128 << 10);
    loop {
        match decode(&buffer) {
            Ok(Some((frame, _))) => return parse(frame),
            Ok(None) if buffer.len() >= MAX_REPLY => {
                return Err(CommandInfoError::Protocol(format!("larger than {MAX_REPLY} bytes")));
            }
            Ok(None) => {}
            Err(err) => return Err(CommandInfoError::Protocol(err.to_string())),
        }
        if stream.read_buf(&mut buffer).await? == 0 {
            return Err(CommandInfoError::Protocol("connection closed mid-reply".into()));
        }
    }
}

fn parse(frame: OwnedFrame) -> Result<Vec<CommandInfo>, CommandInfoError> {
    let entries = match frame {
        OwnedFrame::Array(entries) => entries,
        OwnedFrame::Error(message) => return Err(CommandInfoError::Refused(message)),
        other => return Err(CommandInfoError::Protocol(format!("expected an array, got {other:?}"))),
    };
    // Each entry: [name, arity, [flags…], first key, last key, step, …].
    Ok(entries
        .into_iter()
        .filter_map(|entry| {
            let OwnedFrame::Array(fields) = entry else { return None };
            let name = text(fields.first()?)?;
            let flags = match fields.get(2)? {
                OwnedFrame::Array(flags) => flags.iter().filter_map(text).collect(),
                _ => Vec::new(),
            };
            let first_key = match fields.get(3)? {
                OwnedFrame::Integer(position) => *position,
                _ => 0,
            };
            Some(CommandInfo { name, flags, first_key })
        })
        .collect())
}

fn text(frame: &OwnedFrame) -> Option<String> {
    match frame {
        OwnedFrame::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        OwnedFrame::SimpleString(text) => Some(String::from_utf8_lossy(text).into_owned()),
        _ => None,
    }
}

/// Learns the upstream's commands, asking again while it is unreachable: the sidecar starts
/// (and classifies with its built-in table) whether or not the upstream is up yet.
pub async fn learn_from(upstream: Upstream) {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times();
    let fetched = (|| fetch(&upstream))
        .retry(backoff)
        .when(CommandInfoError::is_transient)
        .notify(|err, wait| {
            tracing::warn!(%err, upstream = upstream.addr(), retry_in = ?wait, "could not read the command table");
        })
        .await;
    match fetched {
        Ok(commands) => {
            let learned = command::learn(commands);
            tracing::info!(learned, upstream = upstream.addr(), "learned commands the built-in table lacks");
        }
        Err(err) => tracing::info!(
            %err,
            upstream = upstream.addr(),
            "the upstream does not give its command table; the built-in table classifies (module commands as unknown)"
        ),
    }
}
