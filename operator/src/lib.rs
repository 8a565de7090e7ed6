//! Eden's operator: the `Endpoint` and `Migration` custom resources and what reconciles them.
//!
//! The CRD types in [`crd`] are the source of truth for the YAML in `crds/`, which the
//! `crdgen` binary writes; a test fails when the two drift apart.

pub mod crd;
