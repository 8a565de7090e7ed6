//! `Migration`: moving data and traffic from one Endpoint to another.
//!
//! The spec says what the user wants (owned by them or their GitOps tool; the operator never
//! writes it); the status says where the data is. Shapes are flat and structural on purpose:
//! the write mode is one object with a `mode` discriminator rather than a Rust enum with
//! variant payloads, so the schema stays structural and the API server can validate it with
//! CEL rules instead of leaving bad combinations for the operator to discover.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A migration of one Redis dataset, from `source` to `target`.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[kube(
    group = "eden.io",
    version = "v1alpha1",
    kind = "Migration",
    namespaced,
    status = "MigrationStatus",
    shortname = "mig",
    category = "eden",
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.phase) || oldSelf.status.phase == 'Pending' \
         || (self.spec.source == oldSelf.spec.source && self.spec.target == oldSelf.spec.target)"
    ).message("spec.source and spec.target cannot change once the migration has started syncing; create a new Migration").reason(Reason::FieldValueForbidden),
    // The default Service name is `eden-<name>`, and Service names are DNS labels.
    validation = Rule::new(
        "!has(self.spec.gateway) || has(self.spec.gateway.serviceName) \
         || (size(self.metadata.name) <= 58 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$'))"
    ).message("this Migration's name cannot make a Service name eden-<name>: set spec.gateway.serviceName"),
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Read%","type":"integer","jsonPath":".spec.strategy.readPercentage"}"#,
    printcolumn = r#"{"name":"Write mode","type":"string","jsonPath":".spec.strategy.writeMode.mode"}"#,
    printcolumn = r#"{"name":"Lag","type":"string","jsonPath":".status.replicationLagMillis","description":"replication lag in milliseconds"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress.summary"}"#,
    printcolumn = r#"{"name":"Sidecars","type":"string","jsonPath":".status.sidecars.summary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("self.source.endpointRef.name != self.target.endpointRef.name").message("source and target must be different Endpoints"))]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    pub source: EndpointSelector,
    pub target: EndpointSelector,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub data: DataSpec,
    #[serde(default)]
    pub failure_handling: FailureHandling,
    #[serde(default)]
    pub cutover: CutoverGuards,
    /// Hold the migration where it is: replication and strategy changes stop until unset.
    #[serde(default)]
    pub paused: bool,
    /// Detach the source after cutover. The point of no return: rollback is impossible after.
    #[serde(default)]
    #[x_kube(validation = Rule::new("oldSelf == false || self == true").message("complete cannot be undone: the source has been detached"))]
    pub complete: bool,
    /// Run eden-sidecar as a shared proxy behind a Service, for applications that cannot take a
    /// sidecar: they point their Redis address at the Service instead. Removing it removes the
    /// proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Gateway>,
}

/// Gateway mode: a Deployment of eden-sidecar and a Service in front of it, following the same
/// ConfigMap as every other sidecar of the migration.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.port != 9090").message("port 9090 is the proxy's admin port (health and metrics); choose another"))]
pub struct Gateway {
    /// Proxy pods; two by default so that one can restart while the other serves.
    #[serde(default = "default_gateway_replicas")]
    #[schemars(range(min = 1, max = 20))]
    pub replicas: i32,
    /// The Service applications connect to; `eden-<migration>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub service_name: Option<String>,
    /// The Redis port of the Service and of the proxy.
    #[serde(default = "default_gateway_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The eden-sidecar image; the operator's `--sidecar-image` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
}

fn default_gateway_replicas() -> i32 {
    2
}

fn default_gateway_port() -> i32 {
    6379
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSelector {
    pub endpoint_ref: LocalObjectRef,
}

/// An object in the Migration's own namespace.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct LocalObjectRef {
    #[schemars(length(min = 1))]
    pub name: String,
}

/// How traffic moves. Percentages are integers 0–100 (Kubernetes API conventions: no floats).
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Strategy {
    #[serde(default, rename = "type")]
    pub type_: StrategyType,
    /// Share of reads served by the target. Held at the authoritative side until the target is in sync.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub read_percentage: i32,
    #[serde(default)]
    pub write_mode: WriteMode,
    /// Share of reads also sent to the other side and compared; the client gets the authoritative reply.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub shadow_read_percentage: i32,
    /// A read the target serves for the source (a read canary) that the target has not answered
    /// within this many milliseconds is answered by the source instead: a slow or stopped
    /// target never holds a client up for longer.
    #[serde(default = "default_target_read_deadline_millis")]
    #[schemars(range(min = 1, max = 60000))]
    pub target_read_deadline_millis: i64,
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy {
            type_: StrategyType::Canary,
            read_percentage: 0,
            write_mode: WriteMode::default(),
            shadow_read_percentage: 0,
            target_read_deadline_millis: default_target_read_deadline_millis(),
        }
    }
}

fn default_target_read_deadline_millis() -> i64 {
    100
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum StrategyType {
    #[default]
    Canary,
}

/// Who receives writes. `{mode: dualWrite, policy: …}` or `{mode: cutover, writePercentage: …}`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode == 'cutover' || !has(self.writePercentage)").message("writePercentage applies to mode cutover only"))]
#[x_kube(validation = Rule::new("self.mode == 'dualWrite' || !has(self.policy)").message("policy applies to mode dualWrite only"))]
pub struct WriteMode {
    pub mode: WriteModeKind,
    /// dualWrite: which side's reply the client gets (the other side is mirrored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<WritePolicy>,
    /// cutover: share of keys (by key hash, so each key has one owner) written to the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub write_percentage: Option<i32>,
}

impl Default for WriteMode {
    fn default() -> Self {
        WriteMode {
            mode: WriteModeKind::DualWrite,
            policy: Some(WritePolicy::OldAuthoritative),
            write_percentage: None,
        }
    }
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WriteModeKind {
    DualWrite,
    Cutover,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum WritePolicy {
    OldAuthoritative,
    NewAuthoritative,
}

/// How the data gets to the target.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.type == 'scan' || !has(self.sourceOpsPerSecond)").message("sourceOpsPerSecond applies to type scan only: sync mode reads the source as one replication stream"))]
#[x_kube(validation = Rule::new("self.type != 'none' || !has(self.targetOpsPerSecond)").message("targetOpsPerSecond needs a copy: type none copies nothing"))]
pub struct DataSpec {
    #[serde(default, rename = "type")]
    pub type_: DataCopy,
    #[serde(default)]
    pub replace: ReplacePolicy,
    /// Commands per second the copy may send to the source (scan mode), so it leaves room for
    /// the application's own traffic. No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub source_ops_per_second: Option<u32>,
    /// Commands per second the copy may send to the target (the snapshot's keys and the
    /// replicated writes). No limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_ops_per_second: Option<u32>,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum DataCopy {
    /// Eden acts as a replica (PSYNC): exact and ordered.
    #[default]
    Sync,
    /// SCAN + DUMP/RESTORE with keyspace notifications, for servers that refuse PSYNC.
    Scan,
    /// No copy: the sidecars mirror writes (caches whose keys expire).
    None,
}

/// What to do with a key that already exists on the target.
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ReplacePolicy {
    #[default]
    Replace,
    Skip,
    Fail,
}

#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum FailureHandling {
    /// Send all traffic back to the source.
    #[default]
    RollbackAll,
    /// Keep traffic where it is and wait for a person.
    Pause,
}

/// Guards the cutover must pass.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CutoverGuards {
    /// Cutover is held while replication lag is above this.
    #[serde(default = "default_max_lag_millis")]
    #[schemars(range(min = 0))]
    pub max_lag_millis: i64,
    /// Longest time writes may be held during the flip; past it the cutover aborts and writes
    /// resume on the source.
    #[serde(default = "default_max_write_pause_millis")]
    #[schemars(range(min = 1, max = 60000))]
    pub max_write_pause_millis: i64,
    /// Cutover is held until a verification found no differences.
    #[serde(default = "default_true")]
    pub require_verification: bool,
}

impl Default for CutoverGuards {
    fn default() -> Self {
        CutoverGuards {
            max_lag_millis: default_max_lag_millis(),
            max_write_pause_millis: default_max_write_pause_millis(),
            require_verification: true,
        }
    }
}

fn default_max_lag_millis() -> i64 {
    100
}

fn default_max_write_pause_millis() -> i64 {
    2_000
}

fn default_true() -> bool {
    true
}

/// Where a migration is (DESIGN §3).
#[derive(JsonSchema, Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Pending,
    Syncing,
    Ready,
    CuttingOver,
    CutOver,
    Completed,
    RollingBack,
    RolledBack,
    Paused,
    Failed,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication_lag_millis: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<CopyProgress>,
    #[serde(default)]
    pub ready_for_cutover: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verification: Option<Verification>,
    /// The replication engine's resume point, so a new leader continues rather than restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
    /// When the cutover paused writes; it aborts `maxWritePauseMillis` later unless flipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_started_at: Option<MicroTime>,
    /// The generation a cutover pushed before pausing writes, so that a sidecar cut off from
    /// the API server is fenced before writes pause rather than during the pause (DESIGN §9,
    /// "Fencing").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_barrier_generation: Option<i64>,
    /// The gateway the operator runs for `spec.gateway`; also how it finds what to delete when
    /// the gateway is removed or its Service renamed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayStatus>,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// The Service applications connect to.
    pub service: String,
    pub deployment: String,
    /// Proxy pods passing their readiness probe.
    pub ready_replicas: i32,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CopyProgress {
    pub keys_copied: i64,
    pub keys_total: i64,
    /// `copied/total (percent%)`, for the printer column.
    pub summary: String,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarCounts {
    /// Sidecars whose Lease the operator saw renewed recently.
    pub live: i32,
    /// Sidecars that applied the current ConfigMap generation.
    pub acknowledged: i32,
    /// Sidecars that did not, and are known to have stopped writing under anything older
    /// (DESIGN §9, "Fencing").
    #[serde(default)]
    pub fenced: i32,
    /// The ConfigMap generation the operator last wrote.
    pub configured_generation: i64,
    /// `acknowledged/sidecars`, for the printer column.
    pub summary: String,
}

#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Verification {
    pub checked: i64,
    pub missing: i64,
    pub extra: i64,
    pub mismatched: i64,
    /// Keys not compared because `data.replace: skip` kept the target's own value (not
    /// differences).
    #[serde(default)]
    pub kept: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}
