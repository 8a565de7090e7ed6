//! The `eden.io/v1alpha1` API: Kubernetes conventions (camelCase, integer percentages,
//! `status` subresource, `metav1.Condition` conditions), validation in the schema so a bad
//! object is refused by the API server before the operator ever sees it.

mod endpoint;
mod migration;

pub use endpoint::{Endpoint, EndpointSpec, EndpointStatus, EndpointTls, SecretRef};
pub use migration::{
    CopyProgress, CutoverGuards, DataCopy, DataSpec, EndpointSelector, FailureHandling, Gateway, GatewayStatus,
    LocalObjectRef, Migration, MigrationSpec, MigrationStatus, Phase, ReplacePolicy, SidecarCounts, Strategy,
    StrategyType, Verification, WriteMode, WriteModeKind, WritePolicy,
};

use kube::CustomResourceExt;

/// Every CRD Eden installs, as multi-document YAML in a stable order (what `crdgen` prints).
pub fn all_crds_yaml() -> Result<String, serde_yaml::Error> {
    let crds = [Endpoint::crd(), Migration::crd()];
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
