//! What every reconciler shares: the API client, the Event recorder and the metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};

use crate::metrics::Metrics;
use crate::migration::replication::Replications;
use crate::sidecars::FenceClock;

/// The field manager for everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "eden-operator";

pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// The replication runs of the migrations this replica leads.
    pub replications: Replications,
    /// The eden-sidecar image for gateways that do not name one.
    pub sidecar_image: String,
    /// What this process has seen of each Migration's generations and Leases, by uid.
    fence_clocks: Mutex<HashMap<String, FenceClock>>,
    recorder: Recorder,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>, sidecar_image: String) -> Arc<Self> {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            replications: Replications::default(),
            sidecar_image,
            fence_clocks: Mutex::default(),
        })
    }

    /// The fence clock of the Migration with `uid` (see [`crate::sidecars`]). Held only for a
    /// computation, never across an await.
    pub fn fence_clock(&self, uid: &str) -> FenceClockGuard<'_> {
        let mut clocks = self.fence_clocks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        clocks.entry(uid.to_string()).or_default();
        FenceClockGuard { clocks, uid: uid.to_string() }
    }

    /// Forgets a deleted Migration's clock.
    pub fn forget_fence_clock(&self, uid: &str) {
        self.fence_clocks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(uid);
    }

    /// Publishes an Event on `object`. A failure to record is logged, never fatal: the status
    /// already carries the same facts.
    pub async fn event<K>(&self, object: &K, type_: EventType, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if let Err(err) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(object = %object.name_any(), reason, %err, "could not record Event");
        }
    }
}

/// One Migration's [`FenceClock`], locked.
pub struct FenceClockGuard<'a> {
    clocks: MutexGuard<'a, HashMap<String, FenceClock>>,
    uid: String,
}

impl std::ops::Deref for FenceClockGuard<'_> {
    type Target = FenceClock;

    fn deref(&self) -> &FenceClock {
        self.clocks.get(&self.uid).expect("inserted on creation")
    }
}

impl std::ops::DerefMut for FenceClockGuard<'_> {
    fn deref_mut(&mut self) -> &mut FenceClock {
        self.clocks.get_mut(&self.uid).expect("inserted on creation")
    }
}
