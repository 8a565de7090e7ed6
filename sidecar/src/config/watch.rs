//! Delivers new generations of `eden.yaml` to the data plane.
//!
//! Two sources feed one [`Applier`]: a watch of the ConfigMap through the Kubernetes API
//! (sub-second) and a polled file (the fallback; kubelet refreshes mounted ConfigMaps only
//! every minute or so). Either way a payload is applied whole or not at all: an invalid one is
//! logged, counted and remembered as the last error (the Lease reports it to the operator), and
//! the last good configuration stays in force. Consumers read the current configuration as an
//! `Arc` snapshot from a `watch` channel, so a change never tears a command in half.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::{ConfigError, EdenConfig, WritesState};

/// The ConfigMap key that holds the payload.
pub const PAYLOAD_KEY: &str = "eden.yaml";

/// What the data plane currently runs with; `None` until a first valid payload arrives.
pub type CurrentConfig = watch::Receiver<Option<Arc<EdenConfig>>>;

/// Counters and the last rejection, shared with the Lease reporter and metrics.
#[derive(Debug, Default)]
pub struct ConfigStatus {
    applied_generation: Gauge<u64, AtomicU64>,
    rejected_total: Counter,
    last_error: watch::Sender<Option<String>>,
}

impl ConfigStatus {
    pub fn applied_generation(&self) -> u64 {
        self.applied_generation.get()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected_total.get()
    }

    /// Exposes the applied generation and the rejections as Prometheus series.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "config_applied_generation",
            "Generation of the eden.yaml in force",
            self.applied_generation.clone(),
        );
        registry.register("config_rejected", "Payloads rejected as invalid", self.rejected_total.clone());
    }

    /// Why the most recent payload was rejected, if it was.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.borrow().clone()
    }

    /// Changes whenever [`Self::last_error`] does (the Lease reports it at once).
    pub fn errors(&self) -> watch::Receiver<Option<String>> {
        self.last_error.subscribe()
    }

    fn set_error(&self, error: Option<String>) {
        self.last_error.send_if_modified(|last| std::mem::replace(last, error.clone()) != error);
    }
}

/// Validates payloads and publishes the good ones.
#[derive(Debug, Clone)]
pub struct Applier {
    sender: Arc<watch::Sender<Option<Arc<EdenConfig>>>>,
    status: Arc<ConfigStatus>,
}

impl Applier {
    pub fn new() -> (Self, CurrentConfig) {
        let (sender, receiver) = watch::channel(None);
        (Applier { sender: Arc::new(sender), status: Arc::default() }, receiver)
    }

    pub fn status(&self) -> Arc<ConfigStatus> {
        self.status.clone()
    }

    pub fn subscribe(&self) -> CurrentConfig {
        self.sender.subscribe()
    }

    /// Offers one payload, read from `origin` (for the log line). Returns whether it is now in
    /// force.
    pub fn offer(&self, text: &str, origin: &str) -> bool {
        let mut refused = None;
        let parsed = EdenConfig::from_yaml(text);
        self.sender.send_if_modified(|current| {
            let config = match parsed.and_then(|config| goes_forward(current.as_deref(), config)) {
                Ok(config) => config,
                Err(err) => {
                    refused = Some(err);
                    return false;
                }
            };
            self.status.set_error(None);
            if current.as_deref() == Some(&config) {
                return false;
            }
            let generation = config.generation;
            *current = Some(Arc::new(config));
            // Before subscribers wake: the Lease reporter wakes on this change and must read
            // the new generation, or the ack waits for the next renewal; and the log says
            // "applied" before anything acts on it.
            self.status.applied_generation.set(generation);
            tracing::info!(generation, origin, "applied configuration");
            true
        });
        let Some(err) = refused else { return true };
        self.status.rejected_total.inc();
        let kept = self.status.applied_generation();
        tracing::error!(%err, origin, kept_generation = kept, "rejected configuration; keeping the last good one");
        self.status.set_error(Some(err.to_string()));
        false
    }

    /// Follows the ConfigMap `name` until the task is dropped. Watch errors (API server
    /// restarts, expired resource versions) are retried with backoff; a deleted ConfigMap
    /// leaves the last configuration in force.
    pub async fn watch_config_map(self, api: Api<ConfigMap>, name: String) {
        let origin = format!("configmap/{name}");
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api, config).default_backoff().applied_objects().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(config_map) => match config_map.data.as_ref().and_then(|data| data.get(PAYLOAD_KEY)) {
                    Some(text) => {
                        self.offer(text, &origin);
                    }
                    None => {
                        tracing::warn!(origin, "ConfigMap has no {PAYLOAD_KEY} key; keeping the last configuration")
                    }
                },
                Err(err) => tracing::warn!(%err, origin, "watch interrupted; retrying"),
            }
        }
    }

    /// Polls `path` every `interval` and offers its content whenever it changes. Polling (not
    /// inotify) follows kubelet's symlink swaps of mounted ConfigMaps without special cases.
    pub async fn watch_file(self, path: PathBuf, interval: Duration) {
        let origin = path.display().to_string();
        let mut last_seen: Option<(SystemTime, String)> = None;
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            let read = async {
                Ok::<_, std::io::Error>((
                    tokio::fs::metadata(&path).await?.modified()?,
                    tokio::fs::read_to_string(&path).await?,
                ))
            };
            match read.await {
                Ok(seen) if last_seen.as_ref() != Some(&seen) => {
                    self.offer(&seen.1, &origin);
                    last_seen = Some(seen);
                }
                Ok(_) => {}
                Err(err) if last_seen.is_some() => {
                    tracing::warn!(%err, origin, "configuration file unreadable; keeping the last configuration");
                    last_seen = None;
                }
                Err(_) => {}
            }
        }
    }
}

/// Generations only go forward, and one generation means one strategy: an acknowledgement
/// names exactly what it acknowledges, and the operator's fencing argument reads a Lease's
/// generation as "this sidecar applied nothing later".
fn goes_forward(applied: Option<&EdenConfig>, config: EdenConfig) -> Result<EdenConfig, ConfigError> {
    match applied {
        Some(applied) if config.generation < applied.generation => Err(ConfigError::Invalid {
            field: "generation",
            value: config.generation.to_string(),
            expected: "not below the generation applied here; generations only go forward",
        }),
        Some(applied) if config.generation == applied.generation && config != *applied => Err(ConfigError::Invalid {
            field: "generation",
            value: config.generation.to_string(),
            expected: "a new generation for a changed strategy; this one is applied here with other content",
        }),
        _ => Ok(config),
    }
}

/// Whether the configuration in force holds writes (the cutover pause).
pub fn writes_paused(current: &CurrentConfig) -> bool {
    current.borrow().as_ref().is_some_and(|config| config.writes == WritesState::Paused)
}
