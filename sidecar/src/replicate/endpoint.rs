//! One connection to the source or the target, with every failure mapped to an error that names
//! the server ("source 10.0.1.50:6379") and the command.
//!
//! A [`Server`] is connected with its own TLS settings: rustls with its CA bundle (the system
//! roots when it has none); a server-name override is not supported here and is refused. Its
//! label, in every error and log line, is the role and `host:port`, never the credentials.
//!
//! A multiplexed connection is cheap to clone, so callers pass `&Endpoint` around and pipelines
//! from different tasks share one socket. The response timeout is raised from the client's
//! 500 ms default because a DUMP of a large value or a long MULTI legitimately takes longer.
//! The connection is a [`ConnectionManager`]: a command that finds it lost fails (the caller
//! decides what a lost reply means), and the next one goes over a new connection, so a network
//! blip or a server restart does not leave every clone holding a dead socket.
//!
//! An endpoint may be [`paced`](Endpoint::paced): every command through it, from any clone,
//! counts against one operations-per-second limit for that server.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, FromRedisValue, IntoConnectionInfo, Pipeline,
    RedisConnectionInfo, TlsCertificates, Value,
};

use super::ReplicateError;
use super::pace::Pace;
use crate::upstream::Server;

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect attempts per lost connection, waiting 0.5, 1, 2 and 4 s between them; a command
/// issued after that tries again from the start.
const RECONNECT_RETRIES: usize = 4;

/// A named connection to one Redis server.
#[derive(Clone)]
pub(crate) struct Endpoint {
    label: Arc<str>,
    client: Client,
    conn: ConnectionManager,
    pace: Arc<Pace>,
}

impl Endpoint {
    /// Connects to `server`; `role` is "source" or "target". The client is built from the
    /// server's parts (address, database, credentials, TLS), never from a URL string, so a
    /// password is neither re-encoded nor part of any label.
    pub(crate) async fn connect(role: &str, server: &Server) -> Result<Self, ReplicateError> {
        let label: Arc<str> = Arc::from(format!("{role} {}", server.addr()).as_str());
        let connect_error = |source| ReplicateError::Connect { server: label.clone(), source };
        let (host, port) = (server.uri.host.clone(), server.uri.port);
        let mut settings = RedisConnectionInfo::default().set_db(i64::from(server.uri.db));
        if let Some(credentials) = &server.credentials {
            if let Some(username) = &credentials.username {
                settings = settings.set_username(username);
            }
            settings = settings.set_password(&credentials.password);
        }
        let client = if server.uri.tls {
            if server.tls.server_name.is_some() {
                return Err(ReplicateError::Usage(format!(
                    "{label}: a TLS server name override is supported by sync mode only; connect by that name instead"
                )));
            }
            let insecure = server.tls.insecure_skip_verify;
            let addr = ConnectionAddr::TcpTls { host, port, insecure, tls_params: None };
            let info = addr.into_connection_info().map_err(connect_error)?.set_redis_settings(settings);
            let certificates = TlsCertificates { client_tls: None, root_cert: server.tls.ca_pem.clone() };
            Client::build_with_tls(info, certificates).map_err(connect_error)?
        } else {
            let info = ConnectionAddr::Tcp(host, port).into_connection_info().map_err(connect_error)?;
            Client::open(info.set_redis_settings(settings)).map_err(connect_error)?
        };
        // One plain attempt first, so that a wrong address or password is reported at once
        // rather than after the manager's reconnect attempts.
        let first = AsyncConnectionConfig::new().set_connection_timeout(Some(CONNECT_TIMEOUT));
        client
            .get_multiplexed_async_connection_with_config(&first)
            .await
            .map_err(|source| ReplicateError::Connect { server: label.clone(), source })?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_min_delay(Duration::from_millis(500))
            .set_exponent_base(2.0)
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|source| ReplicateError::Connect { server: label.clone(), source })?;
        Ok(Endpoint { label, client, conn, pace: Arc::new(Pace::new(None)) })
    }

    /// Limits the commands sent to this server, per second, across every clone.
    pub(crate) fn paced(mut self, per_second: Option<NonZeroU32>) -> Self {
        self.pace = Arc::new(Pace::new(per_second));
        self
    }

    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The logical database the URL selected (`redis://host/3` → 3).
    pub(crate) fn db(&self) -> i64 {
        self.client.get_connection_info().redis_settings().db()
    }

    /// Counts `n` commands sent to this server another way (a raw connection) against its
    /// limit.
    pub(crate) async fn spend(&self, n: usize) {
        self.pace.spend(n).await;
    }

    /// Runs one command.
    pub(crate) async fn cmd<T: FromRedisValue>(&self, command: &'static str, cmd: &Cmd) -> Result<T, ReplicateError> {
        self.pace.spend(1).await;
        cmd.query_async(&mut self.conn.clone()).await.map_err(|source| self.error(command, source))
    }

    /// Runs a pipeline and returns one reply per command; a command's server error comes back
    /// as [`Value::ServerError`] so callers decide per key (BUSYKEY, WRONGTYPE...). An empty
    /// pipeline costs no round trip.
    pub(crate) async fn pipe(&self, command: &'static str, pipe: &mut Pipeline) -> Result<Vec<Value>, ReplicateError> {
        if pipe.is_empty() {
            return Ok(Vec::new());
        }
        self.pace.spend(pipe.len()).await;
        pipe.ignore_errors().query_async(&mut self.conn.clone()).await.map_err(|source| self.error(command, source))
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
