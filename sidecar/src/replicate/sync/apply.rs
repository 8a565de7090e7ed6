//! Following the source's replication stream: its commands, in order, onto the target.
//!
//! The stream is a sequence of ordinary requests. Eden forwards write commands byte for byte
//! (FUNCTION LOAD and RESTORE made to replace what the target has: [`replacing_libraries`]),
//! tracks SELECT (emitting it to the target only before a write in another database), answers
//! REPLCONF GETACK, and drops PING. Whatever is buffered is applied as one MULTI/EXEC that also
//! records the position reached ([`super::target`]), so the target never holds half a batch nor
//! a batch without its position. The source's own MULTI/EXEC pairs are unwrapped into the batch,
//! and a transaction still arriving waits for its EXEC, so a batch never splits one.
//!
//! The stream's absolute expiries reach the target later than the source's ([`super::hold`]):
//! shifted while the expiry hold lasts, then by a short grace. Once the hold ends a settle step
//! runs between batches until every held key has its own expiry back; the backfill counts as
//! done only then.
//!
//! Under `skip` and `fail`, a FLUSHDB or FLUSHALL in the stream stops replication just before it:
//! the target has keys of its own, which are not the source's to flush.
//!
//! Once a second the applied offset is acknowledged to the source (`REPLCONF ACK`, which keeps
//! the link alive and lets `WAIT` see Eden) and the source's `master_repl_offset` is read on a
//! side connection to report the lag in bytes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use redis_protocol::resp2::types::BytesFrame;
use tracing::{info, warn};

use super::Reporter;
use super::hold::Hold;
use super::link::{Link, encode, master_offset};
use super::target::{Position, Target};
use crate::frame::RequestScanner;
use crate::replicate::{ReplacePolicy, ReplicateError};

const ACK_EVERY: Duration = Duration::from_secs(1);

/// Applies the stream until an error (a closed link, a target that refuses a batch).
pub(crate) struct Follower<'a> {
    pub(crate) source: &'a mut Link,
    /// A second connection to the source, for INFO.
    pub(crate) info: &'a mut Link,
    pub(crate) target: &'a mut Target,
    pub(crate) reporter: &'a mut Reporter,
    /// What the target holds.
    pub(crate) applied: Position,
    /// Bytes of writes per batch at most (a transaction may exceed it).
    pub(crate) batch_bytes: usize,
    /// Under `skip` and `fail` the target has keys of its own, so a flush in the stream stops
    /// replication instead of reaching the target.
    pub(crate) policy: ReplacePolicy,
    /// The expiry hold, if the target may hold shifted expiries.
    pub(crate) hold: Hold,
}

/// The part of the stream read but not yet applied.
struct Pending {
    scanner: RequestScanner,
    /// Stream offset just past the last request read.
    offset: u64,
    /// The stream's selected database.
    db: u64,
    /// The commands of a transaction whose EXEC has not arrived, with their databases.
    transaction: Option<Vec<(u64, Vec<u8>)>>,
    /// Where the last complete unit (command or transaction) ended: a safe batch boundary.
    boundary: (u64, u64),
    /// A GETACK asked for an acknowledgement.
    ack_requested: bool,
    /// When each received chunk arrived, by the stream offset it ends at, for lag in ms.
    arrivals: VecDeque<(u64, Instant)>,
}

/// One MULTI/EXEC in the making.
struct Batch {
    request: Vec<u8>,
    /// Commands queued between MULTI and EXEC (writes, SELECTs, the position record).
    queued: usize,
    writes: usize,
}

impl Follower<'_> {
    pub(crate) async fn run(mut self) -> Result<(), ReplicateError> {
        let mut pending = Pending {
            scanner: RequestScanner::default(),
            offset: self.applied.offset,
            db: self.applied.db,
            transaction: None,
            boundary: (self.applied.offset, self.applied.db),
            ack_requested: false,
            arrivals: VecDeque::new(),
        };
        let mut tick = tokio::time::interval(ACK_EVERY);
        let mut master = self.applied.offset;
        loop {
            // Bytes already buffered (the stream right after the snapshot) are applied first.
            self.apply(&mut pending).await?;
            self.report(&pending, master);
            let settling = matches!(self.hold, Hold::Settling { .. });
            if let Hold::Settling { settle, .. } = &mut self.hold
                && settle.step(self.target).await?
            {
                self.hold = Hold::Off;
                self.applied.held = false;
                self.target.write_position(&self.applied).await?;
                info!("every held expiry is the source's again");
                self.report(&pending, master);
            }
            tokio::select! {
                biased;
                read = self.source.fill(1) => {
                    read?;
                    let now = Instant::now();
                    pending.arrivals.push_back((pending.offset + self.source.conn.buf.len() as u64, now));
                    // Published before applying: if the target stalls, the lag keeps growing.
                    if pending.arrivals.len() == 1 {
                        self.reporter.progress.behind_since = Some(now);
                        self.reporter.publish();
                    }
                }
                _ = tick.tick() => {
                    self.ack().await?;
                    master = master_offset(self.info).await?;
                    self.hold.check(master, self.applied.offset, !pending.arrivals.is_empty());
                }
                // A settle pass goes on between batches without waiting for the stream.
                () = std::future::ready(()), if settling => {}
            }
        }
    }

    /// Applies every complete unit buffered, in batches.
    async fn apply(&mut self, pending: &mut Pending) -> Result<(), ReplicateError> {
        loop {
            let mut batch = Batch { request: b"*1\r\n$5\r\nMULTI\r\n".to_vec(), queued: 0, writes: 0 };
            let mut more = false;
            while let Some(request) = pending.scanner.scan(&self.source.conn.buf).map_err(|e| self.source.error(e))? {
                let bytes = self.source.conn.buf.split_to(request.len);
                pending.offset += request.len as u64;
                let mut args = request.args(&bytes);
                let name = args.next().map(|r| bytes[r].to_ascii_uppercase()).unwrap_or_default();
                match name.as_slice() {
                    b"PING" => {}
                    b"REPLCONF" => {
                        let sub = args.next().map(|r| bytes[r].to_ascii_uppercase());
                        pending.ack_requested |= sub.as_deref() == Some(b"GETACK");
                    }
                    b"SELECT" => {
                        let db = args.next().and_then(|r| std::str::from_utf8(&bytes[r]).ok()?.parse().ok());
                        pending.db = db.ok_or_else(|| self.source.error("the stream sent an unreadable SELECT"))?;
                    }
                    b"FLUSHALL" | b"FLUSHDB" if self.policy != ReplacePolicy::Replace => {
                        // What came before the flush is applied and recorded; the flush (and the
                        // rest of its transaction, if any) is not, so a restart stops here again.
                        self.commit(batch, pending).await?;
                        let evidence = format!("`{}` in its replication stream", String::from_utf8_lossy(&name));
                        return Err(ReplicateError::SourceFlushed { server: self.source.label().clone(), evidence });
                    }
                    b"MULTI" => pending.transaction = Some(Vec::new()),
                    b"EXEC" => {
                        for (db, command) in pending.transaction.take().unwrap_or_default() {
                            batch.push(self.target, db, &command);
                        }
                    }
                    _ => {
                        let rewritten = match name.as_slice() {
                            b"FUNCTION" => replacing_libraries(&bytes, args),
                            b"PEXPIREAT" | b"EXPIREAT" | b"SET" | b"RESTORE" | b"RENAME" | b"RENAMENX" | b"MOVE"
                            | b"COPY" | b"SWAPDB" => {
                                let args: Vec<&[u8]> = args.map(|arg| &bytes[arg]).collect();
                                self.hold.note(&name, &args, pending.db);
                                self.hold.rewrite(&name, &args)
                            }
                            _ => None,
                        };
                        let command = rewritten.as_deref().unwrap_or(&bytes);
                        match &mut pending.transaction {
                            Some(queued) => queued.push((pending.db, command.to_vec())),
                            None => batch.push(self.target, pending.db, command),
                        }
                    }
                }
                if pending.transaction.is_none() {
                    pending.boundary = (pending.offset, pending.db);
                }
                if batch.request.len() >= self.batch_bytes && pending.transaction.is_none() {
                    more = true;
                    break;
                }
            }
            self.commit(batch, pending).await?;
            if pending.ack_requested {
                pending.ack_requested = false;
                self.ack().await?;
            }
            if !more {
                return Ok(());
            }
        }
    }

    /// Runs a batch with its position record; with no writes, just moves the position.
    async fn commit(&mut self, mut batch: Batch, pending: &mut Pending) -> Result<(), ReplicateError> {
        let (offset, db) = pending.boundary;
        let position = Position { replid: self.applied.replid.clone(), offset, db, held: self.hold.recorded() };
        if batch.writes > 0 {
            batch.queued += self.target.record(&mut batch.request, &position);
            batch.request.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
            self.target.pace.spend(batch.writes).await;
            self.target.link.send(&batch.request).await?;
            for _ in 0..=batch.queued {
                self.target.expect_ok("MULTI").await?;
            }
            match self.target.link.reply().await? {
                BytesFrame::Array(results) => {
                    for result in results {
                        if let BytesFrame::Error(err) = result {
                            self.reporter.progress.stream_errors += 1;
                            warn!(error = %err, "the target refused a replicated command; the key may now differ");
                        }
                    }
                }
                other => {
                    return Err(self.target.link.error(format!("a replicated batch was not applied: {other:?}")));
                }
            }
        }
        self.applied = position;
        while pending.arrivals.front().is_some_and(|(end, _)| *end <= offset) {
            pending.arrivals.pop_front();
        }
        Ok(())
    }

    async fn ack(&mut self) -> Result<(), ReplicateError> {
        let offset = self.applied.offset.to_string();
        self.source.send(&encode(&[b"REPLCONF", b"ACK", offset.as_bytes()])).await
    }

    fn report(&mut self, pending: &Pending, master: u64) {
        let applied = self.applied.offset;
        let received = pending.offset + self.source.conn.buf.len() as u64;
        let progress = &mut self.reporter.progress;
        progress.lag_bytes = master.max(received).saturating_sub(applied);
        // Until every held expiry is settled the target is behind since the hold began.
        progress.behind_since = self.hold.since().or_else(|| pending.arrivals.front().map(|(_, at)| *at));
        progress.lag_ms = progress.behind_since.map_or(0, |at| at.elapsed().as_millis() as u64);
        progress.checkpoint.sync = Some(self.applied.clone().into());
        progress.streamed = Some(applied);
        self.reporter.publish();
    }
}

/// FUNCTION LOAD and FUNCTION RESTORE as the target should run them: replacing a library it
/// has already. The source's load succeeded, so the library is new there; the target may have
/// it from the sidecars, which load libraries on both sides (DESIGN §9), and would refuse the
/// stream's copy, keeping its own. `None` for other FUNCTION commands and for those already
/// replacing (or flushing).
fn replacing_libraries(bytes: &[u8], args: impl Iterator<Item = std::ops::Range<usize>>) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = args.map(|arg| &bytes[arg]).collect();
    let is = |arg: Option<&&[u8]>, names: &[&str]| {
        arg.is_some_and(|arg| names.iter().any(|n| arg.eq_ignore_ascii_case(n.as_bytes())))
    };
    match args.as_slice() {
        [load, code] if is(Some(load), &["LOAD"]) => Some(encode(&[b"FUNCTION", b"LOAD", b"REPLACE", code])),
        [restore, payload, policy @ ..]
            if is(Some(restore), &["RESTORE"]) && !is(policy.first(), &["FLUSH", "REPLACE"]) =>
        {
            Some(encode(&[b"FUNCTION", b"RESTORE", payload, b"REPLACE"]))
        }
        _ => None,
    }
}

impl Batch {
    /// Queues one write, preceded by a SELECT when it runs in another database.
    fn push(&mut self, target: &mut Target, db: u64, command: &[u8]) {
        self.queued += target.select(&mut self.request, db) + 1;
        self.request.extend_from_slice(command);
        self.writes += 1;
    }
}
