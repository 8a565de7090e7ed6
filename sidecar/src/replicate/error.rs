//! Why replication or verification stopped, phrased so an operator knows which server failed
//! and what happens next.

use std::sync::Arc;

use redis::RedisError;

/// A failure of the scan replicator or the verifier.
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
        "keyspace notifications are off on {server} and cannot be enabled ({detail}); scan mode would miss live writes, so it does not start: set notify-keyspace-events to `KEA` in the provider's settings and retry"
    )]
    NotificationsOff { server: Arc<str>, detail: String },
}
