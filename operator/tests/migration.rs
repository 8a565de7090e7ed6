//! The Migration controller against a real API server and real redis-servers: a migration
//! applied with kubectl walks Pending → Syncing → Ready with the data copied and verified,
//! pushes its strategy to the sidecars and counts their acks, cuts over and rolls back, says
//! why when it holds a request, survives an operator restart, and cleans up when deleted.

use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{ControlPlane, RedisConfig, RedisServer};
use eden_operator::crd::{Migration, Phase};
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_operator::{context::Context, endpoint, metrics::Metrics, migration};
use eden_sidecar::config::{Applier, EdenConfig, WritePolicy};
use eden_sidecar::lease::{ANNOTATION_LOST_SOURCE_WRITES, LeaseReporter};
use eden_sidecar::metrics::{MirrorOutcome, ProxyMetrics};
use eden_sidecar::route::Side;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams};
use redis::AsyncCommands;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

/// A namespace with both controllers reconciling it, as the operator's leader would.
struct Harness {
    control_plane: &'static ControlPlane,
    namespace: String,
    client: kube::Client,
    controllers: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Harness {
    async fn start(prefix: &str) -> Harness {
        // The operator's log lines, shown with the output of a failing test (RUST_LOG overrides).
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
        let control_plane = ControlPlane::shared();
        control_plane.install_eden_crds().unwrap();
        let namespace = control_plane.namespace(prefix).await.unwrap();
        let client = control_plane.client().await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut harness = Harness { control_plane, namespace, client, controllers: Vec::new(), metrics };
        harness.start_operator();
        harness
    }

    /// Starts the controllers with a fresh context: a restarted operator knows only what the
    /// API server holds.
    fn start_operator(&mut self) {
        let ctx = Context::new(self.client.clone(), self.metrics.clone(), None, DEFAULT_IMAGE.into());
        self.controllers.push(tokio::spawn(endpoint::run(ctx.clone())));
        self.controllers.push(tokio::spawn(migration::run(ctx, Some(self.namespace.clone()))));
    }

    /// Stops the controllers; their replication runs stop with the context.
    async fn stop_operator(&mut self) {
        for controller in self.controllers.drain(..) {
            controller.abort();
            let _ = controller.await;
        }
    }

    fn apply(&self, manifest: &str) {
        self.control_plane.apply_manifest(&self.namespace, manifest).unwrap();
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        self.control_plane.run_kubectl(&all).unwrap()
    }

    fn migrations(&self) -> Api<Migration> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Polls the Migration until `done` holds; panics with its status otherwise.
    async fn wait(&self, name: &str, what: &str, done: impl Fn(&Migration) -> bool) -> Migration {
        for _ in 0..1200 {
            if let Some(migration) = self.migrations().get_opt(name).await.unwrap()
                && done(&migration)
            {
                return migration;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = self.migrations().get(name).await.unwrap().status;
        panic!("Migration {name} never reached {what}: {status:#?}");
    }

    /// `eden_replication_lag_ms` of Migration `name`, if the operator exports one.
    fn lag_metric(&self, name: &str) -> Option<i64> {
        let series = format!("eden_replication_lag_ms{{namespace=\"{}\",migration=\"{name}\"}} ", self.namespace);
        let rendered = self.metrics.render();
        rendered.lines().find_map(|line| line.strip_prefix(series.as_str())).map(|value| value.parse().unwrap())
    }

    async fn wait_phase(&self, name: &str, phase: Phase) -> Migration {
        self.wait(name, &format!("{phase:?}"), |m| phase_of(m) == Some(phase)).await
    }

    async fn payload(&self, name: &str) -> EdenConfig {
        let config_map = self.config_maps().get(&format!("eden-{name}")).await.unwrap();
        EdenConfig::from_yaml(&config_map.data.unwrap()["eden.yaml"]).unwrap()
    }

    async fn wait_payload(&self, name: &str, done: impl Fn(&EdenConfig) -> bool) -> EdenConfig {
        for _ in 0..300 {
            if let Some(config_map) = self.config_maps().get_opt(&format!("eden-{name}")).await.unwrap() {
                let payload = EdenConfig::from_yaml(&config_map.data.unwrap()["eden.yaml"]).unwrap();
                if done(&payload) {
                    return payload;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ConfigMap eden-{name} never reached the expected payload: {:?}", self.payload(name).await);
    }
}

fn phase_of(migration: &Migration) -> Option<Phase> {
    migration.status.as_ref().and_then(|s| s.phase)
}

fn condition<'a>(
    migration: &'a Migration,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let status = migration.status.as_ref().expect("status");
    status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"))
}

fn endpoints(source: &RedisServer, target: &RedisServer) -> String {
    format!(
        "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: source}}\nspec: {{uri: \"{}\"}}\n---\n\
         apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: target}}\nspec: {{uri: \"{}\"}}\n",
        source.url(),
        target.url()
    )
}

fn migration(name: &str, data: &str, read_percentage: u32, policy: &str) -> String {
    format!(
        "apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {{name: {name}}}
spec:
  source: {{endpointRef: {{name: source}}}}
  target: {{endpointRef: {{name: target}}}}
  strategy:
    readPercentage: {read_percentage}
    writeMode: {{mode: dualWrite, policy: {policy}}}
  data: {{type: {data}}}
"
    )
}

async fn connect(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    // DEBUG POPULATE of many keys takes longer than the client's default response timeout.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let client = redis::Client::open(server.url()).unwrap();
    client.get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

/// Polls `server` until `key` holds `value`.
async fn wait_value(server: &mut redis::aio::MultiplexedConnection, key: &str, value: Option<&str>) {
    for _ in 0..100 {
        let found: Option<String> = server.get(key).await.unwrap();
        if found.as_deref() == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{key} never became {value:?}");
}

#[tokio::test]
async fn a_migration_syncs_pushes_its_strategy_cuts_over_rolls_back_and_cleans_up() {
    let harness = Harness::start("migration").await;
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let (mut on_source, mut on_target) = (connect(&source).await, connect(&target).await);
    for i in 0..2_000 {
        let _: () = on_source.set(format!("user:{i}"), format!("profile {i}")).await.unwrap();
    }
    let _: () = on_source.hset("cart:7", "apples", 3).await.unwrap();

    harness.apply(&endpoints(&source, &target));
    let shop = migration("shop", "sync", 10, "oldAuthoritative");
    harness.apply(&shop);
    let ready = harness.wait_phase("shop", Phase::Ready).await;
    let status = ready.status.as_ref().unwrap();
    assert!(status.ready_for_cutover);
    let verification = status.last_verification.as_ref().expect("verified before Ready");
    assert_eq!((verification.checked, verification.missing, verification.mismatched), (2_001, 0, 0));
    assert_eq!(status.progress.as_ref().unwrap().keys_copied, 2_001);
    let copied: Option<String> = on_target.get("user:1999").await.unwrap();
    assert_eq!(copied.as_deref(), Some("profile 1999"));

    // Live writes keep flowing to the target through replication.
    let _: () = on_source.set("user:new", "arrived after the backfill").await.unwrap();
    wait_value(&mut on_target, "user:new", Some("arrived after the backfill")).await;

    // The strategy reaches the sidecars' ConfigMap; a sidecar's ack is counted.
    let first = harness.wait_payload("shop", |p| p.read_percentage == 10).await;
    let (applier, current) = Applier::new();
    let sidecar_config = tokio::spawn(applier.clone().watch_config_map(harness.config_maps(), "eden-shop".into()));
    let leases = Api::namespaced(harness.client.clone(), &harness.namespace);
    let sidecar_metrics = Arc::new(ProxyMetrics::default());
    let lease = tokio::spawn(
        LeaseReporter::new(leases, "app-0".into(), "shop".into(), current, applier.status())
            .with_mirror_losses(sidecar_metrics.clone())
            .run(),
    );
    harness.apply(&migration("shop", "sync", 25, "oldAuthoritative"));
    let second = harness.wait_payload("shop", |p| p.read_percentage == 25).await;
    assert_eq!(second.generation, first.generation + 1, "a strategy change bumps the generation once");
    harness
        .wait("shop", "the sidecar's ack", |m| {
            m.status
                .as_ref()
                .and_then(|s| s.sidecars.as_ref())
                .is_some_and(|s| s.summary == "1/1" && s.configured_generation == second.generation as i64)
        })
        .await;

    for expected in [
        "Phase:",
        "Ready",
        "ReadyForCutover",
        "InSync",
        "PhaseChanged",
        "Syncing → Ready",
        "StrategyPushed",
        "Verified",
    ] {
        harness.wait_described("shop", expected).await;
    }
    // GitOps: the operator never writes the spec, so the applied manifest shows no drift.
    assert_no_drift(&harness, &migration("shop", "sync", 25, "oldAuthoritative"));

    // Cutover: writes pause in the sidecars, replication drains and stops, writes flip to the
    // target and are mirrored back to the source.
    harness.apply(&migration("shop", "sync", 25, "newAuthoritative"));
    let cut_over = harness.wait_phase("shop", Phase::CutOver).await;
    assert_eq!(condition(&cut_over, "Replicating").reason, "NotRunning");
    let flipped = harness.payload("shop").await;
    assert_eq!((flipped.write_policy, flipped.mirror_writes), (WritePolicy::NewAuthoritative, true));
    let _: () = on_source.set("after-cutover", "not replicated").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaked: Option<String> = on_target.get("after-cutover").await.unwrap();
    assert_eq!(leaked, None, "replication stopped at the flip");

    // Two writes the sidecar mirrored to the source never landed (its Lease reports them; the
    // sidecar's own tests make a source refuse them for real): a rollback would lose them, so
    // it is held until the user accepts exactly that.
    sidecar_metrics.mirror(Side::Source, MirrorOutcome::Failed, 1);
    sidecar_metrics.mirror(Side::Source, MirrorOutcome::Dropped, 1);
    let leases: Api<Lease> = Api::namespaced(harness.client.clone(), &harness.namespace);
    for _ in 0..100 {
        let lease = leases.get("eden-sidecar-app-0").await.unwrap();
        if lease.metadata.annotations.unwrap_or_default().get(ANNOTATION_LOST_SOURCE_WRITES).map(String::as_str)
            == Some("2")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    harness.apply(&migration("shop", "sync", 25, "oldAuthoritative"));
    let held = harness
        .wait("shop", "RollbackNotLossless", |m| {
            m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason.contains("RollbackNotLossless")))
        })
        .await;
    assert_eq!(phase_of(&held), Some(Phase::CutOver));
    assert!(condition(&held, "Held").message.contains("2 writes mirrored to the source never landed"));
    harness.kubectl(&["annotate", "migration", "shop", "eden.io/accept-lost-writes=1"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        phase_of(&harness.migrations().get("shop").await.unwrap()),
        Some(Phase::CutOver),
        "1 of 2 is not enough"
    );

    // Rollback: the source is authoritative again once the sidecar acknowledged.
    harness.kubectl(&["annotate", "--overwrite", "migration", "shop", "eden.io/accept-lost-writes=2"]);
    harness.wait_phase("shop", Phase::RolledBack).await;
    let rolled_back = harness.payload("shop").await;
    assert_eq!(rolled_back.write_policy, WritePolicy::OldAuthoritative);

    // Deleting the Migration removes the ConfigMap and the sidecars' Leases (this one would
    // have outlived its sidecar for the losses it reports) and stops replication; data stays.
    lease.abort();
    harness.migrations().delete("shop", &DeleteParams::default()).await.unwrap();
    harness.wait_gone("shop").await;
    assert!(harness.config_maps().get_opt("eden-shop").await.unwrap().is_none());
    assert!(leases.get_opt("eden-sidecar-app-0").await.unwrap().is_none(), "sidecar Leases go with the Migration");
    let kept: Option<String> = on_target.get("user:0").await.unwrap();
    assert_eq!(kept.as_deref(), Some("profile 0"), "cleanup never touches user data");
    sidecar_config.abort();
}

fn assert_no_drift(harness: &Harness, manifest: &str) {
    use std::io::Write;
    let mut diff = harness
        .control_plane
        .kubectl()
        .args(["-n", &harness.namespace, "diff", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    diff.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
    let output = diff.wait_with_output().unwrap();
    assert!(
        output.status.success() && output.stdout.is_empty(),
        "kubectl diff shows drift:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Harness {
    /// Polls `kubectl describe` until it shows `text` (Events are recorded after the status).
    async fn wait_described(&self, name: &str, text: &str) {
        let mut describe = String::new();
        for _ in 0..100 {
            describe = self.kubectl(&["describe", "migration", name]);
            if describe.contains(text) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("kubectl describe migration {name} never showed {text:?}:\n{describe}");
    }

    async fn wait_gone(&self, name: &str) {
        for _ in 0..100 {
            if self.migrations().get_opt(name).await.unwrap().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("Migration {name} was never deleted: the finalizer did not finish");
    }
}

#[tokio::test]
async fn requests_the_data_cannot_honour_are_held_with_the_reason() {
    let harness = Harness::start("migration-held").await;
    // A missing Endpoint: the migration waits in Pending and says which one.
    harness.apply(&migration("orphan", "scan", 0, "oldAuthoritative"));
    let pending = harness
        .wait("orphan", "a Held condition", |m| {
            m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Held" && c.status == "True"))
        })
        .await;
    assert_eq!(phase_of(&pending), Some(Phase::Pending));
    let held = condition(&pending, "Held");
    assert_eq!(held.reason, "EndpointNotFound,EndpointsNotReady");
    assert!(held.message.contains("the source Endpoint \"source\" does not exist"), "{}", held.message);
    harness.wait_described("orphan", "does not exist in namespace").await;

    // Cutover requested while the copy is still running: held, writes stay on the source.
    let source = RedisServer::with_config(RedisConfig::default().directive("enable-debug-command", "yes")).unwrap();
    let target = RedisServer::start().unwrap();
    let _: () =
        redis::cmd("DEBUG").arg("POPULATE").arg(200_000).query_async(&mut connect(&source).await).await.unwrap();
    harness.apply(&endpoints(&source, &target));
    harness.apply(&migration("early", "scan", 0, "newAuthoritative"));
    let syncing = harness
        .wait("early", "CutoverHeld while syncing", |m| {
            phase_of(m) == Some(Phase::Syncing)
                && m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason.contains("CutoverHeld")))
        })
        .await;
    assert!(condition(&syncing, "Held").message.contains("the target is not in sync yet"));
    assert_eq!(harness.payload("early").await.write_policy, WritePolicy::OldAuthoritative);
}

#[tokio::test]
async fn a_cutover_waits_while_replication_lags_behind_the_guard() {
    let harness = Harness::start("migration-lag").await;
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let mut on_source = connect(&source).await;
    let _: () = on_source.set("balance", 100).await.unwrap();
    harness.apply(&endpoints(&source, &target));
    harness.apply(&migration("lagging", "sync", 0, "oldAuthoritative"));
    harness.wait_phase("lagging", Phase::Ready).await;

    // The target stalls: writes reach Eden but cannot be applied, so the lag grows.
    target.freeze().unwrap();
    let _: () = on_source.incr("balance", 1).await.unwrap();
    harness.apply(&migration("lagging", "sync", 0, "newAuthoritative"));
    let held = harness
        .wait("lagging", "LagAboveGuard", |m| {
            m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "LagAboveGuard"))
        })
        .await;
    assert!(condition(&held, "ReadyForCutover").message.contains("above maxLagMillis 100"), "{held:?}");
    assert!(harness.lag_metric("lagging").is_some_and(|lag| lag > 100), "{}", harness.metrics.render());
    assert_ne!(phase_of(&held), Some(Phase::CutOver));
    assert_eq!(harness.payload("lagging").await.write_policy, WritePolicy::OldAuthoritative);

    // Once the target catches up the held cutover goes ahead, with nothing lost.
    target.thaw().unwrap();
    harness.wait_phase("lagging", Phase::CutOver).await;
    let balance: i64 = connect(&target).await.get("balance").await.unwrap();
    assert_eq!(balance, 101);
    assert_eq!(harness.lag_metric("lagging"), None, "replication stopped at the flip");
}

/// `replace: skip` keeps the target's value of a key both servers have; the verification the
/// cutover waits for counts that key apart instead of failing on it.
#[tokio::test]
async fn a_skip_migration_passes_verification_with_the_keys_it_kept_counted_apart() {
    let harness = Harness::start("migration-skip").await;
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let mut on_source = connect(&source).await;
    let mut on_target = connect(&target).await;
    let _: () =
        redis::pipe().set("greeting", "the source's").set("only-source", 1).query_async(&mut on_source).await.unwrap();
    let _: () = on_target.set("greeting", "the target's own").await.unwrap();
    harness.apply(&endpoints(&source, &target));
    harness.apply(&migration("keep", "sync, replace: skip", 0, "oldAuthoritative"));

    let ready = harness.wait_phase("keep", Phase::Ready).await;
    let verification = ready.status.unwrap().last_verification.unwrap();
    assert_eq!((verification.missing, verification.extra, verification.mismatched), (0, 0, 0));
    assert_eq!(verification.kept, 1);
    let kept: String = on_target.get("greeting").await.unwrap();
    assert_eq!(kept, "the target's own");
    harness.wait_described("keep", "Kept:").await;
}

#[tokio::test]
async fn a_restarted_operator_continues_the_replication_stream_without_a_new_copy() {
    let mut harness = Harness::start("migration-restart").await;
    let source = RedisServer::with_config(RedisConfig::default().directive("enable-debug-command", "yes")).unwrap();
    let target = RedisServer::start().unwrap();
    let (mut on_source, mut on_target) = (connect(&source).await, connect(&target).await);
    let _: () = redis::cmd("DEBUG").arg("POPULATE").arg(50_000).query_async(&mut on_source).await.unwrap();
    harness.apply(&endpoints(&source, &target));
    harness.apply(&migration("big", "sync", 0, "oldAuthoritative"));
    harness.wait_phase("big", Phase::Ready).await;

    harness.stop_operator().await;
    let _: () = on_source.set("written-while-the-operator-was-down", "kept").await.unwrap();
    harness.start_operator();
    wait_value(&mut on_target, "written-while-the-operator-was-down", Some("kept")).await;
    harness.wait_described("big", "resumed from its checkpoint").await;
    // The source served the new leader from its backlog: a partial resync, not a second copy.
    let stats: String = redis::cmd("INFO").arg("stats").query_async(&mut on_source).await.unwrap();
    let stat =
        |name: &str| stats.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).map(str::trim).map(String::from);
    assert_eq!(stat("sync_partial_ok").as_deref(), Some("1"), "{stats}");
    assert_eq!(stat("sync_full").as_deref(), Some("1"), "{stats}");
    let ready = harness.wait_phase("big", Phase::Ready).await;
    assert!(ready.status.unwrap().ready_for_cutover);
}

/// A Migration with `spec.gateway`, against Endpoints that need not answer: the gateway depends
/// on their addresses and Secrets, not on the data.
fn gateway_migration(name: &str, gateway: &str) -> String {
    format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: target-credentials}}
stringData: {{password: s3cret}}
---
apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {{name: source}}
spec: {{uri: \"redis://redis-source.example:6379\"}}
---
apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {{name: target}}
spec: {{uri: \"redis://redis-target.example:6379\", credentialsSecretRef: {{name: target-credentials}}}}
---
apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {{name: {name}}}
spec:
  source: {{endpointRef: {{name: source}}}}
  target: {{endpointRef: {{name: target}}}}
  data: {{type: none}}
{gateway}"
    )
}

impl Harness {
    async fn wait_objects<K>(&self, names: &[&str], present: bool)
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.namespace);
        for _ in 0..100 {
            let mut found = Vec::new();
            for name in names {
                found.push(api.get_opt(name).await.unwrap().is_some());
            }
            if found.iter().all(|f| *f == present) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} {names:?} never became {}", K::kind(&()), if present { "present" } else { "absent" });
    }
}

#[tokio::test]
async fn a_gateway_follows_its_spec_and_goes_with_its_migration() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;

    let harness = Harness::start("gateway").await;
    harness.apply(&gateway_migration("shop", "  gateway: {replicas: 3}\n"));
    harness.wait_objects::<Deployment>(&["eden-shop-gateway"], true).await;
    harness.wait_objects::<Service>(&["eden-shop"], true).await;

    let deployments: Api<Deployment> = Api::namespaced(harness.client.clone(), &harness.namespace);
    let deployment = deployments.get("eden-shop-gateway").await.unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(3));
    let pod = spec.template.spec.unwrap();
    let args = pod.containers[0].args.clone().unwrap().join(" ");
    assert!(args.contains("--source redis://redis-source.example:6379"), "{args}");
    assert!(args.contains(&format!("--configmap eden-shop --namespace {}", harness.namespace)), "{args}");
    assert_eq!(pod.containers[0].image.as_deref(), Some(DEFAULT_IMAGE));
    let secret = pod.volumes.unwrap()[0].secret.clone().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("target-credentials"));
    let services: Api<Service> = Api::namespaced(harness.client.clone(), &harness.namespace);
    let service = services.get("eden-shop").await.unwrap().spec.unwrap();
    assert_eq!(service.ports.unwrap()[0].port, 6379);
    assert_eq!(service.selector.unwrap().get("app.kubernetes.io/component").map(String::as_str), Some("gateway"));
    let status =
        harness.wait("shop", "the gateway in status", |m| m.status.as_ref().is_some_and(|s| s.gateway.is_some())).await;
    assert_eq!(status.status.unwrap().gateway.unwrap().service, "eden-shop");
    harness.wait_described("shop", "GatewayCreated").await;
    harness.wait_described("shop", "Deployment eden-shop-gateway (3 replicas) serving on Service eden-shop:6379").await;

    // A renamed Service replaces the old one; the Deployment stays.
    harness.apply(&gateway_migration("shop", "  gateway: {replicas: 3, serviceName: redis, port: 6380}\n"));
    harness.wait_objects::<Service>(&["redis"], true).await;
    harness.wait_objects::<Service>(&["eden-shop"], false).await;
    assert_eq!(services.get("redis").await.unwrap().spec.unwrap().ports.unwrap()[0].port, 6380);

    // Removing spec.gateway removes both.
    harness.apply(&gateway_migration("shop", ""));
    harness.wait_objects::<Deployment>(&["eden-shop-gateway"], false).await;
    harness.wait_objects::<Service>(&["redis"], false).await;
    harness.wait("shop", "no gateway in status", |m| m.status.as_ref().is_some_and(|s| s.gateway.is_none())).await;
    harness.wait_described("shop", "GatewayRemoved").await;

    // The finalizer deletes the gateway with the Migration (no garbage collector here).
    harness.apply(&gateway_migration("shop", "  gateway: {}\n"));
    harness.wait_objects::<Service>(&["eden-shop"], true).await;
    harness.migrations().delete("shop", &DeleteParams::default()).await.unwrap();
    harness.wait_gone("shop").await;
    harness.wait_objects::<Deployment>(&["eden-shop-gateway"], false).await;
    harness.wait_objects::<Service>(&["eden-shop"], false).await;
}

/// An `eden-sidecar` process with the command line the webhook injects, on free loopback
/// ports, reaching the API server through `kubeconfig`. Short fencing bounds keep the test
/// quick; the argument does not depend on their size.
struct SidecarProcess {
    child: std::process::Child,
    port: u16,
}

impl SidecarProcess {
    fn spawn(harness: &Harness, pod: &str, source: &RedisServer, kubeconfig: &std::path::Path) -> SidecarProcess {
        let (port, admin) = (eden_e2e::free_port().unwrap(), eden_e2e::free_port().unwrap());
        let log = std::fs::File::create(std::env::temp_dir().join(format!("{}-{pod}.log", harness.namespace))).unwrap();
        let child = std::process::Command::new(eden_e2e::workspace_binary("eden-sidecar").unwrap())
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--source", &source.url(), "--configmap", "eden-shop", "--namespace", &harness.namespace])
            .args(["--pod-name", pod, "--confirm-every-ms", "200", "--fence-after-ms", "2000"])
            .args(["--max-write-pause-ms", "3000"])
            .env("KUBECONFIG", kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        SidecarProcess { child, port }
    }

    /// A client connection, once the sidecar serves (after it applied a strategy).
    async fn connect(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).unwrap();
        for _ in 0..300 {
            if let Ok(connection) = client.get_multiplexed_async_connection_with_config(&config).await {
                return connection;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("sidecar on port {} never served", self.port);
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one writer's clients were told.
#[derive(Debug, Default)]
struct Acknowledged {
    /// INCRs answered with a count.
    incr: i64,
    /// RPUSHed values, each answered with a length.
    pushed: Vec<i64>,
    /// Writes answered with an error (refused by a fenced sidecar).
    refused: u64,
    /// The longest one write waited for its reply.
    longest: Duration,
}

/// Writes `INCR counter:<name>` and `RPUSH seq:<name> n` through `sidecar` until `stop`,
/// recording every acknowledgement.
async fn write_until(
    mut sidecar: redis::aio::MultiplexedConnection,
    name: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Acknowledged {
    let mut acknowledged = Acknowledged::default();
    for n in 0.. {
        if *stop.borrow_and_update() {
            break;
        }
        let started = std::time::Instant::now();
        let incr: redis::RedisResult<i64> = sidecar.incr(format!("counter:{name}"), 1).await;
        let push: redis::RedisResult<i64> = sidecar.rpush(format!("seq:{name}"), n).await;
        acknowledged.longest = acknowledged.longest.max(started.elapsed());
        for outcome in [incr.as_ref().map(|_| ()), push.as_ref().map(|_| ())] {
            if let Err(err) = outcome {
                assert!(!err.is_io_error() && !err.is_timeout(), "{name}: the sidecar failed the client: {err}");
                assert!(err.to_string().contains("eden:"), "{name}: an error that is not a refusal: {err}");
                acknowledged.refused += 1;
            }
        }
        acknowledged.incr += i64::from(incr.is_ok());
        if push.is_ok() {
            acknowledged.pushed.push(n);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acknowledged
}

#[tokio::test]
async fn a_sidecar_cut_off_from_the_api_server_during_a_cutover_loses_no_acknowledged_write() {
    let harness = Harness::start("fencing").await;
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    harness.apply(&endpoints(&source, &target));
    harness.apply(&migration("shop", "sync", 0, "oldAuthoritative"));
    harness.wait_phase("shop", Phase::Ready).await;

    // Two sidecars: one talks to the API server directly, the other through a relay that is
    // cut during the cutover while its path to Redis stays up.
    let relay = eden_e2e::Relay::start(harness.control_plane.api_addr().unwrap()).await.unwrap();
    let relayed = std::env::temp_dir().join(format!("{}-relayed.kubeconfig", harness.namespace));
    harness.control_plane.kubeconfig_via(relay.addr(), &relayed).unwrap();
    let direct = SidecarProcess::spawn(&harness, "direct", &source, harness.control_plane.kubeconfig());
    let cut_off = SidecarProcess::spawn(&harness, "cut-off", &source, &relayed);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let writers = [
        tokio::spawn(write_until(direct.connect().await, "direct", stopped.clone())),
        tokio::spawn(write_until(cut_off.connect().await, "cut-off", stopped)),
    ];
    harness
        .wait("shop", "both sidecars acknowledged", |m| {
            m.status.as_ref().and_then(|s| s.sidecars.as_ref()).is_some_and(|s| s.acknowledged == 2)
        })
        .await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut();
    harness.apply(&migration("shop", "sync", 0, "newAuthoritative"));
    let cut_over = harness.wait_phase("shop", Phase::CutOver).await;
    let sidecars = cut_over.status.unwrap().sidecars.unwrap();
    assert_eq!((sidecars.acknowledged, sidecars.fenced), (1, 1), "{sidecars:?}");
    // Cut off for longer than its pause bound (3 s): its held writes are refused.
    tokio::time::sleep(Duration::from_secs(4)).await;
    relay.heal();
    // Back in touch, the fenced sidecar applies the flip and writes to the target.
    harness
        .wait("shop", "the fenced sidecar acknowledged the flip", |m| {
            m.status.as_ref().and_then(|s| s.sidecars.as_ref()).is_some_and(|s| s.acknowledged == 2)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.send_replace(true);

    // Every acknowledged write is on the target, the authoritative side, exactly once.
    let mut target = connect(&target).await;
    for (writer, name) in writers.into_iter().zip(["direct", "cut-off"]) {
        let acknowledged = writer.await.unwrap();
        eprintln!(
            "{name}: {} INCRs and {} RPUSHes acknowledged, {} refused, longest wait {:?}",
            acknowledged.incr,
            acknowledged.pushed.len(),
            acknowledged.refused,
            acknowledged.longest
        );
        let counter: i64 = target.get(format!("counter:{name}")).await.unwrap();
        assert_eq!(counter, acknowledged.incr, "{name}: INCRs acknowledged vs applied on the target");
        let sequence: Vec<i64> = target.lrange(format!("seq:{name}"), 0, -1).await.unwrap();
        assert_eq!(sequence, acknowledged.pushed, "{name}: RPUSHes acknowledged vs on the target, in order");
        match name {
            "cut-off" => assert!(acknowledged.refused > 0, "the cut-off sidecar was fenced: it refused writes"),
            _ => {
                assert_eq!(acknowledged.refused, 0, "a sidecar in touch only ever held writes");
                assert!(acknowledged.longest < Duration::from_secs(3), "held past the pause bound");
            }
        }
    }
}
