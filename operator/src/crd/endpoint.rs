//! `Endpoint`: one Redis server Eden can reach.
//!
//! Credentials are never inline: the spec names a Secret with `password` (and optionally
//! `username`), so an Endpoint can live in Git.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a Redis server is and how to authenticate to it.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "eden.io",
    version = "v1alpha1",
    kind = "Endpoint",
    namespaced,
    status = "EndpointStatus",
    shortname = "eep",
    category = "eden",
    printcolumn = r#"{"name":"URI","type":"string","jsonPath":".spec.uri"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.serverVersion"}"#,
    printcolumn = r#"{"name":"Role","type":"string","jsonPath":".status.role"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// `redis://host:port[/db]`, or `rediss://host:port[/db]` for TLS.
    #[schemars(regex(pattern = r"^rediss?://[^/:@\s]+(:[0-9]{1,5})?(/[0-9]{1,2})?$"))]
    pub uri: String,

    /// A Secret in the Endpoint's namespace with key `password` and optional `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,

    /// TLS settings for `rediss://` endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<EndpointTls>,
}

/// A Secret in the same namespace as the object that names it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointTls {
    /// A Secret whose `ca.crt` verifies the server; the system roots when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretRef>,

    /// The name to verify the server's certificate against, when it differs from the URI's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,

    /// Accept any server certificate. For testing only: it gives up protection against
    /// impersonation.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// What the operator last observed of the server.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// `Ready`: the last probe (PING + INFO) succeeded.
    #[serde(default)]
    pub conditions: Vec<Condition>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `redis_version` from INFO server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,

    /// `master` or `slave`, from INFO replication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,

    /// Round trip of the last PING, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_latency_micros: Option<i64>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,
}
