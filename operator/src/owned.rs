//! The identity of every object the operator creates for a Migration (its ConfigMap, the
//! gateway's Deployment and Service): an owner reference, so that a garbage collector removes
//! them with the Migration, and two labels, so that people and the controller's watches can
//! tell whose they are. The finalizer still deletes them itself: a cluster may have no garbage
//! collector (DESIGN §9).

use std::collections::BTreeMap;

use eden_sidecar::lease::LABEL_MIGRATION;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::context::FIELD_MANAGER;

/// `app.kubernetes.io/managed-by: eden-operator` and `eden.io/migration: <name>`.
pub fn labels(migration: &impl Resource) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_string(), FIELD_MANAGER.to_string()),
        (LABEL_MIGRATION.to_string(), migration.name_any()),
    ])
}

/// Metadata for an object named `name` in `migration`'s namespace, owned by it.
pub fn metadata<K: Resource<DynamicType = ()>>(migration: &K, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: migration.namespace(),
        owner_references: migration.controller_owner_ref(&()).map(|owner| vec![owner]),
        labels: Some(labels(migration)),
        ..Default::default()
    }
}
