//! One connection to the source or the target, with every failure mapped to an error that names
//! the server ("source 10.0.1.50:6379") and the command.
//!
//! Connections are opened by the sidecar's [`Upstream`], as every other path to a Redis server
//! is: TCP or TLS with the server's own trust (its CA, its `serverName`, or none verified), AUTH
//! with its credentials (user and password as they are, never inside a URL string), SELECT of its
//! database, and the connect timeout. The `redis` crate only frames commands and replies over
//! that stream ([`MultiplexedConnection`]); it never dials, so it needs no TLS of its own. The
//! label, in every error and log line, is the role and `host:port`, never the credentials.
//!
//! A multiplexed connection is cheap to clone, so callers pass `&Endpoint` around and pipelines
//! from different tasks share one socket. The response timeout is raised from the client's
//! 500 ms default because a DUMP of a large value or a long MULTI legitimately takes longer.
//! A command that finds the connection lost fails (the caller decides what a lost reply means)
//! and forgets it; the next one opens a new one, retrying with backoff, so a network blip or a
//! server restart does not leave every clone holding a dead socket.
//!
//! An endpoint may be [`paced`](Endpoint::paced): every command through it, from any clone,
//! counts against one operations-per-second limit for that server.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, Cmd, FromRedisValue, Pipeline, RedisConnectionInfo, Value};
use tokio::sync::Mutex;

use super::ReplicateError;
use super::pace::Pace;
use crate::upstream::{Server, Upstream, UpstreamError, UpstreamStream};

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to open a lost connection again, waiting about 0.5, 1, 2 and 4 s (with jitter)
/// between them; a command issued after that tries again from the start.
const RECONNECT_RETRIES: usize = 4;

/// A named connection to one Redis server.
#[derive(Clone)]
pub(crate) struct Endpoint {
    label: Arc<str>,
    upstream: Upstream,
    db: u16,
    conn: Arc<Mutex<Current>>,
    pace: Arc<Pace>,
}

/// The connection commands go over, if one is open, and how many have been opened: a failure
/// forgets the connection only if it is still the one that failed, so a late failure of an old
/// connection never discards a new one.
struct Current {
    opened: u64,
    conn: Option<MultiplexedConnection>,
}

impl Endpoint {
    /// Connects to `server`; `role` is "source" or "target". One attempt, so a wrong address,
    /// certificate or password is reported at once rather than after reconnect attempts.
    pub(crate) async fn connect(role: &str, server: &Server) -> Result<Self, ReplicateError> {
        let label: Arc<str> = Arc::from(format!("{role} {}", server.addr()).as_str());
        let upstream = Upstream::to(server, CONNECT_TIMEOUT)
            .map_err(|source| ReplicateError::Unreachable { server: label.clone(), source })?;
        let endpoint = Endpoint {
            label,
            upstream,
            db: server.uri.db,
            conn: Arc::new(Mutex::new(Current { opened: 0, conn: None })),
            pace: Arc::new(Pace::new(None)),
        };
        let first = endpoint.open().await?;
        *endpoint.conn.lock().await = Current { opened: 1, conn: Some(first) };
        Ok(endpoint)
    }

    /// A new multiplexed connection: the stream opened (and authenticated, and in the server's
    /// database) by the [`Upstream`]; the `redis` crate is given no settings to apply again.
    async fn open(&self) -> Result<MultiplexedConnection, ReplicateError> {
        let stream = self.stream().await?;
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        let info = RedisConnectionInfo::default();
        let setup = MultiplexedConnection::new_with_config(&info, stream, config);
        let (conn, driver) = self.within_connect_timeout(setup).await?;
        tokio::spawn(driver);
        Ok(conn)
    }

    async fn stream(&self) -> Result<UpstreamStream, ReplicateError> {
        self.upstream
            .connect()
            .await
            .map_err(|source| ReplicateError::Unreachable { server: self.label.clone(), source })
    }

    /// The `redis` crate's set-up exchange on a new stream (it names the client library), bounded
    /// as the dialling was: a server that accepts and never answers (stopped, overloaded) is
    /// unreachable, not a wait without end.
    async fn within_connect_timeout<T>(
        &self,
        setup: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ReplicateError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(done) => done.map_err(|source| ReplicateError::Connect { server: self.label.clone(), source }),
            Err(_) => Err(ReplicateError::Unreachable {
                server: self.label.clone(),
                source: UpstreamError::ConnectTimeout {
                    addr: self.upstream.addr().to_string(),
                    timeout: CONNECT_TIMEOUT,
                },
            }),
        }
    }

    /// The open connection, or a new one (with retries) when the last was lost.
    async fn conn(&self) -> Result<(u64, MultiplexedConnection), ReplicateError> {
        let mut current = self.conn.lock().await;
        if let Some(conn) = &current.conn {
            return Ok((current.opened, conn.clone()));
        }
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_factor(2.0)
            .with_max_times(RECONNECT_RETRIES)
            .with_jitter();
        let conn = (|| self.open()).retry(backoff).when(ReplicateError::is_disconnect).await?;
        current.opened += 1;
        current.conn = Some(conn.clone());
        Ok((current.opened, conn))
    }

    /// Forgets connection number `opened` after it failed in a way only a new one cures (the
    /// `redis` crate's own judgement, as its connection manager uses it).
    async fn lost(&self, opened: u64, err: &redis::RedisError) {
        if err.is_unrecoverable_error() {
            let mut current = self.conn.lock().await;
            if current.opened == opened {
                current.conn = None;
            }
        }
    }

    /// A dedicated connection for subscriptions, opened the same way.
    pub(crate) async fn pubsub(&self) -> Result<PubSub, ReplicateError> {
        let (stream, info) = (self.stream().await?, RedisConnectionInfo::default());
        self.within_connect_timeout(PubSub::new(&info, stream)).await
    }

    /// Limits the commands sent to this server, per second, across every clone.
    pub(crate) fn paced(mut self, per_second: Option<NonZeroU32>) -> Self {
        self.pace = Arc::new(Pace::new(per_second));
        self
    }

    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    /// The logical database the server's URI selected (`redis://host/3` → 3).
    pub(crate) fn db(&self) -> i64 {
        i64::from(self.db)
    }

    /// Counts `n` commands sent to this server another way (a raw connection) against its
    /// limit.
    pub(crate) async fn spend(&self, n: usize) {
        self.pace.spend(n).await;
    }

    /// Runs one command.
    pub(crate) async fn cmd<T: FromRedisValue>(&self, command: &'static str, cmd: &Cmd) -> Result<T, ReplicateError> {
        self.pace.spend(1).await;
        let (opened, mut conn) = self.conn().await?;
        match cmd.query_async(&mut conn).await {
            Ok(reply) => Ok(reply),
            Err(source) => {
                self.lost(opened, &source).await;
                Err(self.error(command, source))
            }
        }
    }

    /// Runs a pipeline and returns one reply per command; a command's server error comes back
    /// as [`Value::ServerError`] so callers decide per key (BUSYKEY, WRONGTYPE...). An empty
    /// pipeline costs no round trip.
    pub(crate) async fn pipe(&self, command: &'static str, pipe: &mut Pipeline) -> Result<Vec<Value>, ReplicateError> {
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        self.pace.spend(pipe.len()).await;
        let (opened, mut conn) = self.conn().await?;
        match pipe.ignore_errors().query_async(&mut conn).await {
            Ok(replies) => Ok(replies),
            Err(source) => {
                self.lost(opened, &source).await;
                Err(self.error(command, source))
            }
        }
    }

    pub(crate) fn error(&self, command: &'static str, source: redis::RedisError) -> ReplicateError {
        ReplicateError::Command { server: self.label.clone(), command, source }
    }

    pub(crate) fn unexpected(&self, command: &'static str, reply: &Value) -> ReplicateError {
        ReplicateError::Reply { server: self.label.clone(), command, reply: format!("{reply:?}") }
    }

    /// A reply that must not be a server error: returns it, or the error naming this server.
    pub(crate) fn ok(&self, command: &'static str, reply: Value) -> Result<Value, ReplicateError> {
        match reply {
            Value::ServerError(err) => Err(self.error(command, err.into())),
            other => Ok(other),
        }
    }
}

/// The bytes of a bulk or simple string reply.
pub(crate) fn as_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        Value::Okay => Some(b"OK"),
        _ => None,
    }
}

/// An integer reply (RESP2 may send integers as strings).
pub(crate) fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => as_bytes(other).and_then(|b| std::str::from_utf8(b).ok()?.parse().ok()),
    }
}

/// A key for log lines and error messages: UTF-8 where it is, escaped bytes otherwise.
pub(crate) fn printable(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
