//! What every reconciler shares: the API client, the Event recorder and the metrics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};
use tokio::sync::mpsc;

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
    /// Events to publish, in order, by a task of their own (see [`Context::event`]).
    events: mpsc::UnboundedSender<(ObjectReference, Event)>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>, sidecar_image: String) -> Arc<Self> {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance };
        let recorder = Recorder::new(client.clone(), reporter);
        let (events, mut queue) = mpsc::unbounded_channel::<(ObjectReference, Event)>();
        tokio::spawn(async move {
            while let Some((object, event)) = queue.recv().await {
                if let Err(err) = recorder.publish(&event, &object).await {
                    let name = object.name.unwrap_or_default();
                    tracing::warn!(object = name, reason = event.reason, %err, "could not record Event");
                }
            }
        });
        Arc::new(Context {
            events,
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

    /// Publishes an Event on `object`, after what was published before it. A reconcile does not
    /// wait for it: the status carries the same facts, and during a cutover the next reconcile
    /// (the one that flips writes) should not queue behind an Event's round trip. A failure to
    /// record is logged, never fatal.
    pub fn event<K>(&self, object: &K, type_: EventType, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
        if self.events.send((object.object_ref(&()), event)).is_err() {
            tracing::warn!(object = %object.name_any(), reason, "could not record Event: the publisher stopped");
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
