//! The sidecar's strategy: the `eden.yaml` payload ([`payload`]) and, next, the watchers that
//! deliver new generations of it (the ConfigMap through the Kubernetes API, a mounted file as
//! the fallback).

mod confirm;
mod payload;
mod watch;

pub use confirm::{Confirmation, Confirmations, Confirmer};
pub use payload::{ConfigError, EdenConfig, ReadRouting, UpstreamConfig, WriteMode, WritePolicy, WritesState};
pub use watch::{Applier, ConfigStatus, CurrentConfig, PAYLOAD_KEY, writes_paused};
