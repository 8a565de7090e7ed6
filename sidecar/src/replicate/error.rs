//! Why replication or verification stopped, phrased so an operator knows which server failed
//! and what happens next.

use std::sync::Arc;

use redis::RedisError;

use crate::upstream::UpstreamError;

/// A failure of a replicator or the verifier.
#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error(
        "cannot connect to {server}: {source}; check the address and credentials, nothing was copied by this attempt"
    )]
    Connect { server: Arc<str>, source: RedisError },
    #[error(
        "{server}: `{command}` failed: {source}; this run stops (a restarted replicator resumes from its checkpoint)"
    )]
    Command { server: Arc<str>, command: &'static str, source: RedisError },
    #[error("{server}: unexpected reply to `{command}`: {reply}; this run stops")]
    Reply { server: Arc<str>, command: &'static str, reply: String },
    #[error(
        "key {key} already exists on {server} and the replace policy is `fail`; replication stops: delete the key on the target or choose `replace` or `skip`"
    )]
    TargetKeyExists { server: Arc<str>, key: String },
    #[error(
        "the source cannot continue from the position {server} recorded, and a full copy would first flush {server}, deleting the keys the `skip` or `fail` policy keeps there; replication stops: empty the target yourself (or choose `replace`) and start again"
    )]
    FullCopyWouldFlush { server: Arc<str> },
    #[error(
        "{server} was flushed ({evidence}); doing the same to the target would delete the keys the `skip` or `fail` policy keeps there, so replication stops before it: delete on the target what should go, then start a new migration (or choose `replace`, under which the target mirrors the flush)"
    )]
    SourceFlushed { server: Arc<str>, evidence: String },
    #[error(
        "keyspace notifications are off on {server} and cannot be enabled ({detail}); scan mode would miss live writes, so it does not start: set notify-keyspace-events to `KEA` in the provider's settings and retry"
    )]
    NotificationsOff { server: Arc<str>, detail: String },
    #[error("cannot connect to {server}: {source}; nothing was copied by this attempt")]
    Unreachable { server: Arc<str>, source: UpstreamError },
    #[error("{server}: {detail}; this run stops (a restarted replicator resumes from its checkpoint)")]
    Link { server: Arc<str>, detail: String },
    #[error("{server}: {detail}; this run stops (a restarted replicator resumes from its checkpoint)")]
    Disconnected { server: Arc<str>, detail: String },
    #[error(
        "{server} refused `{command}` ({reply}); sync mode needs the source to accept a replica: use scan mode for servers that block PSYNC"
    )]
    SyncRefused { server: Arc<str>, command: &'static str, reply: String },
    #[error(
        "the source's RDB snapshot is unreadable at byte {offset}: {detail}; this run stops, and a restart begins a full resync"
    )]
    Rdb { offset: u64, detail: String },
    #[error(
        "{server} cannot read the source's DUMP payload of key {key}, and the value cannot be rebuilt with commands ({detail}); this run stops: copy to a Redis at least as new as the source"
    )]
    Unrebuildable { server: Arc<str>, key: String, detail: String },
    #[error("{0}")]
    Usage(String),
}

impl ReplicateError {
    /// A lost or refused connection, which reconnecting may cure; anything else (a refusal, bad
    /// data, a policy stop) would only happen again. A timeout is not one: the server may still
    /// apply what was sent, after whatever a new connection sends.
    pub fn is_disconnect(&self) -> bool {
        match self {
            ReplicateError::Disconnected { .. } | ReplicateError::Unreachable { .. } => true,
            ReplicateError::Command { source, .. } => {
                !source.is_timeout()
                    && (source.is_io_error() || source.is_connection_dropped() || source.is_connection_refusal())
            }
            _ => false,
        }
    }
}
