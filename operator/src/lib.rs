//! Eden's operator: the `Endpoint` and `Migration` custom resources and what reconciles them.
//!
//! The CRD types in [`crd`] are the source of truth for the YAML in `crds/`, which the
//! `crdgen` binary writes; a test fails when the two drift apart. Each reconciler follows the
//! same shape: `reconcile` observes and writes status with server-side apply, `error_policy`
//! records the failure and requeues, and every user-visible change is an Event.

pub mod conditions;
pub mod configmap;
pub mod context;
pub mod crd;
pub mod endpoint;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod owned;
pub mod plugin;
pub mod proxy;
pub mod sidecars;
pub mod webhook;
