//! Writes a routed session sent to the source whose replies have not reached the client yet,
//! and when the last ones did (DESIGN §9, "Fencing" and "Freshness").
//!
//! Two readers need this. The Lease reports writes `paused` only once no write routed before
//! the pause is still on its way to the source: otherwise one could reach the source after the
//! operator read the offset replication drains to, and be lost when replication stops. And a
//! read of a key the source owns goes to the target only for a client whose writes the target
//! is known to hold: none still waiting, the last answered before the freshness record's
//! covered instant.
//!
//! The request side counts each write as it routes it (before it is even sent, so a gate that
//! closes meanwhile sees it), per session and for the whole sidecar; a batch's count travels
//! behind the batch's replies as one [`SourceWrites`] due, which the reply side marks answered
//! once everything before it reached the client. Dropped unanswered (the session ended), it
//! still takes its count back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::time::Instant;

use crate::metrics::ProxyMetrics;

/// An instant both directions of a session can set and read without a lock: nanoseconds after
/// the session began, 0 for never.
#[derive(Debug)]
pub(crate) struct SharedInstant {
    nanos: AtomicU64,
    epoch: Instant,
}

impl Default for SharedInstant {
    fn default() -> Self {
        SharedInstant { nanos: AtomicU64::new(0), epoch: Instant::now() }
    }
}

impl SharedInstant {
    pub(crate) fn set_now(&self) {
        let nanos = self.epoch.elapsed().as_nanos() as u64;
        self.nanos.store(nanos.max(1), Ordering::Release);
    }

    pub(crate) fn get(&self) -> Option<Instant> {
        match self.nanos.load(Ordering::Acquire) {
            0 => None,
            nanos => Some(self.epoch + std::time::Duration::from_nanos(nanos)),
        }
    }
}

/// One session's count, shared by its two directions.
#[derive(Debug, Default)]
pub(crate) struct SessionWrites {
    in_flight: AtomicU32,
    /// When the last writes were answered.
    answered: SharedInstant,
}

/// What a client's writes to the source allow its next read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientWrites {
    /// It has written nothing through this session.
    None,
    /// Every one was answered, the last ones at this instant.
    AnsweredAt(Instant),
    /// Some are still waiting for their reply.
    Waiting,
}

impl SessionWrites {
    pub(crate) fn client_writes(&self) -> ClientWrites {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return ClientWrites::Waiting;
        }
        self.answered.get().map_or(ClientWrites::None, ClientWrites::AnsweredAt)
    }
}

/// Writes of one batch, counted until answered or dropped.
pub(crate) struct SourceWrites {
    count: u32,
    session: Arc<SessionWrites>,
    metrics: Arc<ProxyMetrics>,
}

impl SourceWrites {
    pub(crate) fn new(session: Arc<SessionWrites>, metrics: Arc<ProxyMetrics>) -> Self {
        SourceWrites { count: 0, session, metrics }
    }

    /// One more write routed to the source.
    pub(crate) fn add(&mut self) {
        self.count += 1;
        self.session.in_flight.fetch_add(1, Ordering::AcqRel);
        self.metrics.write_sent();
    }

    /// Every reply before this one reached the client.
    pub(crate) fn answered(self) {
        self.session.answered.set_now();
    }
}

impl Drop for SourceWrites {
    fn drop(&mut self) {
        self.session.in_flight.fetch_sub(self.count, Ordering::AcqRel);
        self.metrics.writes_settled(self.count);
    }
}
