//! A raw RESP connection for sync mode: a [`Conversation`] (dialled by the sidecar's
//! [`Upstream`]: TCP or TLS, AUTH) whose failures name the server's role. Scan mode's copier uses
//! it too, for the DUMP and RESTORE round trips that carry every value: payloads stay `Bytes`
//! slices of the read buffer instead of becoming client-library values.
//!
//! Sync mode cannot use a client library for its two main connections: the source's side is a
//! replication link (an RDB, then a stream of commands that are never replies), and the
//! target's side forwards those commands as the source sent them. So both are plain sockets
//! with a read buffer that the snapshot reader and the stream applier consume directly; this
//! type adds only the server's role to what the conversation does.

use std::sync::Arc;
use std::time::Duration;

use redis_protocol::resp2::types::BytesFrame;

use crate::conversation::{Conversation, ConversationError};
pub(crate) use crate::conversation::{Decimal, encode, encode_bulk, encode_into, encode_len};
use crate::replicate::ReplicateError;
use crate::upstream::{Server, Upstream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a sync-mode connection goes: a [`Server`] as an [`Upstream`], and its label.
#[derive(Clone)]
pub(crate) struct Address {
    upstream: Upstream,
    label: Arc<str>,
}

impl Address {
    /// Sync mode replicates whole servers (every database, as a replica does), so a database
    /// in the server's URI is refused.
    pub(crate) fn whole(role: &str, server: &Server) -> Result<Self, ReplicateError> {
        let address = Self::new(role, server)?;
        if server.uri.db != 0 {
            return Err(ReplicateError::Usage(format!(
                "{}: sync mode copies every database, as a replica does, so the URI must not name one (/{}); \
                 drop the /<db> or use scan mode to copy one database",
                address.label, server.uri.db
            )));
        }
        Ok(address)
    }

    /// For a connection that works in the server's database: every connection authenticates,
    /// then selects it (scan mode's raw copy path).
    pub(crate) fn new(role: &str, server: &Server) -> Result<Self, ReplicateError> {
        let label: Arc<str> = format!("{role} {}", server.addr()).into();
        let upstream = Upstream::to(server, CONNECT_TIMEOUT)
            .map_err(|source| ReplicateError::Unreachable { server: label.clone(), source })?;
        Ok(Address { upstream, label })
    }

    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub(crate) async fn connect(&self) -> Result<Link, ReplicateError> {
        let conn = Conversation::open(&self.upstream)
            .await
            .map_err(|source| ReplicateError::Unreachable { server: self.label.clone(), source })?;
        Ok(Link { label: self.label.clone(), conn })
    }
}

/// One open connection with its read buffer ([`Conversation::buf`]).
pub(crate) struct Link {
    label: Arc<str>,
    pub(crate) conn: Conversation,
}

impl Link {
    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub(crate) fn error(&self, detail: impl std::fmt::Display) -> ReplicateError {
        ReplicateError::Link { server: self.label.clone(), detail: detail.to_string() }
    }

    /// The conversation's failure as the engine's: a lost connection is
    /// [`ReplicateError::Disconnected`] (a reconnect may cure it), anything else a link error.
    fn failed(&self, err: ConversationError) -> ReplicateError {
        match err {
            ConversationError::Lost { source, .. } => {
                ReplicateError::Disconnected { server: self.label.clone(), detail: source.to_string() }
            }
            ConversationError::Connect(source) => ReplicateError::Unreachable { server: self.label.clone(), source },
            ConversationError::Refused { command, reply, .. } => self.error(format!("`{command}` failed: {reply}")),
            ConversationError::Protocol { reason, .. } => self.error(format!("unreadable reply: {reason}")),
        }
    }

    /// Writes bytes (one or many encoded commands).
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), ReplicateError> {
        let sent = self.conn.send(bytes).await;
        sent.map_err(|err| self.failed(err))
    }

    /// Reads more bytes into the buffer, at least `want` more; a closed connection is an error
    /// (every caller here is waiting for something).
    pub(crate) async fn fill(&mut self, want: usize) -> Result<usize, ReplicateError> {
        let filled = self.conn.fill(want).await;
        filled.map_err(|err| self.failed(err))
    }

    /// Reads one reply.
    pub(crate) async fn reply(&mut self) -> Result<BytesFrame, ReplicateError> {
        let reply = self.conn.reply().await;
        reply.map_err(|err| self.failed(err))
    }

    /// Sends one command and returns its reply; an error reply becomes
    /// [`ReplicateError::Link`] naming the command.
    pub(crate) async fn call(&mut self, args: &[&[u8]]) -> Result<BytesFrame, ReplicateError> {
        let reply = self.conn.ask(args).await;
        reply.map_err(|err| self.failed(err))
    }
}

/// The text of a simple or bulk string reply.
pub(crate) fn text(frame: &BytesFrame) -> Option<&str> {
    match frame {
        BytesFrame::SimpleString(b) | BytesFrame::BulkString(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// The source's current replication offset (`master_repl_offset` in INFO replication).
pub(crate) async fn master_offset(link: &mut Link) -> Result<u64, ReplicateError> {
    let info = link.call(&[b"INFO", b"replication"]).await?;
    text(&info).and_then(master_offset_in).ok_or_else(|| link.error("INFO replication has no master_repl_offset"))
}

/// `master_repl_offset` in the text of `INFO replication`.
pub(crate) fn master_offset_in(info: &str) -> Option<u64> {
    info.lines().find_map(|l| l.strip_prefix("master_repl_offset:")).and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::TlsSettings;

    #[test]
    fn a_database_in_the_uri_is_refused() {
        let server = |uri: &str| Server::parse(uri, TlsSettings::default()).unwrap();
        assert!(Address::whole("source", &server("redis://h:1")).is_ok());
        assert!(Address::whole("source", &server("redis://h:1/0")).is_ok());
        let err = Address::whole("source", &server("redis://:pw@h:1/3")).err().unwrap();
        assert!(err.to_string().contains("scan mode") && !err.to_string().contains("pw"), "{err}");
    }
}
