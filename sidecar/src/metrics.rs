//! The sidecar's Prometheus metrics (DESIGN §8), served on the admin port only.
//!
//! Every series the hot path touches is created once up front and held as a handle, so
//! counting a command is one atomic add: no label lookup, no lock, no allocation.
//!
//! Besides the request path: mirrored writes by side and outcome, shadow-read comparisons,
//! held connections, and (registered by [`ConfigStatus`](crate::config::ConfigStatus)) the
//! applied configuration generation and rejected payloads.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use crate::command::CommandKind;
use crate::route::Side;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    route: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MirrorLabels {
    to: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// What became of a request mirrored to the side that does not answer the client.
#[derive(Debug, Clone, Copy)]
pub enum MirrorOutcome {
    /// The server accepted it.
    Applied,
    /// Refused, or the connection failed: the two sides may now differ.
    Failed,
    /// The link's queue was full: never sent.
    Dropped,
}

/// How a shadow read compared with the reply the client got.
#[derive(Debug, Clone, Copy)]
pub enum ShadowOutcome {
    Match,
    Mismatch,
    /// Not compared: dropped, no connection, or no answer in time.
    Failed,
}

/// Why a client saw an error, or a connection was closed, because of the proxy.
#[derive(Debug, Clone, Copy)]
pub enum ErrorKind {
    UpstreamUnreachable,
    Protocol,
    Io,
}

pub struct ProxyMetrics {
    registry: Registry,
    connections_active: Gauge,
    commands: [[Counter; CommandKind::ALL.len()]; 2],
    errors: [Counter; 3],
    latency: Histogram,
    mirror: [[Counter; 3]; 2],
    shadow: [Counter; 3],
    holding: Gauge,
    held: Counter,
    refused: Counter,
    target_reads_late: Counter,
    /// Writes routed to the source whose replies have not reached their client yet.
    writes_in_flight: Gauge,
    /// Woken whenever [`Self::writes_in_flight`] drops to 0.
    writes_settled: Notify,
    /// Woken on every mirrored write that did not land (see [`Self::lost_mirror_write`]).
    mirror_loss: Notify,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("eden");
        let connections_active = Gauge::default();
        let commands = Family::<CommandLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register("connections_active", "Client connections open", connections_active.clone());
        registry.register("commands", "Commands forwarded, by route and kind", commands.clone());
        registry.register("errors", "Errors the proxy caused or reported, by kind", errors.clone());
        registry.register(
            "proxy_latency_seconds",
            "From forwarding a batch of requests to the first reply byte from the upstream",
            latency.clone(),
        );
        let mirror = Family::<MirrorLabels, Counter>::default();
        let shadow = Family::<OutcomeLabels, Counter>::default();
        let (holding, held) = (Gauge::default(), Counter::default());
        registry.register(
            "mirror_writes",
            "Writes also sent to the side that does not answer the client, by side and outcome",
            mirror.clone(),
        );
        registry.register("shadow_reads", "Reads also sent to the other side and compared, by outcome", shadow.clone());
        registry.register("writes_holding", "Client connections whose next write is held (cutover)", holding.clone());
        registry.register("writes_held", "Writes held during a cutover pause", held.clone());
        let (refused, writes_in_flight) = (Counter::default(), Gauge::default());
        let target_reads_late = Counter::default();
        registry.register(
            "target_reads_late",
            "Reads the target did not answer within the Migration's targetReadDeadlineMillis, answered by the source instead",
            target_reads_late.clone(),
        );
        registry.register(
            "writes_in_flight",
            "Writes routed to the source whose replies have not reached their client yet",
            writes_in_flight.clone(),
        );
        registry.register(
            "writes_refused",
            "Writes answered with an error because they were held too long (a cutover without a decision, or a strategy this sidecar could not confirm)",
            refused.clone(),
        );
        let command = |side: Side| {
            CommandKind::ALL.map(|kind| {
                commands.get_or_create(&CommandLabels { route: side.as_str(), kind: kind.as_str() }).clone()
            })
        };
        let error = |kind: &'static str| errors.get_or_create(&ErrorLabels { kind }).clone();
        let mirror = |side: Side| {
            ["applied", "failed", "dropped"]
                .map(|outcome| mirror.get_or_create(&MirrorLabels { to: side.as_str(), outcome }).clone())
        };
        ProxyMetrics {
            commands: Side::BOTH.map(command),
            errors: ["upstream_unreachable", "protocol", "io"].map(error),
            registry,
            connections_active,
            latency,
            mirror: Side::BOTH.map(mirror),
            shadow: ["match", "mismatch", "failed"]
                .map(|outcome| shadow.get_or_create(&OutcomeLabels { outcome }).clone()),
            holding,
            held,
            refused,
            target_reads_late,
            writes_in_flight,
            writes_settled: Notify::new(),
            mirror_loss: Notify::new(),
        }
    }
}

impl ProxyMetrics {
    /// Adds a batch's [`CommandCounts`] and clears them.
    pub fn commands(&self, counts: &mut CommandCounts) {
        for (series, counts) in self.commands.iter().zip(&mut counts.0) {
            for (counter, count) in series.iter().zip(counts.iter_mut()).filter(|(_, count)| **count > 0) {
                counter.inc_by(std::mem::take(count).into());
            }
        }
    }

    /// `requests` mirrored to `side` came to `outcome`.
    pub fn mirror(&self, side: Side, outcome: MirrorOutcome, requests: u64) {
        self.mirror[side as usize][outcome as usize].inc_by(requests);
        if !matches!(outcome, MirrorOutcome::Applied) && requests > 0 {
            self.mirror_loss.notify_one();
        }
    }

    /// Completes once a mirrored write has failed or been dropped since the last time it
    /// completed, so the Lease can report the loss at once rather than at its next renewal: the
    /// operator decides on cutovers and rollbacks from it.
    pub async fn lost_mirror_write(&self) {
        self.mirror_loss.notified().await
    }

    /// Writes mirrored to `side` that never landed there (failed or dropped) since start.
    pub fn lost_mirror_writes(&self, side: Side) -> u64 {
        let counts = &self.mirror[side as usize];
        counts[MirrorOutcome::Failed as usize].get() + counts[MirrorOutcome::Dropped as usize].get()
    }

    pub fn shadow(&self, outcome: ShadowOutcome) {
        self.shadow[outcome as usize].inc();
    }

    /// A connection's write is held; returns a guard that counts it until released.
    pub fn hold_started(&self) -> HoldGuard<'_> {
        self.held.inc();
        self.holding.inc();
        HoldGuard(&self.holding)
    }

    pub fn target_read_late(&self) {
        self.target_reads_late.inc();
    }

    pub fn write_sent(&self) {
        self.writes_in_flight.inc();
    }

    pub fn writes_settled(&self, count: u32) {
        if self.writes_in_flight.dec_by(i64::from(count)) == i64::from(count) {
            self.writes_settled.notify_waiters();
        }
    }

    /// Writes routed to the source and not answered yet, across every session.
    pub fn writes_in_flight(&self) -> i64 {
        self.writes_in_flight.get()
    }

    /// Resolves the next time no write is in flight (see [`Self::writes_in_flight`]).
    pub async fn no_writes_in_flight(&self) {
        let settled = self.writes_settled.notified();
        if self.writes_in_flight() == 0 {
            return;
        }
        settled.await;
    }

    pub fn write_refused(&self) {
        self.refused.inc();
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }

    pub fn connection_opened(&self) {
        self.connections_active.inc();
    }

    pub fn connection_closed(&self) {
        self.connections_active.dec();
    }

    pub fn observe_latency(&self, took: Duration) {
        self.latency.observe(took.as_secs_f64());
    }

    /// Registers more series (the config watcher's) in the same registry.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Commands a session forwarded in one batch, by side and kind, for
/// [`ProxyMetrics::commands`]: one atomic add per kind per batch rather than one per request,
/// on counters every session shares.
#[derive(Debug, Default)]
pub struct CommandCounts([[u32; CommandKind::ALL.len()]; 2]);

impl CommandCounts {
    pub fn count(&mut self, side: Side, kind: CommandKind) {
        self.0[side as usize][kind as usize] += 1;
    }

    /// Commands counted, on both sides.
    pub fn total(&self) -> u64 {
        self.0.iter().flatten().map(|&count| u64::from(count)).sum()
    }
}

/// Counts a held connection in `eden_writes_holding` while it lives.
pub struct HoldGuard<'a>(&'a Gauge);

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_command_counts_is_added_once_and_cleared() {
        let metrics = ProxyMetrics::default();
        let mut counts = CommandCounts::default();
        for _ in 0..3 {
            counts.count(Side::Source, CommandKind::Write);
        }
        counts.count(Side::Target, CommandKind::Read);
        metrics.commands(&mut counts);
        metrics.commands(&mut counts);
        let rendered = metrics.render();
        assert!(rendered.contains(r#"eden_commands_total{route="source",kind="write"} 3"#), "{rendered}");
        assert!(rendered.contains(r#"eden_commands_total{route="target",kind="read"} 1"#), "{rendered}");
        assert!(rendered.contains(r#"eden_commands_total{route="source",kind="read"} 0"#), "{rendered}");
    }
}
