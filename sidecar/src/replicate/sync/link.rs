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
use crate::upstream::{Server, Upstream, UpstreamStream};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time, at least.
const READ_CHUNK: usize = 64 * 1024;

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
        let stream = self
            .upstream
            .connect()
            .await
            .map_err(|source| ReplicateError::Unreachable { server: self.label.clone(), source })?;
        Ok(Link { label: self.label.clone(), stream, buf: BytesMut::with_capacity(READ_CHUNK) })
    }
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
