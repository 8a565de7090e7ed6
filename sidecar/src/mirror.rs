//! Mirrored writes and shadow reads: requests a client sent that also go to the side that does
//! not answer it (DESIGN §4).
//!
//! Each client session has at most one [`MirrorLink`] per side, with its own connection, so the
//! client's connection state (AUTH, HELLO, SELECT; see [`ConnectionState`]) is replayed there
//! and mirrored writes apply in the client's order. A link is asynchronous: the session hands it
//! a request through a bounded queue and moves on. When the queue is full the request is
//! dropped; when the connection fails, or the server answers with an error, the write failed.
//! Either way the client never waits and never sees it; every drop and failure is counted
//! (`eden_mirror_writes_total`), because each one means the two sides may differ.
//!
//! A shadow read is compared with the reply the client got, which the session's reply path
//! hands over through a oneshot; a mismatch is counted and logged with the key hashed.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{MirrorOutcome, ProxyMetrics, ShadowOutcome};
use crate::reply::{Frame, ReplyScanner};
use crate::route::Side;
use crate::upstream::Upstream;

/// Requests a link may have queued before new ones are dropped.
pub const QUEUE: usize = 4096;
/// How long a shadow reply waits for the answer the client got.
const SHADOW_WAIT: Duration = Duration::from_secs(2);

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

    /// Records a request named `name` (as [`changed_by`](Self::changed_by) returns it).
    pub fn record(&mut self, name: &str, request: Bytes) {
        match name {
            "RESET" => *self = ConnectionState::default(),
            "AUTH" => self.auth = Some(request),
            "HELLO" => self.hello = Some(request),
            _ => self.select = Some(request),
        }
    }

    /// What a fresh connection needs, in order. A connection Eden authenticates itself (the
    /// target's Secret) does not get the client's AUTH (DESIGN §6).
    pub fn replay(&self, eden_authenticated: bool) -> impl Iterator<Item = &Bytes> {
        let auth = self.auth.as_ref().filter(|_| !eden_authenticated);
        auth.into_iter().chain(&self.hello).chain(&self.select)
    }

    /// Whether `name` should be forwarded to an already open connection (a RESET or AUTH
    /// would undo Eden's own authentication).
    pub fn forward_to(name: &str, eden_authenticated: bool) -> bool {
        !eden_authenticated || !matches!(name, "AUTH" | "RESET")
    }
}

/// One request for the other side.
#[derive(Debug)]
pub enum Job {
    /// A write (or a whole mirrored transaction's request); its reply is checked for an error.
    Write(Bytes),
    /// A connection-state request (see [`ConnectionState`]); recorded for reconnects.
    State { name: &'static str, request: Bytes },
    /// A read to compare with the reply the client got.
    Shadow { request: Bytes, answered: oneshot::Receiver<Bytes>, key: u64 },
}

/// A session's asynchronous connection to one side.
pub struct MirrorLink {
    side: Side,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<ProxyMetrics>,
}

impl MirrorLink {
    /// Starts a link to `upstream`; it connects on its first job.
    pub fn open(side: Side, upstream: Upstream, state: ConnectionState, metrics: Arc<ProxyMetrics>) -> MirrorLink {
        let (jobs, queue) = mpsc::channel(QUEUE);
        let worker = Worker { side, upstream, state, metrics: metrics.clone() };
        tokio::spawn(worker.run(queue));
        MirrorLink { side, jobs, metrics }
    }

    /// Queues `job` without waiting; a full queue drops it (counted).
    pub fn send(&self, job: Job) {
        if let Err(err) = self.jobs.try_send(job) {
            let outcome = match &err {
                mpsc::error::TrySendError::Full(_) => MirrorOutcome::Dropped,
                mpsc::error::TrySendError::Closed(_) => MirrorOutcome::Failed,
            };
            match err.into_inner() {
                Job::Write(_) => self.metrics.mirror(self.side, outcome),
                Job::Shadow { .. } => self.metrics.shadow(ShadowOutcome::Failed),
                Job::State { .. } => {}
            }
        }
    }
}

/// A key as logs may show it: hashed, so values that name people or secrets stay out of logs.
pub fn hashed_key(key: Option<&[u8]>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// What a reply on the link's connection is for.
enum Expect {
    Write,
    State,
    Shadow { answered: oneshot::Receiver<Bytes>, key: u64 },
}

struct Worker {
    side: Side,
    upstream: Upstream,
    state: ConnectionState,
    metrics: Arc<ProxyMetrics>,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<Job>) {
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
                    while let Ok(job) = queue.try_recv() {
                        self.fail(job);
                    }
                }
            }
        }
    }

    fn fail(&mut self, job: Job) {
        match job {
            Job::Write(_) => self.metrics.mirror(self.side, MirrorOutcome::Failed),
            Job::Shadow { .. } => self.metrics.shadow(ShadowOutcome::Failed),
            Job::State { name, request } => self.state.record(name, request),
        }
    }

    /// Runs one connection until it fails or the session ends; returns a job that found the
    /// connection dead, for the next connection.
    async fn connected(
        &mut self,
        stream: crate::upstream::UpstreamStream,
        first: Job,
        queue: &mut mpsc::Receiver<Job>,
    ) -> Option<Job> {
        let (mut from, mut to) = tokio::io::split(stream);
        let mut expected = VecDeque::new();
        let mut out = BytesMut::new();
        for request in self.state.replay(self.upstream.has_credentials()) {
            out.extend_from_slice(request);
            expected.push_back(Expect::State);
        }
        let mut next = Some(first);
        let mut session_gone = false;
        let (mut scanner, mut replies, mut frame) = (ReplyScanner::default(), BytesMut::new(), BytesMut::new());
        loop {
            // Everything queued goes out in one write.
            while let Some(job) = next.take().or_else(|| queue.try_recv().ok()) {
                let (request, expect) = match job {
                    Job::Write(request) => (request, Expect::Write),
                    Job::State { name, request } => {
                        self.state.record(name, request.clone());
                        if !ConnectionState::forward_to(name, self.upstream.has_credentials()) {
                            continue;
                        }
                        (request, Expect::State)
                    }
                    Job::Shadow { request, answered, key } => (request, Expect::Shadow { answered, key }),
                };
                out.extend_from_slice(&request);
                expected.push_back(expect);
            }
            if !out.is_empty() && to.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
            replies.reserve(16 * 1024);
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
                    while !replies.is_empty() {
                        let Ok((n, done)) = scanner.scan(&replies) else { break };
                        let consumed = replies.split_to(n);
                        // A shadow read needs the whole reply; a write only its first byte.
                        let whole = matches!(expected.front(), Some(Expect::Shadow { .. }));
                        let keep = if whole { consumed.len() } else { (1 - frame.len().min(1)).min(consumed.len()) };
                        frame.extend_from_slice(&consumed[..keep]);
                        match done {
                            Some(Frame::Reply) => {
                                let reply = std::mem::take(&mut frame);
                                if let Some(expect) = expected.pop_front() {
                                    self.settle(expect, reply.freeze()).await;
                                }
                                if expected.is_empty() && session_gone {
                                    return None;
                                }
                            }
                            Some(Frame::Push) => frame.clear(),
                            None => break,
                        }
                    }
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
                Expect::Write => self.metrics.mirror(self.side, MirrorOutcome::Failed),
                Expect::Shadow { .. } => self.metrics.shadow(ShadowOutcome::Failed),
                Expect::State => {}
            }
        }
        next
    }

    /// Accounts for one reply: `reply` holds its first byte, or all of it for a shadow read.
    async fn settle(&self, expect: Expect, reply: Bytes) {
        match expect {
            Expect::State => {}
            Expect::Write if reply.first() == Some(&b'-') => {
                self.metrics.mirror(self.side, MirrorOutcome::Failed);
            }
            Expect::Write => self.metrics.mirror(self.side, MirrorOutcome::Applied),
            Expect::Shadow { answered, key } => match tokio::time::timeout(SHADOW_WAIT, answered).await {
                Ok(Ok(answer)) if answer == reply => self.metrics.shadow(ShadowOutcome::Match),
                Ok(Ok(answer)) => {
                    self.metrics.shadow(ShadowOutcome::Mismatch);
                    tracing::warn!(
                        key = format_args!("{key:016x}"),
                        shadow = self.side.as_str(),
                        answered_len = answer.len(),
                        shadow_len = reply.len(),
                        "shadow read differs from the reply the client got"
                    );
                }
                _ => self.metrics.shadow(ShadowOutcome::Failed),
            },
        }
    }
}
