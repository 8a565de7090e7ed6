//! What every reconciler shares: the API client, the Event recorder and the metrics.

use std::sync::Arc;

use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Resource, ResourceExt};

use crate::metrics::Metrics;
use crate::migration::replication::Replications;

/// The field manager for everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "eden-operator";

pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    /// The replication runs of the migrations this replica leads.
    pub replications: Replications,
    /// The eden-sidecar image for gateways that do not name one.
    pub sidecar_image: String,
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
        })
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
