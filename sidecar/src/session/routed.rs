//! One client connection under a migration strategy: each request goes where
//! [`Strategy::route`] says, replies come back in request order through [`Replies`].
//!
//! Per client there is at most one connection to each side, opened on first use, and at most
//! one [`MirrorLink`] per side for requests the client does not wait for. The strategy is read
//! once per batch of requests (one `Arc` snapshot), so a configuration change applies between
//! batches and never inside one. Per-connection semantics survive the split:
//!
//! - AUTH, HELLO and SELECT ([`ConnectionState`]) and the CLIENT settings (name, library,
//!   tracking: [`ClientSettings`]) are answered by the source and replayed to every other
//!   connection of the session, including ones opened later, so every side answers in the
//!   client's protocol, knows it by its name and reports changes to what it served. RESET
//!   undoes them everywhere, and ends a transaction where it runs.
//! - A transaction runs on one side, the owner of its first key, and WATCH picks the side for
//!   what follows it. Reads after WATCH and inside MULTI go to that side. MULTI itself is
//!   answered at once, by the side a transaction with no key would run on; when the first
//!   command inside belongs to the other side, the transaction moves there before anything is
//!   queued ([`Session::settle`]). When the connection a transaction runs on closes, the
//!   client's closes too, at its next request, which must not run outside the transaction on
//!   a new connection.
//! - Each call of a cursor iteration (SCAN, HSCAN, SSCAN, ZSCAN) reads the owner: a cursor
//!   is valid only on the server that returned it.
//! - Scripts and function libraries are loaded (and flushed, deleted, restored) on both sides,
//!   the owner of keyless writes answering, so EVALSHA and FCALL find them wherever they run.
//! - SUBSCRIBE and friends, MONITOR, CLIENT REPLY and a replica's SYNC, PSYNC and REPLCONF make
//!   replies unpredictable in number: the session pins itself to the source and becomes a
//!   plain byte copy from then on. Its writes are held by a pause like any others; one the
//!   source may not take alone (the target's after a flip, or one to mirror) closes the
//!   connection instead, as its reply could only come from the source.
//! - While writes are held, the session stops at the first held request and reads nothing more
//!   from the client; replies to earlier requests still flow. When the hold ends the rest is
//!   routed with the strategy then in force, so held writes go to the new owner after a flip,
//!   to the source after the deadline, and always in the client's order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::sync::{oneshot, watch};

use super::replies::{Due, Dues, Replies, Shared, dues};
use super::writes::SourceWrites;
use super::{BUFFER, unreachable_reply};
use crate::command::{Command, CommandKind, RecentCommand};
use crate::frame::{Request, RequestScanner};
use crate::hold::{HoldReason, HoldState};
use crate::metrics::{CommandCounts, ErrorKind, MirrorOutcome, ProxyMetrics, ShadowOutcome};
use crate::mirror::{ConnectionState, Job, MirrorLink, hashed_key};
use crate::plan::{Plan, Routing};
use crate::route::{Dice, Route, Side, Strategy, writes};
use crate::upstream::UpstreamStream;

/// Serves one client until either side closes or shutdown completes.
pub async fn serve<C>(client: C, routing: Routing, metrics: Arc<ProxyMetrics>, mut shutdown: watch::Receiver<bool>)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
{
    metrics.connection_opened();
    let (mut client_reader, to_client) = tokio::io::split(client);
    let (dues, queue) = dues();
    let shared = Arc::new(Shared::default());
    let mut replies = tokio::spawn(Replies::new(to_client, queue, shared.clone(), metrics.clone()).run());
    let mut session = Session {
        routing,
        metrics: metrics.clone(),
        dues,
        shared,
        scanner: RequestScanner::default(),
        recent: RecentCommand::default(),
        dice: Dice::new(),
        conns: [None, None],
        eden_authenticated: [false, false],
        out: [BytesMut::new(), BytesMut::new()],
        pending: VecDeque::new(),
        unreachable: [None, None],
        links: [None, None],
        state: ConnectionState::default(),
        settings: ClientSettings::default(),
        txn: Txn::None,
        pinned: false,
        counts: CommandCounts::default(),
        batch_writes: None,
    };
    let mut requests = BytesMut::with_capacity(BUFFER);
    // Made once, not per read: waiting for shutdown registers with the watch channel.
    let stop = crate::server::stopped(&mut shutdown);
    tokio::pin!(stop);
    'session: loop {
        let read = tokio::select! {
            read = client_reader.read_buf(&mut requests) => read,
            _ = &mut replies => break,
            () = &mut stop => {
                session.finish(Vec::new());
                let _ = replies.await;
                break;
            }
        };
        if !matches!(read, Ok(n) if n > 0) {
            // The client is gone: drop its upstreams now, as Redis frees a client on EOF.
            replies.abort();
            break;
        }
        loop {
            match session.forward(&mut requests).await {
                Forwarded::All => break,
                Forwarded::Close => {
                    let _ = replies.await;
                    break 'session;
                }
                Forwarded::Held => {
                    let _holding = metrics.hold_started();
                    tokio::select! {
                        () = session.routing.released() => {}
                        _ = &mut replies => break 'session,
                        () = &mut stop => {
                            session.finish(Vec::new());
                            let _ = replies.await;
                            break 'session;
                        }
                    }
                }
            }
        }
        requests.reserve(BUFFER);
    }
    metrics.connection_closed();
}

enum Forwarded {
    /// Every complete request went out.
    All,
    /// Stopped at a held write, which is still at the front of the buffer.
    Held,
    /// The session is over once the replies due are delivered.
    Close,
}

/// Where the session is in a transaction.
enum Txn {
    None,
    /// MULTI went to this side, which answered the client; nothing is queued yet, and the
    /// first command inside decides where the transaction runs ([`Session::settle`]).
    Opened(Side),
    /// Running on `side`: after WATCH (`multi` false) or inside MULTI.
    On {
        side: Side,
        mirror: Option<Side>,
        multi: bool,
    },
    /// Inside a MULTI whose first write was refused (`hold`), before anything was queued (the
    /// side that answered MULTI discarded it): answered here as Redis answers a transaction
    /// with a command that failed to queue, up to the EXEC (`-EXECABORT`) or DISCARD that ends
    /// it.
    Refused(HoldReason),
}

/// What a request's reply is for.
enum Reply {
    Client,
    /// To the client, with a copy for a shadow comparison.
    Copied(oneshot::Sender<Bytes>),
}

struct Session {
    routing: Routing,
    metrics: Arc<ProxyMetrics>,
    dues: Dues,
    shared: Arc<Shared>,
    scanner: RequestScanner,
    recent: RecentCommand,
    dice: Dice,
    conns: [Option<WriteHalf<UpstreamStream>>; 2],
    /// Whether Eden authenticated the connection to each side itself.
    eden_authenticated: [bool; 2],
    /// This batch's bytes for each side: one write per side per batch.
    out: [BytesMut; 2],
    /// This batch's dues, in request order; handed over before the batch is written, so the
    /// reply side has them before any of their replies can arrive.
    pending: VecDeque<Due>,
    /// A side whose connect failed in this batch, with the reply its requests get.
    unreachable: [Option<Bytes>; 2],
    links: [Option<MirrorLink>; 2],
    state: ConnectionState,
    settings: ClientSettings,
    txn: Txn,
    /// A subscriber or monitor: everything goes to the source as bytes.
    pinned: bool,
    /// This batch's commands, counted when it is flushed.
    counts: CommandCounts,
    /// This batch's writes to the source, answered behind its replies.
    batch_writes: Option<SourceWrites>,
}

impl Session {
    async fn forward(&mut self, buffer: &mut BytesMut) -> Forwarded {
        let (strategy, plan) = self.routing.snapshot();
        let (mut done, mut outcome) = (0, Forwarded::All);
        loop {
            match self.scanner.scan(&buffer[done..]) {
                Ok(Some(request)) => {
                    let bytes = &buffer[done..done + request.len];
                    // Only a transaction or a pinned session can have to stop here.
                    if (self.pinned || !matches!(self.txn, Txn::None))
                        && let Some(why) = self.cannot_continue(&strategy, bytes, &request)
                    {
                        tracing::debug!(why, "closing the client's connection");
                        self.flush().await;
                        self.finish(Vec::new());
                        return Forwarded::Close;
                    }
                    // An empty request (`*0`, a blank line) gets no reply from Redis either.
                    if request.argc > 0 && !self.dispatch(&strategy, &plan, bytes, &request).await {
                        outcome = Forwarded::Held;
                        break;
                    }
                    done += request.len;
                }
                Ok(None) => break,
                Err(error) => {
                    self.metrics.error(ErrorKind::Protocol);
                    tracing::debug!(%error, "malformed request; closing the connection");
                    self.flush().await;
                    self.finish(error.to_resp().into_bytes());
                    return Forwarded::Close;
                }
            }
        }
        buffer.advance(done);
        if !self.flush().await {
            self.finish(Vec::new());
            return Forwarded::Close;
        }
        outcome
    }

    /// Routes one request; false when it is held.
    async fn dispatch(&mut self, strategy: &Strategy, plan: &Plan, bytes: &[u8], request: &Request) -> bool {
        let command = match strategy.needs_keys() {
            true => self.recent.command(bytes, request),
            false => Command { kind: self.recent.kind(bytes, request), key: None },
        };
        let kind = command.kind;
        if self.pinned {
            if writes(kind) && strategy.holding() {
                return false;
            }
            self.out[Side::Source as usize].extend_from_slice(bytes);
            self.counts.count(Side::Source, kind);
            return true;
        }
        let name = &bytes[request.name.clone()];
        let key = command.key.map(|key| &bytes[key]);
        // Only these kinds hold requests about the connection itself: reads and writes pass by
        // with one comparison.
        if matches!(kind, CommandKind::Connection | CommandKind::Admin | CommandKind::PubSub)
            && self.connection_command(plan, kind, name, bytes, request).await
        {
            return true;
        }
        if let Txn::Refused(reason) = self.txn {
            self.refused_transaction(reason, name, kind);
            return true;
        }
        if kind == CommandKind::Transaction {
            self.transaction(strategy, plan, name, key, bytes).await;
            return true;
        }
        match self.txn {
            Txn::Opened(guess) => {
                if strategy.holding() && writes(kind) {
                    return false;
                }
                if let Some(reason) = strategy.refusing().filter(|_| writes(kind)) {
                    self.send_unanswered(plan, guess, DISCARD).await;
                    self.refuse(reason);
                    self.txn = Txn::Refused(reason);
                    return true;
                }
                let (side, mirror) = strategy.transaction(key);
                self.settle(plan, side, mirror).await;
                self.in_transaction(plan, side, mirror, bytes, kind).await;
            }
            Txn::On { side, mirror, multi: true } => self.in_transaction(plan, side, mirror, bytes, kind).await,
            Txn::On { side, multi: false, .. } if kind == CommandKind::Read => {
                self.send(plan, side, bytes, kind, Reply::Client).await;
            }
            _ if changes_code(kind, name, bytes, request) => self.everywhere(strategy, plan, bytes, kind).await,
            // A cursor is valid only on the server that returned it: every call of an
            // iteration reads the owner, whatever the read share.
            _ if kind == CommandKind::Read && iterates(name) => {
                self.send(plan, strategy.owner(key), bytes, kind, Reply::Client).await;
            }
            _ => match strategy.route(kind, key, &mut self.dice) {
                Route::Hold => return false,
                Route::Refuse(reason) => self.refuse(reason),
                Route::Send { answer, shadow: true, .. } => {
                    let (copy, answered) = oneshot::channel();
                    if self.send(plan, answer, bytes, kind, Reply::Copied(copy)).await {
                        let job =
                            Job::Shadow { request: Bytes::copy_from_slice(bytes), answered, key: hashed_key(key) };
                        self.shadow(plan, answer.other(), job);
                    }
                }
                Route::Send { answer, mirror, shadow: false } => {
                    // A read the target may not hold yet for this client, or that a target
                    // answering late would only delay, goes to the source.
                    let answer = match answer {
                        Side::Target
                            if kind == CommandKind::Read
                                && (!strategy.target_may_serve(key, self.shared.writes.client_writes())
                                    || self.shared.target_late.cooling()) =>
                        {
                            Side::Source
                        }
                        answer => answer,
                    };
                    if answer == Side::Target
                        && kind == CommandKind::Read
                        && let Some(deadline) = strategy.target_read_deadline(key)
                        && self.hedge(plan, bytes, deadline).await
                    {
                        return true;
                    }
                    if self.send(plan, answer, bytes, kind, Reply::Client).await
                        && let Some(mirror) = mirror
                    {
                        self.mirror(plan, mirror, bytes);
                    }
                }
            },
        }
        true
    }

    /// Serves a request that sets or changes the state of the client's connection (AUTH,
    /// HELLO, SELECT, RESET, a CLIENT setting) or pins the session; false for any other.
    async fn connection_command(
        &mut self,
        plan: &Plan,
        kind: CommandKind,
        name: &[u8],
        bytes: &[u8],
        request: &Request,
    ) -> bool {
        if kind == CommandKind::Connection
            && let Some(name) = ConnectionState::changed_by(name)
        {
            self.connection_state(plan, name, bytes).await;
        } else if let Some(setting) = client_setting(kind, name, bytes, request) {
            self.set_everywhere(plan, bytes, kind, Some(bytes)).await;
            self.settings.record(setting, Bytes::copy_from_slice(bytes));
        } else if pins(kind, name, bytes, request) {
            self.pin(plan, bytes, kind).await;
        } else {
            return false;
        }
        true
    }

    /// Sends a read of a source-owned key to both sides, the target's answer expected within
    /// `deadline` and the source's used otherwise (DESIGN §9, "Deadlines"); false when either
    /// side cannot be reached (the caller sends it plainly).
    async fn hedge(&mut self, plan: &Plan, request: &[u8], deadline: std::time::Duration) -> bool {
        if !(self.connected(plan, Side::Target).await && self.connected(plan, Side::Source).await) {
            return false;
        }
        for side in Side::BOTH {
            self.out[side as usize].extend_from_slice(request);
        }
        self.counts.count(Side::Target, CommandKind::Read);
        self.pending.push_back(Due::Hedged { deadline: tokio::time::Instant::now() + deadline });
        true
    }

    /// Answers a write the gate refuses.
    fn refuse(&mut self, reason: HoldReason) {
        self.metrics.write_refused();
        self.pending.push_back(Due::Made(Bytes::from_static(HoldState::refusal(reason))));
    }

    /// A request inside a [`Txn::Refused`] transaction, answered as Redis would.
    fn refused_transaction(&mut self, reason: HoldReason, name: &[u8], kind: CommandKind) {
        let is = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
        let reply: &'static [u8] = if is("EXEC") {
            self.txn = Txn::None;
            b"-EXECABORT Transaction discarded because of previous errors.\r\n"
        } else if is("DISCARD") {
            self.txn = Txn::None;
            b"+OK\r\n"
        } else if is("MULTI") {
            b"-ERR MULTI calls can not be nested\r\n"
        } else if writes(kind) {
            self.metrics.write_refused();
            HoldState::refusal(reason)
        } else {
            b"+QUEUED\r\n"
        };
        self.pending.push_back(Due::Made(Bytes::from_static(reply)));
    }

    /// MULTI, EXEC, DISCARD, WATCH, UNWATCH.
    async fn transaction(&mut self, strategy: &Strategy, plan: &Plan, name: &[u8], key: Option<&[u8]>, bytes: &[u8]) {
        let kind = CommandKind::Transaction;
        let is = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
        if is("MULTI") && matches!(self.txn, Txn::None) {
            // Answered now, by the side a keyless transaction runs on; `settle` moves it when
            // its first command belongs elsewhere. A MULTI that failed opened nothing.
            let side = strategy.owner(None);
            if self.send(plan, side, bytes, kind, Reply::Client).await {
                self.txn = Txn::Opened(side);
            }
            return;
        }
        if matches!(self.txn, Txn::Opened(_)) {
            // Nothing inside the transaction named a key: it runs where keyless writes go.
            let (side, mirror) = strategy.transaction(if is("WATCH") { key } else { None });
            self.settle(plan, side, mirror).await;
        }
        let Txn::On { side, mirror, multi } = self.txn else {
            // Not in a transaction: WATCH starts one; anything else is Redis's to answer.
            if is("WATCH") {
                let (side, mirror) = strategy.transaction(key);
                self.txn = Txn::On { side, mirror, multi: false };
                self.send(plan, side, bytes, kind, Reply::Client).await;
            } else {
                self.send(plan, Side::Source, bytes, kind, Reply::Client).await;
            }
            return;
        };
        if multi {
            self.in_transaction(plan, side, mirror, bytes, kind).await;
        } else {
            self.send(plan, side, bytes, kind, Reply::Client).await;
        }
        if is("MULTI") && !multi {
            self.txn = Txn::On { side, mirror, multi: true };
            if let Some(mirror) = mirror {
                self.mirror(plan, mirror, bytes);
            }
        } else if (multi && (is("EXEC") || is("DISCARD"))) || (!multi && is("UNWATCH")) {
            self.txn = Txn::None;
        }
    }

    /// Why the client's connection must close before `request` runs, if it must; the client
    /// sees it close after the replies due, as it would see Redis's:
    /// - The connection a transaction (or a WATCH) runs on has closed since it began (a loss
    ///   before it began does not count: its first request reconnected). Its MULTI or WATCH
    ///   went with it, and what follows must not run outside it on a new connection.
    /// - A pinned session (a subscriber that unsubscribed, a connection that ran MONITOR or
    ///   CLIENT REPLY, in a pool that hands it out again) sends a write the source may not
    ///   take alone: one the strategy gives to the target or mirrors. Its replies can only
    ///   come from the source, and a write there would be lost; an error is better.
    fn cannot_continue(&mut self, strategy: &Strategy, bytes: &[u8], request: &Request) -> Option<&'static str> {
        let lost = match self.txn {
            Txn::Opened(side) | Txn::On { side, .. } => self.shared.lost[side as usize].load(Ordering::Relaxed),
            Txn::None | Txn::Refused(_) => false,
        };
        if lost {
            return Some("the connection its transaction ran on closed");
        }
        if self.pinned && request.argc > 0 && !strategy.holding() {
            let command = self.recent.command(bytes, request);
            let key = command.key.map(|key| &bytes[key]);
            let source_alone = Route::Send { answer: Side::Source, mirror: None, shadow: false };
            if writes(command.kind) && strategy.route(command.kind, key, &mut self.dice) != source_alone {
                return Some("a pinned connection's write belongs to the target");
            }
        }
        None
    }

    /// Fixes where an [`Txn::Opened`] transaction runs, as its first command arrives: on
    /// `side`, mirrored whole to `mirror`. MULTI went to a guess, the owner of keyless writes,
    /// so that the client had its reply at once (a client may wait for it before sending
    /// more). When the first command belongs to the other side (a key the target owns in a
    /// split, or an owner that changed while the command was held), the guess's MULTI is
    /// discarded and one opened on `side`, both replies dropped: nothing was queued on the
    /// guess yet, so the transaction still runs whole on the owner of its first key, and only
    /// one MULTI reply ever reaches the client. The guess is right whenever the strategy has
    /// one owner, so this costs nothing then; in a split it costs two pipelined requests that
    /// nobody waits for, where opening MULTI on both sides would cost them every time.
    async fn settle(&mut self, plan: &Plan, side: Side, mirror: Option<Side>) {
        let Txn::Opened(guess) = std::mem::replace(&mut self.txn, Txn::On { side, mirror, multi: true }) else {
            return;
        };
        if guess != side {
            self.send_unanswered(plan, guess, DISCARD).await;
            self.send_unanswered(plan, side, MULTI).await;
        }
        if let Some(mirror) = mirror {
            self.mirror(plan, mirror, MULTI);
        }
    }

    /// A script or function library change (see [`changes_code`]), sent to both sides: to the
    /// side that does not answer first, its reply dropped, then to the owner of keyless writes,
    /// whose reply the client gets. Replies go out in request order, so the client has its
    /// answer only once both sides have loaded the library, and whatever it sends next (an
    /// EVALSHA routed as a read to the target, an FCALL on a key the other side owns, any
    /// command after a cutover or a rollback) finds it. Neither write rule is broken: a
    /// script cache is not data, and a function library the sync engine also replicates to
    /// the target is the same library, which the engine's copy replaces.
    async fn everywhere(&mut self, strategy: &Strategy, plan: &Plan, bytes: &[u8], kind: CommandKind) {
        let answer = strategy.owner(None);
        if strategy.has_target() {
            self.send_unanswered(plan, answer.other(), bytes).await;
        }
        self.send(plan, answer, bytes, kind, Reply::Client).await;
    }

    /// A request inside MULTI: to the transaction's side, and all of it to the mirror, so the
    /// mirror runs the same transaction.
    async fn in_transaction(&mut self, plan: &Plan, side: Side, mirror: Option<Side>, bytes: &[u8], kind: CommandKind) {
        if self.send(plan, side, bytes, kind, Reply::Client).await
            && let Some(mirror) = mirror
        {
            self.mirror(plan, mirror, bytes);
        }
    }

    /// AUTH, HELLO, SELECT, RESET: answered by the source, replayed everywhere else.
    async fn connection_state(&mut self, plan: &Plan, name: &'static str, bytes: &[u8]) {
        if name == "RESET" {
            self.end_transaction(plan).await;
            self.settings.reset();
        }
        let request = Bytes::copy_from_slice(bytes);
        let forwarded = ConnectionState::forwarded(name, &request, self.eden_authenticated[Side::Target as usize]);
        self.set_everywhere(plan, bytes, CommandKind::Connection, forwarded.as_deref()).await;
        for link in self.links.iter_mut().flatten() {
            // A shared connection must keep its state: the session continues on its own.
            link.own(&self.state);
            link.send(Job::State { name, request: request.clone() });
        }
        self.state.record(name, request);
    }

    /// Sends a request that sets state of the client's connection to the source, which
    /// answers, and `to_target` (the request as the target connection should get it, if at
    /// all) to the target connection if it is open; one opened later gets it replayed.
    async fn set_everywhere(&mut self, plan: &Plan, bytes: &[u8], kind: CommandKind, to_target: Option<&[u8]>) {
        self.send(plan, Side::Source, bytes, kind, Reply::Client).await;
        let target = Side::Target as usize;
        if let Some(request) = to_target
            && self.conns[target].is_some()
        {
            self.out[target].extend_from_slice(request);
            self.expect(Side::Target, true);
        }
    }

    /// Before a RESET: ends the transaction or WATCH on its side and its mirror with DISCARD
    /// or UNWATCH (replies dropped), as the RESET does on the source. A connection Eden
    /// authenticates itself never gets the client's RESET, and would stay in the transaction.
    async fn end_transaction(&mut self, plan: &Plan) {
        let (side, mirror, multi) = match std::mem::replace(&mut self.txn, Txn::None) {
            Txn::None | Txn::Refused(_) => return,
            Txn::Opened(side) => (side, None, true),
            Txn::On { side, mirror, multi } => (side, mirror, multi),
        };
        let end = if multi { DISCARD } else { UNWATCH };
        self.send_unanswered(plan, side, end).await;
        if let Some(mirror) = mirror.filter(|_| multi) {
            self.mirror(plan, mirror, end);
        }
    }

    /// From this request on, the client talks to the source alone, as bytes.
    async fn pin(&mut self, plan: &Plan, bytes: &[u8], kind: CommandKind) {
        if !self.connected(plan, Side::Source).await {
            self.send(plan, Side::Source, bytes, kind, Reply::Client).await;
            return;
        }
        self.pending.push_back(Due::Pin(Side::Source));
        self.out[Side::Source as usize].extend_from_slice(bytes);
        self.counts.count(Side::Source, kind);
        self.pinned = true;
        self.links = [None, None];
    }

    /// Queues `request` for `side`; false when `side` is unreachable (the client gets an error).
    async fn send(&mut self, plan: &Plan, side: Side, request: &[u8], kind: CommandKind, reply: Reply) -> bool {
        if !(self.open(side) || self.connect(plan, side).await) {
            if let Some(error) = &self.unreachable[side as usize] {
                self.pending.push_back(Due::Made(error.clone()));
            }
            return false;
        }
        self.out[side as usize].extend_from_slice(request);
        self.counts.count(side, kind);
        if side == Side::Source && (writes(kind) || kind == CommandKind::Transaction) {
            let (session, metrics) = (&self.shared.writes, &self.metrics);
            self.batch_writes.get_or_insert_with(|| SourceWrites::new(session.clone(), metrics.clone())).add();
        }
        match reply {
            Reply::Client => self.expect(side, false),
            Reply::Copied(copy) => self.pending.push_back(Due::Copied { side, copy }),
        }
        true
    }

    /// Queues `request` for `side` with its reply dropped; nothing when `side` is unreachable.
    async fn send_unanswered(&mut self, plan: &Plan, side: Side, request: &[u8]) {
        if self.connected(plan, side).await {
            self.out[side as usize].extend_from_slice(request);
            self.expect(side, true);
        }
    }

    /// One more reply due from `side`, merged with the previous due when it is the same kind.
    fn expect(&mut self, side: Side, discard: bool) {
        if let Some(Due::Replies { side: last, count, discard: dropped }) = self.pending.back_mut()
            && *last == side
            && *dropped == discard
        {
            *count += 1;
            return;
        }
        self.pending.push_back(Due::Replies { side, count: 1, discard });
    }

    /// Makes sure the session has a connection to `side`, opening it (and replaying the
    /// client's connection state) when needed.
    async fn connected(&mut self, plan: &Plan, side: Side) -> bool {
        self.open(side) || self.connect(plan, side).await
    }

    /// Whether the session's connection to `side` is open, forgetting one the reply side saw
    /// close. Checked before anything async, so a request to an open side costs no future.
    fn open(&mut self, side: Side) -> bool {
        let index = side as usize;
        let lost = &self.shared.lost[index];
        if lost.load(Ordering::Relaxed) && lost.swap(false, Ordering::Relaxed) {
            self.conns[index] = None;
        }
        self.conns[index].is_some()
    }

    /// Opens a connection to `side` (not open: see [`Self::open`]) and queues the client's
    /// connection state for it; false when it cannot be reached in this batch.
    async fn connect(&mut self, plan: &Plan, side: Side) -> bool {
        let index = side as usize;
        if self.unreachable[index].is_some() {
            return false;
        }
        let Some(upstream) = plan.upstream(side) else {
            self.unreachable[index] = Some(Bytes::from_static(b"-ERR eden: no target configured\r\n"));
            return false;
        };
        match upstream.connect().await {
            Ok(stream) => {
                let (from, to) = tokio::io::split(stream);
                self.pending.push_back(Due::Opened { side, from, addr: upstream.addr().into() });
                self.conns[index] = Some(to);
                self.eden_authenticated[index] = upstream.has_credentials();
                let state = self.state.replay(upstream.has_credentials());
                let replay: Vec<Bytes> = state.chain(self.settings.replay().cloned()).collect();
                for request in replay {
                    self.out[index].extend_from_slice(&request);
                    self.expect(side, true);
                }
                true
            }
            Err(error) => {
                self.metrics.error(ErrorKind::UpstreamUnreachable);
                tracing::warn!(%error, side = side.as_str(), "upstream unreachable; answering with an error, retrying on the next batch");
                self.unreachable[index] = Some(Bytes::from(unreachable_reply(&error)));
                false
            }
        }
    }

    /// Adds a write to this batch's mirrored writes to `side`.
    fn mirror(&mut self, plan: &Plan, side: Side, request: &[u8]) {
        // A transaction's requests must reach one connection back to back: the session's own.
        let shared = !matches!(self.txn, Txn::On { multi: true, .. });
        match self.link(plan, side, shared) {
            Some(link) => link.write(request),
            None => self.metrics.mirror(side, MirrorOutcome::Failed, 1),
        }
    }

    /// Sends a shadow read to `side`, on the session's own connection: comparing can take a
    /// while, and nobody else's writes should wait for it.
    fn shadow(&mut self, plan: &Plan, side: Side, job: Job) {
        match self.link(plan, side, false) {
            Some(link) => link.send(job),
            None => self.metrics.shadow(ShadowOutcome::Failed),
        }
    }

    /// The mirror link for `side`, opened when needed; `None` when the plan has no such side.
    /// It is a shared one only while `shared` allows it and the session is in its initial
    /// connection state (see [`crate::mirror`]).
    fn link(&mut self, plan: &Plan, side: Side, shared: bool) -> Option<&mut MirrorLink> {
        let shared = shared && self.state.is_initial();
        let link = &mut self.links[side as usize];
        match link {
            Some(link) if !shared => link.own(&self.state),
            Some(_) => {}
            None => {
                let upstream = plan.mirror_upstream(side)?;
                *link = Some(match shared {
                    true => plan.mirrors.link(side, upstream, &self.metrics),
                    false => MirrorLink::open(side, upstream.clone(), self.state.clone(), self.metrics.clone()),
                });
            }
        }
        link.as_mut()
    }

    /// Counts this batch's commands, sends its dues and mirrored writes, then its bytes (one
    /// write per side); false when the source connection failed.
    async fn flush(&mut self) -> bool {
        self.metrics.commands(&mut self.counts);
        if let Some(writes) = self.batch_writes.take() {
            self.pending.push_back(Due::Settled(writes));
        }
        self.dues.hand_over(&mut self.pending);
        for link in self.links.iter_mut().flatten() {
            link.flush();
        }
        self.unreachable = [None, None];
        let mut source_ok = true;
        for side in Side::BOTH {
            let index = side as usize;
            if self.out[index].is_empty() {
                continue;
            }
            if let Some(conn) = self.conns[index].as_mut() {
                self.shared.latency.forwarded();
                if conn.write_all(&self.out[index]).await.is_err() {
                    self.metrics.error(ErrorKind::Io);
                    self.conns[index] = None;
                    source_ok &= side != Side::Source;
                }
            }
            self.out[index].clear();
        }
        source_ok
    }

    /// Ends the session after the replies already due, with `closing` as the client's last bytes.
    fn finish(&mut self, closing: Vec<u8>) {
        self.pending.push_back(Due::Finish(closing));
        self.dues.hand_over(&mut self.pending);
    }
}

/// Whether this request makes the number of replies unpredictable: subscriptions, MONITOR,
/// CLIENT REPLY, and a replica's handshake and stream (SYNC, PSYNC, REPLCONF), whose
/// snapshot is a bulk string without its CRLF.
fn pins(kind: CommandKind, name: &[u8], bytes: &[u8], request: &Request) -> bool {
    let is = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
    match kind {
        CommandKind::PubSub => !(is("PUBLISH") || is("SPUBLISH") || is("PUBSUB")),
        CommandKind::Admin => {
            is("MONITOR")
                || is("SYNC")
                || is("PSYNC")
                || is("REPLCONF")
                || (is("CLIENT") && subcommand_in(bytes, request, &["REPLY"]))
        }
        _ => false,
    }
}

/// Whether this is one call of a cursor iteration: SCAN, HSCAN, SSCAN, ZSCAN.
fn iterates(name: &[u8]) -> bool {
    ["SCAN", "HSCAN", "SSCAN", "ZSCAN"].iter().any(|scan| name.eq_ignore_ascii_case(scan.as_bytes()))
}

/// Whether this request changes the scripts or function libraries a server holds, which
/// EVALSHA and FCALL need on whichever side runs them.
fn changes_code(kind: CommandKind, name: &[u8], bytes: &[u8], request: &Request) -> bool {
    let is = |expected: &str| name.eq_ignore_ascii_case(expected.as_bytes());
    kind == CommandKind::Admin
        && ((is("SCRIPT") && subcommand_in(bytes, request, &["LOAD", "FLUSH"]))
            || (is("FUNCTION") && subcommand_in(bytes, request, &["LOAD", "DELETE", "FLUSH", "RESTORE"])))
}

/// The client's CLIENT settings, the latest request for each, in the order they were made:
/// replayed on every connection the session opens, so each side knows the client by its name
/// and library, and tracking is on wherever its reads are served. Mirror links do without:
/// they serve no reads and nobody looks for them by name, and a session with settings of its
/// own (every client that sends SETINFO on connect) still shares a mirror connection.
#[derive(Debug, Default)]
struct ClientSettings(Vec<(&'static str, Bytes)>);

impl ClientSettings {
    fn record(&mut self, setting: &'static str, request: Bytes) {
        self.0.retain(|(set, _)| *set != setting);
        self.0.push((setting, request));
    }

    /// RESET turns tracking, NO-EVICT and NO-TOUCH off; the name and library stay.
    fn reset(&mut self) {
        self.0.retain(|(set, _)| matches!(*set, "SETNAME" | "LIB-NAME" | "LIB-VER"));
    }

    fn replay(&self) -> impl Iterator<Item = &Bytes> {
        self.0.iter().map(|(_, request)| request)
    }
}

/// The setting a CLIENT subcommand makes on the connection it arrives on, by name: SETNAME,
/// each SETINFO attribute, NO-EVICT, NO-TOUCH, TRACKING. `None` for other requests.
fn client_setting(kind: CommandKind, name: &[u8], bytes: &[u8], request: &Request) -> Option<&'static str> {
    if kind != CommandKind::Admin || !name.eq_ignore_ascii_case(b"CLIENT") {
        return None;
    }
    let find =
        |arg: &[u8], names: &[&'static str]| names.iter().copied().find(|n| arg.eq_ignore_ascii_case(n.as_bytes()));
    let mut args = request.args(bytes).skip(1).map(|arg| &bytes[arg]);
    let subcommand = args.next()?;
    match find(subcommand, &["SETINFO"]) {
        Some(_) => find(args.next()?, &["LIB-NAME", "LIB-VER"]),
        None => find(subcommand, &["SETNAME", "NO-EVICT", "NO-TOUCH", "TRACKING"]),
    }
}

/// Whether the request's first argument is one of `names` (upper case), case-insensitively.
fn subcommand_in(bytes: &[u8], request: &Request, names: &[&str]) -> bool {
    request
        .args(bytes)
        .nth(1)
        .is_some_and(|arg| names.iter().any(|name| bytes[arg.clone()].eq_ignore_ascii_case(name.as_bytes())))
}

/// Requests Eden sends on its own to move or end a transaction (see [`Session::settle`]).
const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const DISCARD: &[u8] = b"*1\r\n$7\r\nDISCARD\r\n";
const UNWATCH: &[u8] = b"*1\r\n$7\r\nUNWATCH\r\n";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::RequestScanner;

    /// `classify` applied to one request, given as its arguments.
    fn on<T>(args: &[&str], classify: impl FnOnce(CommandKind, &[u8], &[u8], &Request) -> T) -> T {
        let mut bytes = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            bytes.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
        let request = RequestScanner::default().scan(&bytes).unwrap().expect("a complete request");
        let name = &bytes[request.name.clone()];
        classify(CommandKind::of(name), name, &bytes, &request)
    }

    #[test]
    fn subcommands_say_how_a_request_is_handled() {
        assert_eq!(on(&["client", "setinfo", "lib-ver", "8.1.0"], client_setting), Some("LIB-VER"));
        assert_eq!(on(&["CLIENT", "TRACKING", "on", "BCAST"], client_setting), Some("TRACKING"));
        assert_eq!(on(&["CLIENT", "SETINFO"], client_setting), None, "no attribute: the server's error");
        assert_eq!(on(&["CLIENT", "LIST"], client_setting), None);
        assert!(on(&["script", "load", "return 1"], changes_code));
        assert!(on(&["FUNCTION", "RESTORE", "payload", "REPLACE"], changes_code));
        assert!(!on(&["SCRIPT", "EXISTS", "sha"], changes_code));
        assert!(!on(&["FUNCTION", "LIST"], changes_code));
        assert!(on(&["PSYNC", "?", "-1"], pins));
        assert!(on(&["client", "reply", "off"], pins));
        assert!(on(&["SSUBSCRIBE", "orders"], pins));
        assert!(!on(&["PUBLISH", "news", "hi"], pins));
        assert!(!on(&["CLIENT", "ID"], pins));
        assert!(iterates(b"hscan") && iterates(b"SCAN") && !iterates(b"KEYS"));
    }
}
