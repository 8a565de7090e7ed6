//! One client connection, end to end.
//!
//! Each client gets its own upstream connection, so everything that is per-connection state in
//! Redis (AUTH, SELECT, HELLO 3 and push frames, MULTI/WATCH, SUBSCRIBE, blocking commands,
//! CLIENT TRACKING) works unchanged. Two directions run concurrently:
//!
//! - requests: read the client's bytes, find complete requests ([`RequestScanner`]), count
//!   them, and forward each batch of complete requests in one write: a pipeline stays a
//!   pipeline. While that write is pending nothing more is read from the client, so a huge
//!   pipeline is held back by the upstream's pace instead of growing our buffer.
//! - replies: copied from the upstream to the client as bytes. A slow client holds back the
//!   copy, which stops reading the upstream: Redis buffers, we do not.
//!
//! The upstream is connected on the first request, so idle clients cost no upstream
//! connection. When that connect fails, every request of the batch gets
//! `-ERR eden: upstream … unreachable: …` and the next request tries again. Once connected,
//! the two connections live and die together: if either side closes, both close. A client's
//! EOF closes the upstream at once (Redis frees a client on EOF, which unblocks its BLPOP);
//! only shutdown and protocol errors wait for replies already due.
//!
//! This is the plain proxy, which pays nothing for routing. With a migration strategy,
//! [`routed`] serves the client instead: the same request scanning, but each request goes to
//! the side the strategy picks, and [`replies`] puts replies from both back in request order.

mod replies;
pub mod routed;
mod writes;

pub use writes::ClientWrites;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{oneshot, watch};

use crate::command::RecentCommand;
use crate::frame::{ProtocolError, RequestScanner};
use crate::metrics::{CommandCounts, ErrorKind, ProxyMetrics};
use crate::route::Side;
use crate::upstream::{Upstream, UpstreamError, UpstreamStream};

/// Read buffer size for each direction.
pub(crate) const BUFFER: usize = 16 * 1024;
/// After shutdown is signalled, how long replies to requests already forwarded may take.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one client until either side closes or shutdown completes.
pub async fn serve<C>(client: C, upstream: Upstream, metrics: Arc<ProxyMetrics>, mut shutdown: watch::Receiver<bool>)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    metrics.connection_opened();
    let (mut client_reader, client_writer) = tokio::io::split(client);
    let mut session = Session {
        upstream,
        metrics: metrics.clone(),
        scanner: RequestScanner::default(),
        recent: RecentCommand::default(),
        state: State::Idle(client_writer),
    };
    let mut requests = BytesMut::with_capacity(BUFFER);
    // Made once, not per read: waiting for shutdown registers with the watch channel.
    let stop = crate::server::stopped(&mut shutdown);
    tokio::pin!(stop);
    loop {
        let read = tokio::select! {
            biased;
            () = &mut stop => {
                session.drain().await;
                break;
            }
            () = session.replies_done() => break,
            read = client_reader.read_buf(&mut requests) => read,
        };
        match read {
            Ok(0) | Err(_) => {
                session.abandon();
                break;
            }
            Ok(_) => {
                if !session.forward(&mut requests).await {
                    break;
                }
                requests.reserve(BUFFER);
            }
        }
    }
    metrics.connection_closed();
}

/// When the oldest unanswered batch was forwarded, for `eden_proxy_latency_seconds`: the time
/// from forwarding to the upstream's first reply byte. Shared by a session's two directions.
#[derive(Debug)]
pub(crate) struct Latency {
    /// Nanoseconds since `epoch`; 0 when nothing is waiting.
    since: AtomicU64,
    epoch: Instant,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { since: AtomicU64::new(0), epoch: Instant::now() }
    }
}

impl Latency {
    /// A batch went out; the clock starts unless an older batch is still unanswered.
    pub(crate) fn forwarded(&self) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let _ = self.since.compare_exchange(0, now.max(1), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The upstream started answering: the oldest batch's latency is known.
    pub(crate) fn answered(&self, metrics: &ProxyMetrics) {
        let since = self.since.swap(0, Ordering::Relaxed);
        if since != 0 {
            let now = self.epoch.elapsed().as_nanos() as u64;
            metrics.observe_latency(Duration::from_nanos(now.saturating_sub(since)));
        }
    }

    /// Whether every forwarded batch has started to be answered.
    fn quiet(&self) -> bool {
        self.since.load(Ordering::Relaxed) == 0
    }
}

struct Session<C> {
    upstream: Upstream,
    metrics: Arc<ProxyMetrics>,
    scanner: RequestScanner,
    recent: RecentCommand,
    state: State<C>,
}

enum State<C> {
    /// No upstream yet (or the last connect failed); we answer the client ourselves.
    Idle(WriteHalf<C>),
    Connected {
        to_upstream: WriteHalf<UpstreamStream>,
        /// Copies replies to the client; finishes when either side closes.
        replies: tokio::task::JoinHandle<()>,
        /// Tells the reply copy to finish: let due replies arrive, write these bytes, close.
        finish: oneshot::Sender<Vec<u8>>,
        latency: Arc<Latency>,
    },
    Closed,
}

impl<C: AsyncRead + AsyncWrite + Send + 'static> Session<C> {
    /// Forwards every complete request at the front of `buffer`; false when the session must end.
    async fn forward(&mut self, buffer: &mut BytesMut) -> bool {
        let (complete, mut counts, error) = self.complete_requests(buffer);
        if complete > 0 {
            let requests = counts.total();
            self.metrics.commands(&mut counts);
            let batch = buffer.split_to(complete);
            if !self.send(&batch, requests).await {
                return false;
            }
        }
        match error {
            None => true,
            Some(error) => {
                self.metrics.error(ErrorKind::Protocol);
                tracing::debug!(%error, "malformed request; closing the connection");
                self.close_with(error.to_resp().into_bytes()).await;
                false
            }
        }
    }

    /// How many bytes of complete requests `buffer` starts with, what requests they are, and
    /// the protocol error that stops the scan, if any.
    fn complete_requests(&mut self, buffer: &[u8]) -> (usize, CommandCounts, Option<ProtocolError>) {
        let (mut complete, mut requests) = (0, CommandCounts::default());
        loop {
            match self.scanner.scan(&buffer[complete..]) {
                Ok(Some(request)) => {
                    if request.argc > 0 {
                        requests.count(Side::Source, self.recent.kind(&buffer[complete..], &request));
                    }
                    complete += request.len;
                }
                Ok(None) => return (complete, requests, None),
                Err(error) => return (complete, requests, Some(error)),
            }
        }
    }

    async fn send(&mut self, batch: &[u8], requests: u64) -> bool {
        if let State::Idle(_) = self.state
            && let Err(error) = self.connect().await
        {
            self.metrics.error(ErrorKind::UpstreamUnreachable);
            tracing::warn!(%error, "upstream unreachable; answering with an error, retrying on the next request");
            let reply = unreachable_reply(&error);
            let State::Idle(writer) = &mut self.state else { return false };
            for _ in 0..requests {
                if writer.write_all(reply.as_bytes()).await.is_err() {
                    return false;
                }
            }
            return true;
        }
        let State::Connected { to_upstream, latency, .. } = &mut self.state else { return false };
        latency.forwarded();
        if to_upstream.write_all(batch).await.is_err() {
            self.metrics.error(ErrorKind::Io);
            return false;
        }
        true
    }

    async fn connect(&mut self) -> Result<(), crate::upstream::UpstreamError> {
        let stream = self.upstream.connect().await?;
        let State::Idle(to_client) = std::mem::replace(&mut self.state, State::Closed) else { unreachable!() };
        let (from_upstream, to_upstream) = tokio::io::split(stream);
        let latency = Arc::new(Latency::default());
        let (finish, finishing) = oneshot::channel();
        let copy = ReplyCopy { to_client, latency: latency.clone(), metrics: self.metrics.clone() };
        let replies = tokio::spawn(copy.run(from_upstream, finishing));
        self.state = State::Connected { to_upstream, replies, finish, latency };
        Ok(())
    }

    /// Resolves when the reply copy has ended (either side closed); never while idle.
    async fn replies_done(&mut self) {
        match &mut self.state {
            State::Connected { replies, .. } => {
                let _ = replies.await;
                self.state = State::Closed;
            }
            _ => std::future::pending().await,
        }
    }

    /// Ends the session after the replies already due, with `closing` as the last bytes the
    /// client receives (a protocol error, or nothing on shutdown).
    async fn close_with(&mut self, closing: Vec<u8>) {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Idle(mut writer) => {
                let _ = writer.write_all(&closing).await;
                let _ = writer.shutdown().await;
            }
            State::Connected { mut to_upstream, replies, finish, .. } => {
                let _ = finish.send(closing);
                let _ = replies.await;
                let _ = to_upstream.shutdown().await;
            }
            State::Closed => {}
        }
    }

    /// The client is gone: drop the upstream now, as Redis frees a client on EOF. Nobody is
    /// left to read replies, and a lingering upstream would let a blocked BLPOP pop an item
    /// for a client that no longer exists.
    fn abandon(&mut self) {
        if let State::Connected { replies, .. } = std::mem::replace(&mut self.state, State::Closed) {
            // The copy task owns the upstream's read half; the socket closes when both halves drop.
            replies.abort();
        }
    }

    /// Shutdown: stop reading new requests and let replies to forwarded ones arrive.
    async fn drain(&mut self) {
        self.close_with(Vec::new()).await;
    }
}

/// The reply direction of a session.
struct ReplyCopy<C> {
    to_client: WriteHalf<C>,
    latency: Arc<Latency>,
    metrics: Arc<ProxyMetrics>,
}

impl<C: AsyncWrite> ReplyCopy<C> {
    /// Copies replies until either side closes, or until told to finish: then it waits for
    /// the upstream to answer what was forwarded (bounded by [`DRAIN_TIMEOUT`]; replies are
    /// copied as bytes, so "answered" is observed as the upstream going quiet), writes the
    /// closing bytes and closes the client.
    async fn run(mut self, mut from_upstream: ReadHalf<UpstreamStream>, mut finish: oneshot::Receiver<Vec<u8>>) {
        let mut buffer = BytesMut::with_capacity(BUFFER);
        let closing = loop {
            tokio::select! {
                biased;
                read = from_upstream.read_buf(&mut buffer) => if !self.copy(read, &mut buffer).await {
                    return self.close().await;
                },
                words = &mut finish => break words.unwrap_or_default(),
            }
        };
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            tokio::select! {
                read = from_upstream.read_buf(&mut buffer) => if !self.copy(read, &mut buffer).await {
                    break;
                },
                () = tokio::time::sleep(Duration::from_millis(20)) => {
                    if self.latency.quiet() || Instant::now() > deadline {
                        let _ = self.to_client.write_all(&closing).await;
                        break;
                    }
                }
            }
        }
        self.close().await
    }

    /// Passes on what one read of the upstream brought; false once either side is done.
    async fn copy(&mut self, read: std::io::Result<usize>, buffer: &mut BytesMut) -> bool {
        match read {
            Ok(0) => false,
            Ok(_) => {
                self.latency.answered(&self.metrics);
                let written = self.to_client.write_all(buffer).await.is_ok();
                buffer.clear();
                written
            }
            Err(_) => {
                self.metrics.error(ErrorKind::Io);
                false
            }
        }
    }

    async fn close(&mut self) {
        let _ = self.to_client.shutdown().await;
    }
}

/// What each request gets while its upstream is unreachable.
fn unreachable_reply(error: &UpstreamError) -> String {
    format!("-ERR eden: {error}\r\n")
}
