//! Mirrored writes and shadow reads: requests a client sent that also go to the side that does
//! not answer it (DESIGN §4).
//!
//! Each client session has at most one [`MirrorLink`] per side, and each link one connection,
//! so the client's connection state (AUTH, HELLO, SELECT; see [`ConnectionState`]) is replayed
//! there and mirrored writes apply in the client's order. A link is asynchronous: the session hands it
//! requests through a bounded queue and moves on. When the queue is full the requests are
//! dropped; when the connection fails, or the server answers with an error, the write failed.
//! Either way the client never waits and never sees it; every drop and failure is counted
//! (`eden_mirror_writes_total`), because each one means the two sides may differ.
//!
//! The cost of a mirrored write is paid per batch, not per request: the session collects the
//! writes of one batch of client requests ([`MirrorLink::write`]) and hands them over as one
//! job ([`MirrorLink::flush`]), so a pipeline costs one queue push and one wake-up; the link
//! writes everything queued in one write and accounts for the replies as they are scanned,
//! without copying them.
//!
//! Most sessions never change their connection state, and their mirrored writes need nothing a
//! connection of their own would give them: they share one connection per side ([`MirrorPool`]),
//! so the writes of many clients that arrive together go out in one write, and the other side
//! reads them in one read instead of one per client. A session leaves the shared connection
//! for one of its own when it changes its connection state, mirrors a transaction or shadows a
//! read; its own connection sends nothing until the shared one has answered everything the
//! session sent there (a barrier), so its writes still apply in its order.
//!
//! A shadow read is compared with the reply the client got, which the session's reply path
//! hands over through a oneshot; a mismatch is counted and logged with the key hashed.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::frame::RequestScanner;
use crate::metrics::{MirrorOutcome, ProxyMetrics, ShadowOutcome};
use crate::reply::{Frame, ReplyScanner};
use crate::route::Side;
use crate::upstream::Upstream;

/// Requests a session's own link may have queued before new ones are dropped.
pub const QUEUE: usize = 4096;
/// Requests a shared link may have queued: it carries the writes of every session in the pool.
pub const SHARED_QUEUE: usize = 16 * QUEUE;
/// How long a shadow reply waits for the answer the client got.
const SHADOW_WAIT: Duration = Duration::from_secs(2);
/// Read buffer for replies.
const BUFFER: usize = 16 * 1024;

/// The requests that set per-connection state, kept so a new connection can be brought to the
/// state the client's own connection is in.
#[derive(Debug, Clone, Default)]
pub struct ConnectionState {
    auth: Option<Bytes>,
    hello: Option<Bytes>,
    select: Option<Bytes>,
}

impl ConnectionState {
    /// The canonical name of a command that changes connection state; `None` for others.
    pub fn changed_by(name: &[u8]) -> Option<&'static str> {
        ["AUTH", "HELLO", "SELECT", "RESET"].into_iter().find(|n| name.eq_ignore_ascii_case(n.as_bytes()))
    }

    /// Whether no request has changed the state yet (or RESET undid it).
    pub fn is_initial(&self) -> bool {
        self.auth.is_none() && self.hello.is_none() && self.select.is_none()
    }

    /// Records a request named `name` (as [`changed_by`](Self::changed_by) returns it).
    pub fn record(&mut self, name: &str, request: Bytes) {
        match name {
            "RESET" => *self = ConnectionState::default(),
            "AUTH" => self.auth = Some(request),
            "HELLO" => self.hello = Some(request),
            _ => self.select = Some(request),
        }
    }

    /// What a fresh connection needs, in order, each request as [`forwarded`](Self::forwarded)
    /// makes it for that connection.
    pub fn replay(&self, eden_authenticated: bool) -> impl Iterator<Item = Bytes> {
        let recorded = [("AUTH", &self.auth), ("HELLO", &self.hello), ("SELECT", &self.select)];
        recorded.into_iter().filter_map(move |(name, request)| {
            request.as_ref().and_then(|request| Self::forwarded(name, request, eden_authenticated))
        })
    }

    /// `request` (named `name`) as a connection should get it. One Eden authenticates itself
    /// (the target's Secret, DESIGN §6) gets neither the client's AUTH nor RESET, which would
    /// undo that, and HELLO without its AUTH clause: those are the client's credentials, which
    /// it would refuse, and the whole HELLO with them, leaving the connection in RESP2.
    pub fn forwarded(name: &str, request: &Bytes, eden_authenticated: bool) -> Option<Bytes> {
        match name {
            _ if !eden_authenticated => Some(request.clone()),
            "AUTH" | "RESET" => None,
            "HELLO" => Some(without_auth(request)),
            _ => Some(request.clone()),
        }
    }
}

/// A HELLO request without its `AUTH username password` clause; as it is when it has none.
fn without_auth(hello: &Bytes) -> Bytes {
    let Ok(Some(request)) = RequestScanner::default().scan(hello) else { return hello.clone() };
    let args: Vec<&[u8]> = request.args(hello).map(|arg| &hello[arg]).collect();
    // HELLO protover [AUTH username password] [SETNAME clientname], the clauses in either order.
    let mut kept: Vec<&[u8]> = args.iter().take(2).copied().collect();
    let mut rest = args.get(2..).unwrap_or_default();
    while let Some(option) = rest.first() {
        let auth = option.eq_ignore_ascii_case(b"AUTH");
        let clause = if auth {
            3
        } else if option.eq_ignore_ascii_case(b"SETNAME") {
            2
        } else {
            1
        };
        let (taken, left) = rest.split_at(clause.min(rest.len()));
        if !auth {
            kept.extend(taken);
        }
        rest = left;
    }
    if kept.len() == args.len() {
        return hello.clone();
    }
    let mut out = BytesMut::from(format!("*{}\r\n", kept.len()).as_bytes());
    for arg in kept {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out.freeze()
}

/// Requests for the other side, as the link queues them.
#[derive(Debug)]
pub enum Job {
    /// `count` writes (a mirrored transaction's requests among them), back to back; each
    /// reply is checked for an error.
    Writes { requests: Bytes, count: u32 },
    /// A connection-state request (see [`ConnectionState`]); recorded for reconnects.
    State { name: &'static str, request: Bytes },
    /// A read to compare with the reply the client got.
    Shadow { request: Bytes, answered: oneshot::Receiver<Bytes>, key: u64 },
    /// Nothing to send: fired once every request queued before it has been answered (or has
    /// failed), dropped unfired when the connection fails.
    Barrier(oneshot::Sender<()>),
}

impl Job {
    /// How many requests the job holds, as the queue's bound counts them.
    fn requests(&self) -> usize {
        match self {
            Job::Writes { count, .. } => *count as usize,
            Job::State { .. } | Job::Shadow { .. } => 1,
            Job::Barrier(_) => 0,
        }
    }
}

/// The sending end of a link worker's queue; a shared link hands a clone to every session.
#[derive(Debug, Clone)]
struct Jobs {
    jobs: mpsc::UnboundedSender<Job>,
    /// Requests queued and not yet taken by the worker: what `limit` bounds.
    queued: Arc<AtomicUsize>,
    limit: usize,
}

impl Jobs {
    /// Starts a worker for a link to `upstream` whose connection is in `state`; it connects on
    /// its first job, and sends nothing before `after` has fired or been dropped.
    fn spawn(link: Worker, after: Option<oneshot::Receiver<()>>) -> Jobs {
        let (jobs, receiver) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let limit = if link.shared { SHARED_QUEUE } else { QUEUE };
        tokio::spawn(link.run(Queue { jobs: receiver, queued: queued.clone() }, after));
        Jobs { jobs, queued, limit }
    }
}

/// The shared links of one plan, one per side, started on first use (see the module doc).
#[derive(Debug, Default)]
pub struct MirrorPool {
    links: [OnceLock<Jobs>; 2],
}

impl MirrorPool {
    /// A link to `side` (at `upstream`) for a session still in its initial connection state.
    pub fn link(&self, side: Side, upstream: &Upstream, metrics: &Arc<ProxyMetrics>) -> MirrorLink {
        let jobs = self.links[side as usize].get_or_init(|| {
            let state = ConnectionState::default();
            Jobs::spawn(
                Worker { side, upstream: upstream.clone(), state, shared: true, metrics: metrics.clone() },
                None,
            )
        });
        MirrorLink::new(side, upstream.clone(), jobs.clone(), true, metrics.clone())
    }
}

/// A session's asynchronous connection to one side: its own, or a shared one.
pub struct MirrorLink {
    side: Side,
    upstream: Upstream,
    jobs: Jobs,
    shared: bool,
    /// This batch's writes, not yet queued.
    batch: BytesMut,
    batched: u32,
    metrics: Arc<ProxyMetrics>,
}

impl MirrorLink {
    /// Starts a link of the session's own to `upstream`; it connects on its first job.
    pub fn open(side: Side, upstream: Upstream, state: ConnectionState, metrics: Arc<ProxyMetrics>) -> MirrorLink {
        let worker = Worker { side, upstream: upstream.clone(), state, shared: false, metrics: metrics.clone() };
        MirrorLink::new(side, upstream, Jobs::spawn(worker, None), false, metrics)
    }

    fn new(side: Side, upstream: Upstream, jobs: Jobs, shared: bool, metrics: Arc<ProxyMetrics>) -> MirrorLink {
        MirrorLink { side, upstream, jobs, shared, batch: BytesMut::new(), batched: 0, metrics }
    }

    /// Moves a link on a shared connection to one of the session's own, in `state`, which
    /// starts sending once the shared one has answered what the session sent there.
    pub fn own(&mut self, state: &ConnectionState) {
        if !self.shared {
            return;
        }
        let (barrier, after) = oneshot::channel();
        self.send(Job::Barrier(barrier));
        let (side, upstream, metrics) = (self.side, self.upstream.clone(), self.metrics.clone());
        let worker = Worker { side, upstream, state: state.clone(), shared: false, metrics };
        self.jobs = Jobs::spawn(worker, Some(after));
        self.shared = false;
    }

    /// Adds a write to this batch; [`flush`](Self::flush) queues the batch.
    pub fn write(&mut self, request: &[u8]) {
        self.batch.extend_from_slice(request);
        self.batched += 1;
    }

    /// Queues this batch's writes as one job, without waiting.
    pub fn flush(&mut self) {
        if self.batched > 0 {
            let (requests, count) = (self.batch.split().freeze(), std::mem::take(&mut self.batched));
            self.queue(Job::Writes { requests, count });
        }
    }

    /// Queues `job` after this batch's writes, without waiting.
    pub fn send(&mut self, job: Job) {
        self.flush();
        self.queue(job);
    }

    /// A full queue drops `job` (counted). Connection state and barriers are never dropped: a
    /// lost SELECT would send every later write to the wrong database. A batch larger than the
    /// whole queue still goes when the queue is empty.
    fn queue(&self, job: Job) {
        let requests = job.requests();
        let queued = self.jobs.queued.fetch_add(requests, Ordering::Relaxed);
        let droppable = matches!(job, Job::Writes { .. } | Job::Shadow { .. });
        let (job, outcome) = if droppable && queued > 0 && queued + requests > self.jobs.limit {
            (job, MirrorOutcome::Dropped)
        } else {
            match self.jobs.jobs.send(job) {
                Ok(()) => return,
                Err(mpsc::error::SendError(job)) => (job, MirrorOutcome::Failed),
            }
        };
        self.jobs.queued.fetch_sub(requests, Ordering::Relaxed);
        match job {
            Job::Writes { count, .. } => self.metrics.mirror(self.side, outcome, count.into()),
            Job::Shadow { .. } => self.metrics.shadow(ShadowOutcome::Failed),
            Job::State { .. } | Job::Barrier(_) => {}
        }
    }
}

impl Drop for MirrorLink {
    /// A link dropped mid-batch (the session pinned itself) still hands over what it was given.
    fn drop(&mut self) {
        self.flush();
    }
}

/// The worker's end of a link's queue.
struct Queue {
    jobs: mpsc::UnboundedReceiver<Job>,
    queued: Arc<AtomicUsize>,
}

impl Queue {
    /// The next job; `None` once the session is gone and everything it queued was taken.
    async fn recv(&mut self) -> Option<Job> {
        let job = self.jobs.recv().await;
        self.taken(job)
    }

    fn try_recv(&mut self) -> Option<Job> {
        let job = self.jobs.try_recv().ok();
        self.taken(job)
    }

    fn taken(&self, job: Option<Job>) -> Option<Job> {
        if let Some(job) = &job {
            self.queued.fetch_sub(job.requests(), Ordering::Relaxed);
        }
        job
    }
}

/// A key as logs may show it: hashed, so values that name people or secrets stay out of logs.
pub fn hashed_key(key: Option<&[u8]>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// What replies on the link's connection are for.
enum Expect {
    /// So many writes' replies: each counted as applied or failed.
    Writes(u32),
    State,
    Shadow {
        answered: oneshot::Receiver<Bytes>,
        key: u64,
    },
    /// Fired when it reaches the front: everything before it has been answered.
    Barrier(oneshot::Sender<()>),
}

struct Worker {
    side: Side,
    upstream: Upstream,
    state: ConnectionState,
    /// Serves a [`MirrorPool`]: gathers what every ready session has queued before writing.
    shared: bool,
    metrics: Arc<ProxyMetrics>,
}

impl Worker {
    async fn run(mut self, mut queue: Queue, after: Option<oneshot::Receiver<()>>) {
        if let Some(after) = after {
            let _ = after.await;
        }
        let mut first = None;
        loop {
            let Some(job) = (match first.take() {
                Some(job) => Some(job),
                None => queue.recv().await,
            }) else {
                return;
            };
            match self.upstream.connect().await {
                Ok(stream) => first = self.connected(stream, job, &mut queue).await,
                Err(err) => {
                    tracing::warn!(side = self.side.as_str(), %err, "mirror connection failed; counting its requests as failed");
                    // Everything already queued fails with it, rather than waiting one connect
                    // timeout each; the next request tries again.
                    self.fail(job);
                    while let Some(job) = queue.try_recv() {
                        self.fail(job);
                    }
                }
            }
        }
    }

    fn fail(&mut self, job: Job) {
        match job {
            Job::Writes { count, .. } => self.metrics.mirror(self.side, MirrorOutcome::Failed, count.into()),
            Job::Shadow { .. } => self.metrics.shadow(ShadowOutcome::Failed),
            Job::State { name, request } => self.state.record(name, request),
            Job::Barrier(_) => {}
        }
    }

    /// Runs one connection until it fails or the session ends; returns a job that found the
    /// connection dead, for the next connection.
    async fn connected(
        &mut self,
        stream: crate::upstream::UpstreamStream,
        first: Job,
        queue: &mut Queue,
    ) -> Option<Job> {
        let (mut from, mut to) = tokio::io::split(stream);
        let mut expected = VecDeque::new();
        let mut out = BytesMut::new();
        for request in self.state.replay(self.upstream.has_credentials()) {
            out.extend_from_slice(&request);
            expected.push_back(Expect::State);
        }
        let mut next = Some(first);
        let mut session_gone = false;
        let mut scanner = ReplyScanner::default();
        let mut replies = BytesMut::with_capacity(BUFFER);
        // The reply being scanned: its first byte tells a write's error; a shadow read keeps it whole.
        let (mut first_byte, mut whole) = (None, BytesMut::new());
        'connection: loop {
            if self.shared && next.is_some() {
                // Let the other sessions that are ready run first: their writes join this one.
                tokio::task::yield_now().await;
            }
            // Everything queued goes out in one write.
            while let Some(job) = next.take().or_else(|| queue.try_recv()) {
                let (request, expect) = match job {
                    Job::Writes { requests, count } => (requests, Expect::Writes(count)),
                    Job::State { name, request } => {
                        let forwarded = ConnectionState::forwarded(name, &request, self.upstream.has_credentials());
                        self.state.record(name, request);
                        let Some(request) = forwarded else { continue };
                        (request, Expect::State)
                    }
                    Job::Shadow { request, answered, key } => (request, Expect::Shadow { answered, key }),
                    Job::Barrier(barrier) if expected.is_empty() => {
                        let _ = barrier.send(());
                        continue;
                    }
                    Job::Barrier(barrier) => {
                        expected.push_back(Expect::Barrier(barrier));
                        continue;
                    }
                };
                out.extend_from_slice(&request);
                match (expected.back_mut(), expect) {
                    (Some(Expect::Writes(queued)), Expect::Writes(count)) => *queued += count,
                    (_, expect) => expected.push_back(expect),
                }
            }
            if !out.is_empty() && to.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
            replies.reserve(BUFFER);
            tokio::select! {
                job = queue.recv(), if !session_gone => match job {
                    Some(job) => next = Some(job),
                    None if expected.is_empty() => return None,
                    // The session is gone: let what was sent be answered, then stop.
                    None => session_gone = true,
                },
                read = from.read_buf(&mut replies) => {
                    if !matches!(read, Ok(n) if n > 0) {
                        break;
                    }
                    let mut scanned = 0;
                    while scanned < replies.len() {
                        // Writes answered with `+OK` and the like are counted a run at a time.
                        if let Some(&Expect::Writes(count)) = expected.front() {
                            let (n, applied) = scanner.single_lines(&replies[scanned..], count);
                            if applied > 0 {
                                scanned += n;
                                self.writes_settled(&mut expected, applied, MirrorOutcome::Applied);
                                if expected.is_empty() && session_gone {
                                    return None;
                                }
                                continue;
                            }
                        }
                        let Ok((n, done)) = scanner.scan(&replies[scanned..]) else {
                            tracing::warn!(side = self.side.as_str(), "unreadable reply on the mirror connection");
                            break 'connection;
                        };
                        let part = &replies[scanned..scanned + n];
                        scanned += n;
                        if matches!(expected.front(), Some(Expect::Shadow { .. })) {
                            whole.extend_from_slice(part);
                        }
                        first_byte = first_byte.or(part.first().copied());
                        match done {
                            Some(Frame::Reply) => {
                                let failed = first_byte.take() == Some(b'-');
                                self.settle(&mut expected, failed, &mut whole).await;
                                if expected.is_empty() && session_gone {
                                    return None;
                                }
                            }
                            Some(Frame::Push) => {
                                first_byte = None;
                                whole.clear();
                            }
                            None => break,
                        }
                    }
                    replies.advance(scanned);
                }
            }
        }
        tracing::warn!(
            side = self.side.as_str(),
            pending = expected.len(),
            "mirror connection lost; counting its requests as failed"
        );
        for expect in expected {
            match expect {
                Expect::Writes(count) => self.metrics.mirror(self.side, MirrorOutcome::Failed, count.into()),
                Expect::Shadow { .. } => self.metrics.shadow(ShadowOutcome::Failed),
                Expect::State | Expect::Barrier(_) => {}
            }
        }
        next
    }

    /// Accounts for the reply to the oldest request on the connection: `failed` when it is an
    /// error; `whole` holds all of it when it answers a shadow read.
    async fn settle(&self, expected: &mut VecDeque<Expect>, failed: bool, whole: &mut BytesMut) {
        if matches!(expected.front(), Some(Expect::Writes(_))) {
            let outcome = if failed { MirrorOutcome::Failed } else { MirrorOutcome::Applied };
            self.writes_settled(expected, 1, outcome);
            return;
        }
        if let Some(Expect::Shadow { answered, key }) = expected.pop_front() {
            self.compare(answered, key, whole).await;
        }
        whole.clear();
        release_barriers(expected);
    }

    /// Accounts for `replies` replies, all with `outcome`, to the writes at the front of
    /// `expected` (no more than it holds there).
    fn writes_settled(&self, expected: &mut VecDeque<Expect>, replies: u32, outcome: MirrorOutcome) {
        self.metrics.mirror(self.side, outcome, replies.into());
        if let Some(Expect::Writes(count)) = expected.front_mut() {
            *count -= replies;
            if *count == 0 {
                expected.pop_front();
                release_barriers(expected);
            }
        }
    }

    /// Compares a shadow read's reply (`whole`) with the one the client got.
    async fn compare(&self, answered: oneshot::Receiver<Bytes>, key: u64, whole: &BytesMut) {
        match tokio::time::timeout(SHADOW_WAIT, answered).await {
            Ok(Ok(answer)) if answer[..] == whole[..] => self.metrics.shadow(ShadowOutcome::Match),
            Ok(Ok(answer)) => {
                self.metrics.shadow(ShadowOutcome::Mismatch);
                tracing::warn!(
                    key = format_args!("{key:016x}"),
                    shadow = self.side.as_str(),
                    answered_len = answer.len(),
                    shadow_len = whole.len(),
                    "shadow read differs from the reply the client got"
                );
            }
            _ => self.metrics.shadow(ShadowOutcome::Failed),
        }
    }
}

/// Fires the barriers at the front of `expected`: everything queued before them is answered.
fn release_barriers(expected: &mut VecDeque<Expect>) {
    while let Some(Expect::Barrier(_)) = expected.front() {
        if let Some(Expect::Barrier(barrier)) = expected.pop_front() {
            let _ = barrier.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(args: &[&str]) -> Bytes {
        let mut out = format!("*{}\r\n", args.len());
        for arg in args {
            out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        Bytes::from(out)
    }

    #[test]
    fn a_connection_eden_authenticates_gets_hello_without_the_clients_credentials() {
        let hello = resp(&["HELLO", "3", "SETNAME", "auth", "auth", "user", "pass"]);
        let forwarded = |request: &Bytes, eden| ConnectionState::forwarded("HELLO", request, eden);
        assert_eq!(forwarded(&hello, true), Some(resp(&["HELLO", "3", "SETNAME", "auth"])));
        assert_eq!(forwarded(&hello, false), Some(hello.clone()), "the client's own credentials pass");
        let plain = resp(&["hello", "2"]);
        assert_eq!(forwarded(&plain, true), Some(plain.clone()));
        assert_eq!(ConnectionState::forwarded("AUTH", &resp(&["AUTH", "pw"]), true), None);

        let mut state = ConnectionState::default();
        state.record("AUTH", resp(&["AUTH", "pw"]));
        state.record("HELLO", resp(&["HELLO", "3", "AUTH", "user", "pw"]));
        state.record("SELECT", resp(&["SELECT", "2"]));
        let replayed: Vec<Bytes> = state.replay(true).collect();
        assert_eq!(replayed, [resp(&["HELLO", "3"]), resp(&["SELECT", "2"])]);
        assert_eq!(state.replay(false).count(), 3);
    }
}
