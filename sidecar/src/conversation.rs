//! A raw RESP connection to one Redis server: send commands, read replies one at a time. Eden's
//! own short exchanges (the Endpoint probe, the command-table learner) and the sync link (which
//! also reads the snapshot and the stream straight from [`Conversation::buf`]) are built on it.
//!
//! It is dialled by [`Upstream`], so TLS, AUTH, SELECT and the connect timeout are the ones
//! every other connection has. A reply's end is found with the proxy's [`ReplyScanner`], which
//! keeps its place across reads: a reply that arrives in many reads (an array of thousands of
//! elements, the command table) is scanned once and decoded once when whole, never decoded again
//! from its start after every read.

use std::io;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::reply::{Frame, ReplyScanner};
use crate::upstream::{Upstream, UpstreamError, UpstreamStream};

/// Bytes read from the socket at a time, at least.
const READ_CHUNK: usize = 64 * 1024;

/// Why an exchange failed, naming the server by `host:port`.
#[derive(Debug, thiserror::Error)]
pub enum ConversationError {
    #[error(transparent)]
    Connect(#[from] UpstreamError),
    /// The connection failed or was closed while a reply was awaited: a new one may do better.
    #[error("{addr}: connection lost: {source}")]
    Lost { addr: Arc<str>, source: io::Error },
    #[error("{addr} refused {command}: {reply}")]
    Refused { addr: Arc<str>, command: String, reply: String },
    #[error("{addr} sent a reply that is not RESP: {reason}")]
    Protocol { addr: Arc<str>, reason: String },
}

/// One open connection with its read buffer.
pub struct Conversation {
    stream: UpstreamStream,
    addr: Arc<str>,
    /// Bytes read and not yet consumed; readers take from the front.
    pub buf: BytesMut,
}

impl Conversation {
    /// Dials `upstream` (TLS, AUTH and SELECT included).
    pub async fn open(upstream: &Upstream) -> Result<Self, UpstreamError> {
        let stream = upstream.connect().await?;
        Ok(Conversation { stream, addr: upstream.addr().into(), buf: BytesMut::with_capacity(READ_CHUNK) })
    }

    /// `host:port`.
    pub fn addr(&self) -> &Arc<str> {
        &self.addr
    }

    fn lost(&self, source: io::Error) -> ConversationError {
        ConversationError::Lost { addr: self.addr.clone(), source }
    }

    fn protocol(&self, reason: impl ToString) -> ConversationError {
        ConversationError::Protocol { addr: self.addr.clone(), reason: reason.to_string() }
    }

    /// Writes bytes (one or many encoded commands).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), ConversationError> {
        self.stream.write_all(bytes).await.map_err(|err| self.lost(err))
    }

    /// Reads more bytes into the buffer, at least `want` more; a closed connection is an error
    /// (every caller is waiting for something).
    pub async fn fill(&mut self, want: usize) -> Result<usize, ConversationError> {
        self.buf.reserve(want.max(READ_CHUNK));
        let mut got = 0;
        while got < want.max(1) {
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(self.lost(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the server"))),
                Ok(n) => got += n,
                Err(err) => return Err(self.lost(err)),
            }
        }
        Ok(got)
    }

    /// Reads one reply (an error reply is returned as a frame, for the caller to judge). The
    /// scanner's place survives each read, so only new bytes are looked at; the reply is
    /// decoded once, from exactly its bytes. A RESP3 push answers no command and is skipped.
    pub async fn reply(&mut self) -> Result<BytesFrame, ConversationError> {
        let (mut scanner, mut scanned) = (ReplyScanner::default(), 0);
        loop {
            let (consumed, frame) = scanner.scan(&self.buf[scanned..]).map_err(|err| self.protocol(err))?;
            scanned += consumed;
            match frame {
                Some(Frame::Reply) => {
                    let mut reply = self.buf.split_to(scanned);
                    return match decode_bytes_mut(&mut reply) {
                        Ok(Some((frame, _, _))) => Ok(frame),
                        Ok(None) => Err(self.protocol("a reply cut short")),
                        Err(err) => Err(self.protocol(err)),
                    };
                }
                Some(Frame::Push) => {
                    self.buf.advance(scanned);
                    scanned = 0;
                }
                None => {
                    self.fill(1).await?;
                }
            }
        }
    }

    /// Sends one command and returns its reply; an error reply is [`ConversationError::Refused`].
    pub async fn ask(&mut self, args: &[&[u8]]) -> Result<BytesFrame, ConversationError> {
        self.send(&encode(args)).await?;
        match self.reply().await? {
            BytesFrame::Error(reply) => Err(ConversationError::Refused {
                addr: self.addr.clone(),
                command: String::from_utf8_lossy(args[0]).into_owned(),
                reply: reply.to_string(),
            }),
            reply => Ok(reply),
        }
    }
}

/// A command as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    encode_into(&mut out, args);
    out
}

/// Appends a command as a RESP array of bulk strings.
pub fn encode_into(out: &mut Vec<u8>, args: &[&[u8]]) {
    encode_len(out, b'*', args.len());
    for arg in args {
        encode_bulk(out, arg);
    }
}

/// Appends one bulk string (an argument of a command whose header is already written).
pub fn encode_bulk(out: &mut Vec<u8>, arg: &[u8]) {
    encode_len(out, b'$', arg.len());
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// Appends `<kind><n>\r\n`: the header of an array (`*`) or a bulk string (`$`).
pub fn encode_len(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    out.extend_from_slice(Decimal::new(n as u64).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A number's decimal digits, without the allocation of `to_string`: the snapshot load writes
/// a few numbers for every key.
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    pub fn new(mut n: u64) -> Self {
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

    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;
    use crate::upstream::TlsSettings;

    /// A server that answers the first command with `reply`, a few bytes per write, and hangs up.
    async fn serving(reply: Vec<u8>, piece: usize) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0; 64];
            let _ = socket.read(&mut request).await.unwrap();
            for chunk in reply.chunks(piece) {
                socket.write_all(chunk).await.unwrap();
                socket.flush().await.unwrap();
            }
        });
        Upstream::new(&format!("redis://{addr}"), &TlsSettings::default(), Duration::from_secs(1)).unwrap()
    }

    /// A reply cut into many reads is whole once, with a push before it skipped and the bytes
    /// after it left in the buffer for the next reader.
    #[tokio::test]
    async fn a_reply_in_many_pieces_is_read_whole_and_exactly() {
        let mut bytes = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n".to_vec();
        bytes.extend_from_slice(b"*3\r\n$5\r\nhello\r\n*2\r\n:1\r\n$-1\r\n+OK\r\n");
        bytes.extend_from_slice(b"+NEXT\r\n");
        let mut conversation = Conversation::open(&serving(bytes, 3).await).await.unwrap();
        let reply = conversation.ask(&[b"GET", b"k"]).await.unwrap();
        let BytesFrame::Array(items) = reply else { panic!("{reply:?}") };
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], BytesFrame::BulkString("hello".into()));
        while conversation.buf.len() < 7 {
            conversation.fill(1).await.unwrap();
        }
        assert_eq!(&conversation.buf[..], b"+NEXT\r\n");
    }

    /// An error reply is a refusal naming the command; a server that hangs up mid-reply is a
    /// lost connection.
    #[tokio::test]
    async fn refusals_and_lost_connections_are_told_apart() {
        let mut refused =
            Conversation::open(&serving(b"-NOAUTH Authentication required.\r\n".to_vec(), 5).await).await.unwrap();
        let err = refused.ask(&[b"COMMAND"]).await.err().unwrap();
        assert!(matches!(&err, ConversationError::Refused { command, .. } if command == "COMMAND"), "{err}");
        let mut cut = Conversation::open(&serving(b"*2\r\n:1\r\n".to_vec(), 2).await).await.unwrap();
        let err = cut.ask(&[b"COMMAND"]).await.err().unwrap();
        assert!(matches!(err, ConversationError::Lost { .. }), "{err}");
    }
}
