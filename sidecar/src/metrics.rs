//! The sidecar's Prometheus metrics (DESIGN §8), served on the admin port only.
//!
//! Every series the hot path touches is created once up front and held as a handle, so
//! counting a command is one atomic add: no label lookup, no lock, no allocation.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::command::CommandKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    route: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
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
    commands: [Counter; CommandKind::ALL.len()],
    errors: [Counter; 3],
    latency: Histogram,
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
        let command =
            |kind: CommandKind| commands.get_or_create(&CommandLabels { route: "source", kind: kind.as_str() }).clone();
        let error = |kind: &'static str| errors.get_or_create(&ErrorLabels { kind }).clone();
        ProxyMetrics {
            commands: CommandKind::ALL.map(command),
            errors: ["upstream_unreachable", "protocol", "io"].map(error),
            registry,
            connections_active,
            latency,
        }
    }
}

impl ProxyMetrics {
    pub fn command(&self, kind: CommandKind) {
        self.commands[kind as usize].inc();
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
