//! The reply direction of a routed session: replies from two upstreams, put back in the order
//! the client sent its requests.
//!
//! The request side tells this task, in request order, what is due ([`Due`]): so many replies
//! from one side, a reply the proxy makes itself, a new connection ([`Dues`], which wakes this
//! task only when nothing else would). Each side's bytes are
//! scanned for reply boundaries ([`ReplyScanner`]) and passed on as they arrive while that
//! side is at the head of the queue (a large value streams through instead of being
//! buffered); a side that answers early waits in its buffer. RESP3 pushes answer no request
//! and are passed on between replies. Replies to requests the proxy sent on its own (the
//! connection state replayed on a new connection) are read and dropped.
//!
//! The source connection lives and dies with the client, as in a plain session. A target
//! connection that closes fails only the requests waiting on it (`-ERR eden: …`), and the
//! next request to the target reconnects.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::writes::{SessionWrites, SharedInstant, SourceWrites};
use super::{BUFFER, DRAIN_TIMEOUT, Latency};
use crate::metrics::{ErrorKind, ProxyMetrics};
use crate::reply::{Frame, ReplyScanner, Taken};
use crate::route::Side;
use crate::upstream::UpstreamStream;

/// A side that answered ahead of its turn is not read further past this many buffered bytes.
const EARLY_LIMIT: usize = 1024 * 1024;

/// What comes next on the client's connection, in request order.
pub(super) enum Due {
    /// `count` replies from `side`; to the client unless `discard`.
    Replies { side: Side, count: u32, discard: bool },
    /// One reply from `side` to the client, and a copy of it for a shadow comparison.
    Copied { side: Side, copy: oneshot::Sender<Bytes> },
    /// A reply the proxy makes itself.
    Made(Bytes),
    /// A new connection to `side` (at `addr`); what is due after this comes from it.
    Opened { side: Side, from: ReadHalf<UpstreamStream>, addr: Arc<str> },
    /// From here on the client gets `side`'s bytes as they come (subscribers, MONITOR).
    Pin(Side),
    /// Deliver everything due, then these bytes, then close.
    Finish(Vec<u8>),
    /// The writes of a batch, answered once everything before this reached the client.
    Settled(SourceWrites),
    /// A read sent to both sides: the target's reply when it has come by `deadline`, else the
    /// source's; the other one is dropped when it arrives.
    Hedged { deadline: Instant },
}

/// The hand-off of dues from the request side to this task.
///
/// Waking this task for every batch would cost a task switch per request for a client that
/// waits for each reply, on top of the one its reply's arrival costs (the plain proxy pays only
/// the latter). Most dues need no wake-up of their own: replies due from a side this task is
/// reading get looked at when that side's bytes arrive, and those bytes cannot arrive before
/// the due is handed over, because the request side hands a batch's dues over before it writes
/// the batch. After every wake-up (the arrival of a side's bytes included) this task takes
/// what was handed over before it looks at anything, so every byte it has read has its due in
/// its queue.
/// Everything else (a reply the proxy makes, a new connection, a pin, a deadline, the end, or
/// replies from a side this task is not reading) wakes it.
///
/// Which sides this task is reading is published in the same lock as it takes the dues, and
/// read by the request side in the lock it hands them over in: either the hand-off comes first
/// and this task finds the due, or the publication does and the request side sees the side
/// unread and wakes it. A due is never left unseen by a task that sleeps. The queues trade
/// places instead of copying dues when the receiving one is empty (nearly always), so no due
/// is copied and no buffer grows past the largest batch.
#[derive(Default)]
struct Handoff(Mutex<Handed>);

#[derive(Default)]
struct Handed {
    dues: VecDeque<Due>,
    /// The sides the reply task will wake up for: connected and not closed, as of its last take.
    reading: [bool; 2],
    /// The request side is gone.
    closed: bool,
    /// Something was handed over that needs the reply task, since its last take.
    woken: bool,
    /// The reply task, while it waits for `woken`.
    waker: Option<Waker>,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Handed> {
        // Nothing panics while holding the lock; were it poisoned, the queue would still be whole.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Marks the reply task woken and wakes it, after `handed` is unlocked.
    fn wake(mut handed: MutexGuard<'_, Handed>) {
        handed.woken = true;
        let waker = handed.waker.take();
        drop(handed);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The request side's end of the hand-off.
pub(super) struct Dues(Arc<Handoff>);

impl Dues {
    /// Hands over `dues` (emptying it), in order, waking the reply task if one needs it.
    pub fn hand_over(&self, dues: &mut VecDeque<Due>) {
        if dues.is_empty() {
            return;
        }
        let mut handed = self.0.lock();
        let wake = dues.iter().any(|due| due.wakes(handed.reading));
        append(&mut handed.dues, dues);
        if wake {
            Handoff::wake(handed);
        }
    }
}

impl Drop for Dues {
    fn drop(&mut self) {
        let mut handed = self.0.lock();
        handed.closed = true;
        Handoff::wake(handed);
    }
}

/// The reply task's end of the hand-off.
pub(super) struct DueQueue(Arc<Handoff>);

/// A new hand-off: the request side's end and the reply task's.
pub(super) fn dues() -> (Dues, DueQueue) {
    let handoff = Arc::new(Handoff::default());
    (Dues(handoff.clone()), DueQueue(handoff))
}

impl DueQueue {
    /// Moves what was handed over to the back of `queue`, telling the request side which sides
    /// are `reading`; false when the request side is gone.
    fn take(&self, queue: &mut VecDeque<Due>, reading: [bool; 2]) -> bool {
        let mut handed = self.0.lock();
        handed.reading = reading;
        // Whatever woke this task is in what it takes now.
        handed.woken = false;
        append(queue, &mut handed.dues);
        !handed.closed
    }

    /// Resolves once something that needs this task was handed over since its last take.
    fn woken(&self) -> impl Future<Output = ()> {
        std::future::poll_fn(|cx| {
            let mut handed = self.0.lock();
            if handed.woken {
                return Poll::Ready(());
            }
            if !handed.waker.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
                handed.waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

/// Moves everything in `from` to the back of `to`, by trading the two when `to` is empty.
fn append(to: &mut VecDeque<Due>, from: &mut VecDeque<Due>) {
    if to.is_empty() {
        std::mem::swap(to, from);
    } else {
        to.append(from);
    }
}

impl Due {
    /// Whether handing this due over must wake the reply task, which reads the sides in `reading`.
    fn wakes(&self, reading: [bool; 2]) -> bool {
        match self {
            Due::Replies { side, .. } | Due::Copied { side, .. } => !reading[*side as usize],
            // A batch's writes follow a reply due from the source in the same batch (a write is
            // counted only with its reply due): looked at once those replies are delivered.
            Due::Settled(_) => false,
            Due::Made(_) | Due::Opened { .. } | Due::Pin(_) | Due::Finish(_) | Due::Hedged { .. } => true,
        }
    }
}

/// State both directions of a routed session see.
#[derive(Debug, Default)]
pub(super) struct Shared {
    /// A side whose connection has closed; the request side reconnects before using it again.
    pub lost: [AtomicBool; 2],
    pub latency: Latency,
    pub writes: Arc<SessionWrites>,
    /// When the target last answered a hedged read too late.
    pub target_late: TargetLate,
}

/// A session's memory of a target that answered too late: its reads go to the source for
/// [`TARGET_LATE_COOLDOWN`] after that, rather than each waiting out the deadline.
#[derive(Debug, Default)]
pub(super) struct TargetLate(SharedInstant);

/// How long a session keeps its canary reads off a target that answered too late.
pub(super) const TARGET_LATE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(1);

impl TargetLate {
    fn late(&self) {
        self.0.set_now();
    }

    /// Whether the target answered too late within the cooldown.
    pub fn cooling(&self) -> bool {
        self.0.get().is_some_and(|at| at.elapsed() < TARGET_LATE_COOLDOWN)
    }
}

struct SideReader {
    from: ReadHalf<UpstreamStream>,
    buf: BytesMut,
    scanner: ReplyScanner,
    closed: bool,
    /// Replies still to come that answer hedged reads the other side answered: dropped before
    /// anything else is taken from this side.
    skip: u32,
}

pub(super) struct Replies<C> {
    to_client: WriteHalf<C>,
    dues: DueQueue,
    queue: VecDeque<Due>,
    sides: [Option<SideReader>; 2],
    out: BytesMut,
    copy: BytesMut,
    shared: Arc<Shared>,
    metrics: Arc<ProxyMetrics>,
    /// Each side's address, for the log.
    addrs: [Option<Arc<str>>; 2],
}

enum Event {
    /// Dues that need a look were handed over.
    Woken,
    /// A side was read; true when it closed.
    Read(Side, bool),
    Deadline,
    /// The hedged read at the head may now take the source's answer.
    HedgeDeadline,
}

/// How delivering what is due ended.
enum Next {
    /// Waiting for more bytes or more dues.
    Wait,
    /// Copy one side's bytes from now on.
    Pinned(Side),
    /// Close the client after these bytes.
    Close(Vec<u8>),
}

impl<C: AsyncWrite> Replies<C> {
    pub fn new(to_client: WriteHalf<C>, dues: DueQueue, shared: Arc<Shared>, metrics: Arc<ProxyMetrics>) -> Self {
        Replies {
            to_client,
            dues,
            queue: VecDeque::new(),
            sides: [None, None],
            out: BytesMut::with_capacity(BUFFER),
            copy: BytesMut::new(),
            shared,
            metrics,
            addrs: [None, None],
        }
    }

    /// Runs until the client or the source closes, or the session finishes.
    pub async fn run(mut self) {
        let mut finishing: Option<tokio::time::Instant> = None;
        let next = loop {
            if !self.receive(&mut finishing) {
                // The request side is gone without finishing: the client is gone.
                return;
            }
            let next = self.deliver();
            if !self.out.is_empty() {
                if self.to_client.write_all(&self.out).await.is_err() {
                    break Next::Close(Vec::new());
                }
                self.out.clear();
            }
            match next {
                Ok(Next::Wait) => {}
                Ok(next) => break next,
                Err(()) => break Next::Close(Vec::new()),
            }
            let head = self.head_side();
            let hedge = match self.queue.front() {
                Some(Due::Hedged { deadline }) => Some(*deadline),
                _ => None,
            };
            let [source, target] = &mut self.sides;
            let event = tokio::select! {
                () = self.dues.woken() => Event::Woken,
                closed = read(source, head == Some(Side::Source), &self.shared.latency, &self.metrics) => {
                    Event::Read(Side::Source, closed)
                }
                closed = read(target, head == Some(Side::Target), &self.shared.latency, &self.metrics) => {
                    Event::Read(Side::Target, closed)
                }
                () = sleep_until(finishing), if finishing.is_some() => Event::Deadline,
                () = sleep_until(hedge), if hedge.is_some() => Event::HedgeDeadline,
            };
            match event {
                Event::Read(side, true) => {
                    self.shared.lost[side as usize].store(true, Ordering::Relaxed);
                    if side == Side::Source {
                        // The source lives and dies with the client: let what arrived go out.
                        let _ = self.deliver();
                        let _ = self.to_client.write_all(&self.out).await;
                        break Next::Close(Vec::new());
                    }
                }
                Event::Woken | Event::Read(_, false) | Event::HedgeDeadline => {}
                Event::Deadline => break Next::Close(Vec::new()),
            }
        };
        if let Next::Pinned(side) = next {
            self.copy_from(side).await;
        } else if let Next::Close(closing) = next {
            let _ = self.to_client.write_all(&closing).await;
        }
        let _ = self.to_client.shutdown().await;
    }

    /// Takes the dues handed over since the last time, starting the drain deadline at a
    /// [`Due::Finish`]; false when the request side is gone without finishing.
    fn receive(&mut self, finishing: &mut Option<tokio::time::Instant>) -> bool {
        let reading = self.sides.each_ref().map(|reader| reader.as_ref().is_some_and(|reader| !reader.closed));
        let taken = self.queue.len();
        let open = self.dues.take(&mut self.queue, reading);
        if finishing.is_none() && self.queue.range(taken..).any(|due| matches!(due, Due::Finish(_))) {
            *finishing = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
        }
        open || finishing.is_some()
    }

    fn head_side(&self) -> Option<Side> {
        match self.queue.front() {
            Some(Due::Replies { side, .. } | Due::Copied { side, .. }) => Some(*side),
            _ => None,
        }
    }

    /// Moves everything that can go out now into `out`.
    fn deliver(&mut self) -> Result<Next, ()> {
        loop {
            let Some(due) = self.queue.pop_front() else {
                self.pass_pushes(None);
                return Ok(Next::Wait);
            };
            match due {
                Due::Made(reply) => self.out.extend_from_slice(&reply),
                Due::Opened { side, from, addr } => {
                    self.addrs[side as usize] = Some(addr);
                    self.sides[side as usize] = Some(SideReader {
                        from,
                        buf: BytesMut::new(),
                        scanner: ReplyScanner::default(),
                        closed: false,
                        skip: 0,
                    });
                }
                Due::Settled(writes) => writes.answered(),
                Due::Hedged { deadline } => {
                    let Some(answer) = self.hedge_answer(deadline)? else {
                        self.queue.push_front(Due::Hedged { deadline });
                        self.pass_pushes(None);
                        return Ok(Next::Wait);
                    };
                    self.take(answer, 1, true, false)?;
                    if let Some(other) = self.sides[answer.other() as usize].as_mut() {
                        other.skip += 1;
                    }
                    if answer == Side::Source {
                        self.metrics.target_read_late();
                        self.shared.target_late.late();
                    }
                }
                Due::Pin(side) => return Ok(Next::Pinned(side)),
                Due::Finish(closing) => return Ok(Next::Close(closing)),
                Due::Replies { side, count, discard } => {
                    let left = self.take(side, count, !discard, false)?;
                    if left > 0 {
                        self.queue.push_front(Due::Replies { side, count: left, discard });
                        self.pass_pushes(Some(side));
                        return Ok(Next::Wait);
                    }
                }
                Due::Copied { side, copy } => {
                    if self.take(side, 1, true, true)? > 0 {
                        self.queue.push_front(Due::Copied { side, copy });
                        self.pass_pushes(Some(side));
                        return Ok(Next::Wait);
                    }
                    let _ = copy.send(self.copy.split().freeze());
                }
            }
        }
    }

    /// Which side answers a hedged read now, if one can: the target once its whole reply is
    /// here (a late one is never half-delivered), else the source once the deadline passed, or
    /// at once when the target's connection is gone.
    fn hedge_answer(&mut self, deadline: Instant) -> Result<Option<Side>, ()> {
        let target_live = self.sides[Side::Target as usize].as_ref().is_some_and(|reader| !reader.closed);
        if target_live && self.ready(Side::Target)? {
            return Ok(Some(Side::Target));
        }
        if (!target_live || Instant::now() >= deadline) && self.ready(Side::Source)? {
            return Ok(Some(Side::Source));
        }
        Ok(None)
    }

    /// Whether a whole reply from `side` is buffered, after the replies it must drop; a side
    /// without a live connection is ready (taking its reply ends the client's connection).
    fn ready(&mut self, side: Side) -> Result<bool, ()> {
        if !self.skip_dropped(side)? {
            return Ok(false);
        }
        let Some(reader) = self.sides[side as usize].as_ref() else { return Ok(true) };
        let (mut probe, mut at) = (reader.scanner.clone(), 0);
        loop {
            match probe.scan(&reader.buf[at..]) {
                Ok((n, Some(Frame::Push))) => at += n,
                Ok((_, Some(Frame::Reply))) => return Ok(true),
                Ok((_, None)) => return Ok(reader.closed),
                Err(_) => return Ok(true), // take() reports it
            }
        }
    }

    /// Drops the replies `side` owes hedged reads already answered; true once none is left.
    fn skip_dropped(&mut self, side: Side) -> Result<bool, ()> {
        let Some(skip) = self.sides[side as usize].as_ref().map(|reader| reader.skip).filter(|n| *n > 0) else {
            return Ok(true);
        };
        let left = self.take_replies(side, skip, false, false)?;
        if let Some(reader) = self.sides[side as usize].as_mut() {
            reader.skip = left;
        }
        Ok(left == 0)
    }

    /// Takes up to `count` replies from `side`'s buffer, after those it must drop; returns how
    /// many are still missing.
    fn take(&mut self, side: Side, count: u32, deliver: bool, copy: bool) -> Result<u32, ()> {
        if !self.skip_dropped(side)? {
            return Ok(count);
        }
        self.take_replies(side, count, deliver, copy)
    }

    /// Takes up to `count` replies from `side`'s buffer; returns how many are still missing.
    /// Replies a side without a live connection owes the client end it ([`Self::fail`]). What
    /// is taken goes on in one piece.
    fn take_replies(&mut self, side: Side, mut count: u32, deliver: bool, copy: bool) -> Result<u32, ()> {
        let Some(reader) = self.sides[side as usize].as_mut() else {
            return self.fail(side, count, deliver).map(|()| 0);
        };
        let Taken { len: taken, replies, error: unreadable } = reader.scanner.replies(&reader.buf, count);
        count -= replies;
        let closed = count > 0 && reader.closed;
        if deliver {
            self.out.extend_from_slice(&reader.buf[..taken]);
        }
        if copy {
            self.copy.extend_from_slice(&reader.buf[..taken]);
        }
        reader.buf.advance(taken);
        if let Some(err) = unreadable {
            self.metrics.error(ErrorKind::Io);
            tracing::warn!(%err, side = side.as_str(), "unreadable reply; closing the client connection");
            return Err(());
        }
        if closed {
            self.sides[side as usize] = None;
            return self.fail(side, count, deliver).map(|()| 0);
        }
        Ok(count)
    }

    /// `count` replies `side` will never send, its connection gone. Replies only to drop are
    /// dropped. Replies due to the client close its connection, after the replies before them
    /// (`Err`), as Redis's own clients see it when their server goes: a request the server had
    /// read may have run, and only a closed connection tells the client that it cannot know.
    /// An error reply would tell it that a write which may have been applied was not.
    fn fail(&mut self, side: Side, count: u32, deliver: bool) -> Result<(), ()> {
        if deliver && count > 0 {
            let addr = self.addrs[side as usize].as_deref().unwrap_or(side.as_str());
            tracing::warn!(upstream = addr, replies = count, "upstream closed with replies due; closing the client");
            self.metrics.error(ErrorKind::Io);
            return Err(());
        }
        Ok(())
    }

    /// Passes on complete RESP3 pushes waiting at the front of a side's buffer, when the client
    /// is between replies: from every side when nothing is due, else from the other sides.
    fn pass_pushes(&mut self, head: Option<Side>) {
        if let Some(side) = head
            && self.sides[side as usize].as_ref().is_some_and(|reader| !reader.scanner.at_boundary())
        {
            return;
        }
        for side in Side::BOTH.into_iter().filter(|&side| Some(side) != head) {
            let Some(reader) = self.sides[side as usize].as_mut() else { continue };
            while reader.buf.first() == Some(&b'>') {
                let mut probe = reader.scanner.clone();
                let Ok((n, Some(Frame::Push))) = probe.scan(&reader.buf) else { break };
                self.out.extend_from_slice(&reader.buf[..n]);
                reader.buf.advance(n);
                reader.scanner = probe;
            }
        }
    }

    /// Pinned: the client gets `side`'s bytes as they come, until either closes or the session
    /// finishes (every due but the finish is moot: the request side sends only bytes now).
    async fn copy_from(&mut self, side: Side) {
        let Some(mut reader) = self.sides[side as usize].take() else { return };
        self.sides = [None, None];
        let mut buf = std::mem::take(&mut reader.buf);
        loop {
            if !buf.is_empty() {
                self.shared.latency.answered(&self.metrics);
                if self.to_client.write_all(&buf).await.is_err() {
                    return;
                }
                buf.clear();
            }
            // Reading no side through the hand-off: every due wakes this task.
            let open = self.dues.take(&mut self.queue, [false; 2]);
            let finish = self.queue.drain(..).find_map(|due| match due {
                Due::Finish(closing) => Some(closing),
                _ => None,
            });
            if let Some(closing) = finish {
                let _ = self.to_client.write_all(&closing).await;
                return;
            }
            if !open {
                return;
            }
            buf.reserve(BUFFER);
            tokio::select! {
                read = reader.from.read_buf(&mut buf) => if !matches!(read, Ok(n) if n > 0) { return },
                () = self.dues.woken() => {}
            }
        }
    }
}

/// Reads more of one side; true when it has closed. Pending while there is no connection,
/// after it closed, or while it is not at the head and has answered far ahead.
async fn read(reader: &mut Option<SideReader>, head: bool, latency: &Latency, metrics: &ProxyMetrics) -> bool {
    let Some(reader) = reader.as_mut().filter(|r| !r.closed && (head || r.buf.len() < EARLY_LIMIT)) else {
        return std::future::pending().await;
    };
    reader.buf.reserve(BUFFER);
    match reader.from.read_buf(&mut reader.buf).await {
        Ok(n) if n > 0 => {
            latency.answered(metrics);
            false
        }
        Ok(_) => {
            reader.closed = true;
            true
        }
        Err(_) => {
            metrics.error(ErrorKind::Io);
            reader.closed = true;
            true
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::task::Context;

    use super::*;

    /// Whether the reply task would wake up now.
    fn woken(queue: &DueQueue) -> bool {
        pin!(queue.woken()).poll(&mut Context::from_waker(Waker::noop())).is_ready()
    }

    fn replies(side: Side) -> VecDeque<Due> {
        VecDeque::from([Due::Replies { side, count: 1, discard: false }])
    }

    #[test]
    fn only_what_no_upstream_read_brings_to_the_reply_task_wakes_it() {
        let (dues, queue) = dues();
        let mut taken = VecDeque::new();
        dues.hand_over(&mut replies(Side::Source));
        assert!(woken(&queue), "until the reply task says what it reads, every due wakes it");
        assert!(queue.take(&mut taken, [true, false]));
        assert!(!woken(&queue), "taken: nothing left to wake for");

        dues.hand_over(&mut replies(Side::Source));
        assert!(!woken(&queue), "replies from a side it reads: the reply's bytes wake it");
        dues.hand_over(&mut replies(Side::Target));
        assert!(woken(&queue), "replies from a side it does not read");
        assert!(queue.take(&mut taken, [true, true]));
        assert_eq!(taken.len(), 3, "every due, in order");
        assert!(matches!(taken[2], Due::Replies { side: Side::Target, .. }));

        dues.hand_over(&mut VecDeque::from([Due::Made(Bytes::from_static(b"+OK\r\n"))]));
        assert!(woken(&queue), "a reply the proxy makes");
        assert!(queue.take(&mut taken, [false, true]));
        dues.hand_over(&mut replies(Side::Source));
        assert!(woken(&queue), "the source's connection closed since");
        assert!(queue.take(&mut taken, [true, true]));

        drop(dues);
        assert!(woken(&queue) && !queue.take(&mut taken, [true, true]), "the request side is gone");
    }
}
