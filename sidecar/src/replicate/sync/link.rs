//! A raw RESP connection for sync mode, over the sidecar's [`Upstream`] (TCP or TLS, AUTH).
//! Scan mode's copier uses it too, for the DUMP and RESTORE round trips that carry every value:
//! payloads stay `Bytes` slices of the read buffer instead of becoming client-library values.
//!
//! Sync mode cannot use a client library for its two main connections: the source's side is a
//! replication link (an RDB, then a stream of commands that are never replies), and the
//! target's side forwards those commands as the source sent them. So both are plain sockets
//! with a read buffer that the snapshot reader and the stream applier consume directly; this
//! type adds only what everyone needs: sending a command, reading one reply, naming the server.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::replicate::ReplicateError;
use crate::upstream::{Credentials, RedisUri, TlsSettings, Upstream, UpstreamStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time, at least.
const READ_CHUNK: usize = 64 * 1024;

/// Where a sync-mode connection goes: the URI split from its credentials, and the TLS trust.
#[derive(Clone)]
pub(crate) struct Address {
    upstream: Upstream,
    label: Arc<str>,
}

impl Address {
    /// Parses `redis[s]://[[user]:password@]host:port[/db]`. Sync mode replicates whole
    /// servers (every database, as a replica does), so a database in the URI is refused.
    pub(crate) fn parse(role: &str, uri: &str, tls: &TlsSettings) -> Result<Self, ReplicateError> {
        let address = Self::with_database(role, uri, tls)?;
        if RedisUri::parse(&split_credentials(uri).1).is_ok_and(|uri| uri.db != 0) {
            return Err(ReplicateError::Usage(format!(
                "{}: sync mode copies every database, as a replica does, so the URI must not name one ({uri}); \
                 drop the /<db> or use scan mode to copy one database",
                address.label
            )));
        }
        Ok(address)
    }

    /// Parses `redis[s]://[[user]:password@]host:port[/db]` for a connection that works in one
    /// database: every connection authenticates, then selects it (scan mode's raw copy path).
    pub(crate) fn with_database(role: &str, uri: &str, tls: &TlsSettings) -> Result<Self, ReplicateError> {
        let (credentials, bare) = split_credentials(uri);
        let upstream = Upstream::new(&bare, tls, CONNECT_TIMEOUT)
            .map_err(|source| ReplicateError::Unreachable { server: format!("{role} {bare}").into(), source })?
            .with_credentials(credentials);
        let label: Arc<str> = format!("{role} {}", upstream.addr()).into();
        Ok(Address { upstream, label })
    }

    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub(crate) async fn connect(&self) -> Result<Link, ReplicateError> {
        let stream = self
            .upstream
            .connect()
            .await
            .map_err(|source| ReplicateError::Unreachable { server: self.label.clone(), source })?;
        Ok(Link { label: self.label.clone(), stream, buf: BytesMut::with_capacity(READ_CHUNK) })
    }
}

/// `redis://user:pw@host` → (credentials, `redis://host`). A URI without `@` is returned as is.
fn split_credentials(uri: &str) -> (Option<Credentials>, String) {
    let Some((scheme, rest)) = uri.split_once("://") else { return (None, uri.to_string()) };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return (None, uri.to_string()) };
    let (userinfo, host) = (&rest[..at], &rest[at + 1..]);
    let (username, password) = match userinfo.split_once(':') {
        Some((user, password)) => ((!user.is_empty()).then(|| user.to_string()), password.to_string()),
        None => (None, userinfo.to_string()),
    };
    (Some(Credentials { username, password }), format!("{scheme}://{host}"))
}

/// One open connection with its read buffer.
pub(crate) struct Link {
    label: Arc<str>,
    stream: UpstreamStream,
    /// Bytes read and not yet consumed; readers take from the front.
    pub(crate) buf: BytesMut,
}

impl Link {
    pub(crate) fn label(&self) -> &Arc<str> {
        &self.label
    }

    pub(crate) fn error(&self, detail: impl std::fmt::Display) -> ReplicateError {
        ReplicateError::Link { server: self.label.clone(), detail: detail.to_string() }
    }

    fn disconnected(&self, detail: impl std::fmt::Display) -> ReplicateError {
        ReplicateError::Disconnected { server: self.label.clone(), detail: detail.to_string() }
    }

    /// Writes bytes (one or many encoded commands).
    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), ReplicateError> {
        match self.stream.write_all(bytes).await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.disconnected(format!("write failed: {err}"))),
        }
    }

    /// Reads more bytes into the buffer, at least `want` more if given; a closed connection is
    /// an error (every caller here is waiting for something).
    pub(crate) async fn fill(&mut self, want: usize) -> Result<usize, ReplicateError> {
        self.buf.reserve(want.max(READ_CHUNK));
        let mut got = 0;
        loop {
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(self.disconnected("connection closed by the server")),
                Ok(n) => got += n,
                Err(err) => return Err(self.disconnected(format!("read failed: {err}"))),
            }
            if got >= want {
                return Ok(got);
            }
        }
    }

    /// Reads one reply.
    pub(crate) async fn reply(&mut self) -> Result<BytesFrame, ReplicateError> {
        loop {
            match decode_bytes_mut(&mut self.buf) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) => {
                    self.fill(1).await?;
                }
                Err(err) => return Err(self.error(format!("unreadable reply: {err}"))),
            }
        }
    }

    /// Sends one command and returns its reply; an error reply becomes
    /// [`ReplicateError::Link`] naming the command.
    pub(crate) async fn call(&mut self, args: &[&[u8]]) -> Result<BytesFrame, ReplicateError> {
        self.send(&encode(args)).await?;
        match self.reply().await? {
            BytesFrame::Error(err) => Err(self.error(format!("`{}` failed: {err}", String::from_utf8_lossy(args[0])))),
            reply => Ok(reply),
        }
    }
}

/// A command as a RESP array of bulk strings.
pub(crate) fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    encode_into(&mut out, args);
    out
}

/// Appends a command as a RESP array of bulk strings.
pub(crate) fn encode_into(out: &mut Vec<u8>, args: &[&[u8]]) {
    encode_len(out, b'*', args.len());
    for arg in args {
        encode_bulk(out, arg);
    }
}

/// Appends one bulk string (an argument of a command whose header is already written).
pub(crate) fn encode_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    encode_len(out, b'$', arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// Appends `<kind><n>\r\n`: the header of an array (`*`) or a bulk string (`$`).
pub(crate) fn encode_len(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(Decimal::new(n as u64).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A number's decimal digits, without the allocation of `to_string`: the snapshot load writes
/// a few numbers for every key.
pub(crate) struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub(crate) fn new(mut n: u64) -> Self {
        let mut digits = [0; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                return Decimal { digits, start };
            }
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
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
    text(&info)
        .and_then(|info| info.lines().find_map(|l| l.strip_prefix("master_repl_offset:")))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| link.error("INFO replication has no master_repl_offset"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_come_off_the_uri() {
        let (creds, bare) = split_credentials("rediss://app:s3cr@t@cache:6380");
        let creds = creds.unwrap();
        assert_eq!((creds.username.as_deref(), creds.password.as_str()), (Some("app"), "s3cr@t"));
        assert_eq!(bare, "rediss://cache:6380");
        let (creds, bare) = split_credentials("redis://:pw@h:1/0");
        assert_eq!((creds.unwrap().username, bare.as_str()), (None, "redis://h:1/0"));
        assert!(split_credentials("redis://h:1").0.is_none());
    }

    #[test]
    fn a_database_in_the_uri_is_refused() {
        let tls = TlsSettings::default();
        assert!(Address::parse("source", "redis://h:1", &tls).is_ok());
        assert!(Address::parse("source", "redis://h:1/0", &tls).is_ok());
        let err = Address::parse("source", "redis://h:1/3", &tls).err().unwrap();
        assert!(err.to_string().contains("scan mode"), "{err}");
    }
}
