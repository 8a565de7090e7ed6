//! The Migration controller against a real API server and real redis-servers: a migration
//! applied with kubectl walks Pending → Syncing → Ready with the data copied and verified,
//! pushes its strategy to the sidecars and counts their acks, cuts over and rolls back, says
//! why when it holds a request, survives an operator restart, and cleans up when deleted.

use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{RedisConfig, RedisServer, TestPki};
use eden_operator::crd::Phase;
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_sidecar::config::{Applier, WritePolicy};
use eden_sidecar::lease::{ANNOTATION_LOST_SOURCE_WRITES, LeaseReporter};
use eden_sidecar::metrics::{MirrorOutcome, ProxyMetrics};
use eden_sidecar::route::Side;
use eden_sidecar::upstream::{TlsSettings, Upstream};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use redis::AsyncCommands;

mod support;

use support::*;

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

/// An Endpoint password holding `@ : / % # + = ?`, spaces and non-ASCII (an Azure key's `+`,
/// `/` and `=` among them), given in a Secret, reaches both servers for the probe and for
/// replication in both modes, which copy and verify; the planted password is nowhere in what
/// the operator writes (the Migration's and Endpoints' status, their Events, the ConfigMap, the
/// metrics), in what it logs, nor in the command line it gives the proxy or what a proxy started
/// with that command line logs and shows as its arguments (`/proc/<pid>/cmdline`). The gateway's
/// command line is the injected sidecar's: both come from `proxy::container`.
#[tokio::test]
async fn a_password_of_any_characters_in_a_secret_migrates_in_both_modes_and_is_shown_nowhere() {
    const PASSWORD: &str = "p@ss:w/rd %#+=?ü✓ Zm9v+/==";
    let harness = Harness::start("password").await;
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let (mut on_source, mut on_target) = (connect(&source).await, connect(&target).await);
    for i in 0..500 {
        let _: () = on_source.set(format!("user:{i}"), i).await.unwrap();
    }
    for con in [&mut on_source, &mut on_target] {
        let _: () = redis::cmd("CONFIG").arg("SET").arg("requirepass").arg(PASSWORD).query_async(con).await.unwrap();
    }
    let password = serde_json::to_string(PASSWORD).unwrap(); // a YAML double-quoted scalar
    let endpoint = |name: &str, server: &RedisServer| {
        format!(
            "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: {name}}}\n\
             spec: {{uri: \"{}\", credentialsSecretRef: {{name: redis-password}}}}\n",
            server.url()
        )
    };
    harness.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: redis-password}}\nstringData: {{password: {password}}}\n---\n{}---\n{}",
        endpoint("source", &source),
        endpoint("target", &target)
    ));
    for mode in ["sync", "scan"] {
        let name = format!("{mode}-shop");
        harness.apply(&format!("{}  gateway: {{}}\n", migration(&name, mode, 0, "oldAuthoritative")));
        let ready = harness.wait_phase(&name, Phase::Ready).await;
        let verification = ready.status.as_ref().unwrap().last_verification.clone().expect("verified");
        assert_eq!((verification.checked, verification.missing, verification.mismatched), (500, 0, 0), "{mode}");
        harness.wait_described(&name, "Verified").await;
        let proxy = GatewayProcess::start(&harness, &name).await;

        let shown = [
            harness.kubectl(&["get", "migrations,endpoints.eden.io,configmaps,deployments", "-o", "yaml"]),
            harness.kubectl(&["describe", "migration", &name]),
            harness.kubectl(&["describe", "endpoints.eden.io"]),
            harness.kubectl(&["get", "events", "-o", "yaml"]),
            harness.metrics.render(),
            support::operator_logs(),
            proxy.cmdline(),
            proxy.log(),
        ];
        for (text, secret) in shown.iter().flat_map(|text| ["p@ss", "p%40ss", "Zm9v"].map(|secret| (text, secret))) {
            assert!(!text.contains(secret), "{mode}: {secret:?} shown in:\n{text}");
        }
        harness.migrations().delete(&name, &DeleteParams::default()).await.unwrap();
        harness.wait_gone(&name).await;
    }
}

/// A source and a target over TLS, each certificate from a CA of its own and valid only for a
/// name of its own, not the address the Endpoint dials: each Endpoint's `caSecretRef` and
/// `serverName` reach the probe, the replication engine in both modes and the verifier, so the
/// migration is verified and Ready under the default `requireVerification`.
#[tokio::test]
async fn tls_servers_with_their_own_ca_and_server_name_copy_verify_and_reach_ready() {
    let harness = Harness::start("tls").await;
    let scratch = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let names = ["source.redis.test", "target.redis.test"];
    let pkis = names.map(|name| TestPki::new(&[name]).unwrap());
    let [source, target] = [0, 1].map(|i| {
        let files = pkis[i].write_to(scratch[i].path()).unwrap();
        RedisServer::with_config(RedisConfig::default().tls(&files.ca, &files.cert, &files.key)).unwrap()
    });
    let mut manifests = String::new();
    for (i, (role, server)) in [("source", &source), ("target", &target)].into_iter().enumerate() {
        let ca = serde_json::to_string(&pkis[i].ca_pem).unwrap(); // a YAML double-quoted scalar
        manifests += &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {role}-ca}}\nstringData: {{ca.crt: {ca}}}\n---\n\
             apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: {role}}}\n\
             spec: {{uri: \"{}\", tls: {{caSecretRef: {{name: {role}-ca}}, serverName: {}}}}}\n---\n",
            server.url(),
            names[i]
        );
    }
    harness.apply(&manifests);
    let mut on_source = tls_connection(&source, &pkis[0], names[0]).await;
    for i in 0..300 {
        let _: () = on_source.set(format!("user:{i}"), i).await.unwrap();
    }
    for mode in ["sync", "scan"] {
        let name = format!("{mode}-tls");
        harness.apply(&migration(&name, mode, 0, "oldAuthoritative"));
        let ready = harness.wait_phase(&name, Phase::Ready).await;
        let verification = ready.status.as_ref().unwrap().last_verification.clone().expect("verified");
        assert_eq!((verification.checked, verification.missing, verification.mismatched), (300, 0, 0), "{mode}");
        harness.migrations().delete(&name, &DeleteParams::default()).await.unwrap();
        harness.wait_gone(&name).await;
    }
}

/// A connection to a TLS server through Eden's own connection layer, trusting `pki` for `name`.
async fn tls_connection(server: &RedisServer, pki: &TestPki, name: &str) -> redis::aio::MultiplexedConnection {
    let tls = TlsSettings {
        ca_pem: Some(pki.ca_pem.clone().into_bytes()),
        server_name: Some(name.into()),
        insecure_skip_verify: false,
    };
    let stream = Upstream::new(&server.url(), &tls, Duration::from_secs(5)).unwrap().connect().await.unwrap();
    let (info, config) = (redis::RedisConnectionInfo::default(), redis::AsyncConnectionConfig::new());
    let (connection, driver) = redis::aio::MultiplexedConnection::new_with_config(&info, stream, config).await.unwrap();
    tokio::spawn(driver);
    connection
}

/// An `eden-sidecar` process started with the command line the operator gave Migration `name`'s
/// gateway (its ports moved to free loopback ones, its pod name filled in), reaching the API
/// server as the test does, its log kept in a file; killed when dropped.
struct GatewayProcess {
    child: std::process::Child,
    log: tempfile::NamedTempFile,
}

impl GatewayProcess {
    async fn start(harness: &Harness, name: &str) -> GatewayProcess {
        use k8s_openapi::api::apps::v1::Deployment;
        let deployments: Api<Deployment> = Api::namespaced(harness.client.clone(), &harness.namespace);
        let deployment = deployments.get(&format!("eden-{name}-gateway")).await.unwrap();
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let mut args = pod.containers[0].args.clone().unwrap();
        for (flag, value) in args.clone().iter().zip(args.iter_mut().skip(1)) {
            match flag.as_str() {
                "--listen" | "--admin-listen" => *value = format!("127.0.0.1:{}", eden_e2e::free_port().unwrap()),
                "--pod-name" => *value = format!("{name}-gateway-0"),
                _ => {}
            }
        }
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new(eden_e2e::workspace_binary("sidecar", "eden-sidecar").unwrap())
            .args(&args)
            .env("KUBECONFIG", harness.control_plane.kubeconfig())
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let process = GatewayProcess { child, log };
        for _ in 0..300 {
            if process.log().contains("eden-sidecar ready") {
                return process;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the gateway's proxy never became ready; its log:\n{}", process.log());
    }

    /// Its arguments as the kernel shows them to anyone on the node.
    fn cmdline(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", self.child.id())).unwrap())
            .replace('\0', " ")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
