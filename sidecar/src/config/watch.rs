//! Delivers new generations of `eden.yaml` to the data plane.
//!
//! Two sources feed one [`Applier`]: a watch of the ConfigMap through the Kubernetes API
//! (sub-second) and a polled file (the fallback; kubelet refreshes mounted ConfigMaps only
//! every minute or so). Either way a payload is applied whole or not at all: an invalid one is
//! logged, counted and remembered as the last error (the Lease reports it to the operator), and
//! the last good configuration stays in force. Consumers read the current configuration as an
//! `Arc` snapshot from a `watch` channel, so a change never tears a command in half.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::{EdenConfig, WritesState};

/// The ConfigMap key that holds the payload.
pub const PAYLOAD_KEY: &str = "eden.yaml";

/// What the data plane currently runs with; `None` until a first valid payload arrives.
pub type CurrentConfig = watch::Receiver<Option<Arc<EdenConfig>>>;

/// Counters and the last rejection, shared with the Lease reporter and metrics.
#[derive(Debug, Default)]
pub struct ConfigStatus {
    applied_generation: Gauge<u64, AtomicU64>,
    rejected_total: Counter,
    last_error: Mutex<Option<String>>,
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
        self.last_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn set_error(&self, error: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = error;
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
        match EdenConfig::from_yaml(text) {
            Ok(config) => {
                self.status.set_error(None);
                let generation = config.generation;
                self.sender.send_if_modified(|current| {
                    if current.as_deref() == Some(&config) {
                        return false;
                    }
                    *current = Some(Arc::new(config));
                    // Before subscribers wake: the Lease reporter wakes on this change and must
                    // read the new generation, or the ack waits for the next renewal; and the
                    // log says "applied" before anything acts on it.
                    self.status.applied_generation.set(generation);
                    tracing::info!(generation, origin, "applied configuration");
                    true
                });
                true
            }
            Err(err) => {
                self.status.rejected_total.inc();
                let kept = self.status.applied_generation();
                tracing::error!(%err, origin, kept_generation = kept, "rejected configuration; keeping the last good one");
                self.status.set_error(Some(err.to_string()));
                false
            }
        }
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

/// Whether the configuration in force holds writes (the cutover pause).
pub fn writes_paused(current: &CurrentConfig) -> bool {
    current.borrow().as_ref().is_some_and(|config| config.writes == WritesState::Paused)
}
