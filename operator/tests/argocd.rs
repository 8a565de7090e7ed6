//! The Argo CD health checks in `examples/argocd/argocd-cm.yaml`, run as Argo CD runs them
//! (`e2e/argocd-health`: gopher-lua, Argo CD's libraries and object decoding) on the Endpoints
//! and Migrations the operator keeps on a real API server.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{ControlPlane, RedisServer};
use eden_operator::crd::{Endpoint, Migration, Phase};
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_operator::{context::Context, endpoint, metrics::Metrics, migration};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde::de::DeserializeOwned;
use serde_json::Value;

const HEALTH_CHECKS: &str = include_str!("../../examples/argocd/argocd-cm.yaml");
const APPLICATION: &str = include_str!("../../examples/argocd/application.yaml");

/// What Argo CD would show for `object`: (status, message).
fn health(kind: &str, object: &impl serde::Serialize) -> (String, String) {
    let config_map: ConfigMap = serde_yaml::from_str(HEALTH_CHECKS).unwrap();
    let script = &config_map.data.unwrap()[&format!("resource.customizations.health.eden.io_{kind}")];
    let script_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script_file.path(), script).unwrap();
    let mut child = Command::new(eden_e2e::argocd_health().unwrap())
        .arg(script_file.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&serde_json::to_vec(object).unwrap()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the {kind} health script: {}", String::from_utf8_lossy(&output.stderr));
    let health: Value = serde_json::from_slice(&output.stdout).unwrap();
    (health["status"].as_str().unwrap().into(), health["message"].as_str().unwrap().into())
}

fn manifest(yaml: &str) -> Value {
    serde_yaml::from_str(yaml).unwrap()
}

/// Polls `api` for `name` until `done` holds.
async fn wait<K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug>(
    api: &Api<K>,
    name: &str,
    done: impl Fn(&K) -> bool,
) -> K {
    for _ in 0..600 {
        if let Some(object) = api.get_opt(name).await.unwrap()
            && done(&object)
        {
            return object;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name}: not there within 60 s: {:?}", api.get_opt(name).await);
}

#[tokio::test]
async fn argo_cd_shows_where_each_migration_and_endpoint_stands() {
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let namespace = control_plane.namespace("argocd").await.unwrap();
    let client = control_plane.client().await.unwrap();
    let ctx = Context::new(client.clone(), Arc::new(Metrics::default()), None, DEFAULT_IMAGE.into());
    tokio::spawn(endpoint::run(ctx.clone()));
    tokio::spawn(migration::run(ctx, Some(namespace.clone())));
    let endpoints: Api<Endpoint> = Api::namespaced(client.clone(), &namespace);
    let migrations: Api<Migration> = Api::namespaced(client, &namespace);

    // Endpoints: Progressing until probed, then Healthy, or Degraded with the reason.
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    let unreachable = format!("redis://127.0.0.1:{}", eden_e2e::free_port().unwrap());
    control_plane
        .apply_manifest(
            &namespace,
            &format!(
                "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: source}}\nspec: {{uri: '{}'}}\n---\n\
                 apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: target}}\nspec: {{uri: '{}'}}\n---\n\
                 apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: gone}}\nspec: {{uri: '{unreachable}'}}\n",
                source.url(),
                target.url()
            ),
        )
        .unwrap();
    let probed = |e: &Endpoint| e.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Ready"));
    assert_eq!(health("Endpoint", &wait(&endpoints, "source", probed).await).0, "Healthy");
    let (status, message) = health("Endpoint", &wait(&endpoints, "gone", probed).await);
    assert_eq!(status, "Degraded");
    assert!(message.contains("127.0.0.1"), "{message}");
    assert_eq!(health("Endpoint", &manifest("metadata: {name: new}\nspec: {uri: 'redis://x:6379'}")).0, "Progressing");

    // A Migration at rest is Healthy; paused, Suspended.
    let example = include_str!("../../examples/migration.yaml");
    control_plane.apply_manifest(&namespace, example).unwrap();
    let at = |phase: Phase| move |m: &Migration| m.status.as_ref().and_then(|s| s.phase) == Some(phase);
    let ready = wait(&migrations, "shop-cache", at(Phase::Ready)).await;
    assert_eq!(health("Migration", &ready).0, "Healthy", "{:?}", health("Migration", &ready));
    let patch = Patch::Merge(serde_json::json!({"spec": {"paused": true}}));
    migrations.patch("shop-cache", &PatchParams::default(), &patch).await.unwrap();
    let paused = wait(&migrations, "shop-cache", at(Phase::Paused)).await;
    assert_eq!(health("Migration", &paused).0, "Suspended");

    // One whose Endpoint does not exist is held in Pending: Progressing, saying why.
    let orphan = example.replace("name: shop-cache", "name: orphan").replace("name: target", "name: missing");
    control_plane.apply_manifest(&namespace, &orphan).unwrap();
    let held = |m: &Migration| {
        m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Held" && c.status == "True"))
    };
    let (status, message) = health("Migration", &wait(&migrations, "orphan", held).await);
    assert_eq!(status, "Progressing");
    assert!(message.contains("\"missing\" does not exist"), "{message}");

    // A spec the operator has not looked at yet says so, whatever the phase; a failed one is
    // Degraded.
    let mut edited = serde_json::to_value(&ready).unwrap();
    edited["metadata"]["generation"] = (ready.metadata.generation.unwrap() + 1).into();
    assert_eq!(health("Migration", &edited), ("Progressing".into(), "waiting for the operator".into()));
    let mut failed = serde_json::to_value(&ready).unwrap();
    failed["status"]["phase"] = "Failed".into();
    assert_eq!(health("Migration", &failed).0, "Degraded");
    assert_eq!(health("Migration", &manifest(example)).0, "Progressing", "no status yet");

    // The Application is well-formed and never prunes a Migration.
    let application = manifest(APPLICATION);
    assert_eq!(application["kind"], "Application");
    assert_eq!(application["spec"]["syncPolicy"]["automated"]["prune"], false);
}
