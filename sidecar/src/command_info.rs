//! Learning the command table from the upstream at start (`COMMAND`), so that commands the
//! built-in table does not know — module commands above all — are routed by what the server
//! says they do rather than as unknown.
//!
//! An upstream that is not up yet is asked again (with backoff); one that refuses (a password
//! the sidecar does not have: clients' AUTH goes through to the source as it is, DESIGN §6) is
//! not asked again, and the built-in table goes on classifying.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};

use redis_protocol::resp2::types::BytesFrame;

use crate::command::{self, CommandInfo};
use crate::conversation::{Conversation, ConversationError};
use crate::upstream::{Upstream, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum CommandInfoError {
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    #[error("COMMAND: {0}")]
    Conversation(#[from] ConversationError),
    #[error("the COMMAND reply is not what Redis sends: {0}")]
    Protocol(String),
}

impl CommandInfoError {
    /// Whether asking again may work: the upstream was unreachable, not unwilling.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            CommandInfoError::Conversation(ConversationError::Lost { .. })
                | CommandInfoError::Connect(UpstreamError::Unreachable { .. } | UpstreamError::ConnectTimeout { .. })
        )
    }
}

/// Asks `upstream` for its commands.
pub async fn fetch(upstream: &Upstream) -> Result<Vec<CommandInfo>, CommandInfoError> {
    let mut conversation = Conversation::open(upstream).await?;
    parse(conversation.ask(&[b"COMMAND"]).await?)
}

fn parse(frame: BytesFrame) -> Result<Vec<CommandInfo>, CommandInfoError> {
    let entries = match frame {
        BytesFrame::Array(entries) => entries,
        other => return Err(CommandInfoError::Protocol(format!("expected an array, got {other:?}"))),
    };
    // Each entry: [name, arity, [flags…], first key, last key, step, …].
    Ok(entries
        .into_iter()
        .filter_map(|entry| {
            let BytesFrame::Array(fields) = entry else { return None };
            let name = text(fields.first()?)?;
            let flags = match fields.get(2)? {
                BytesFrame::Array(flags) => flags.iter().filter_map(text).collect(),
                _ => Vec::new(),
            };
            let first_key = match fields.get(3)? {
                BytesFrame::Integer(position) => *position,
                _ => 0,
            };
            Some(CommandInfo { name, flags, first_key })
        })
        .collect())
}

fn text(frame: &BytesFrame) -> Option<String> {
    match frame {
        BytesFrame::BulkString(bytes) | BytesFrame::SimpleString(bytes) => {
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
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
