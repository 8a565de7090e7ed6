//! The Endpoint controller against a real API server and real redis-servers: a reachable
//! server becomes Ready with its version and role, credentials and TLS come from Secrets, and
//! every failure says why in the condition and in `kubectl describe`.

use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{ControlPlane, RedisConfig, RedisServer, TestPki};
use eden_operator::crd::Endpoint;
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_operator::{context::Context, endpoint, metrics::Metrics};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;

async fn start_controller(control_plane: &ControlPlane) {
    control_plane.install_eden_crds().unwrap();
    let ctx =
        Context::new(control_plane.client().await.unwrap(), Arc::new(Metrics::default()), None, DEFAULT_IMAGE.into());
    tokio::spawn(endpoint::run(ctx));
}

async fn create<K>(api: &Api<K>, manifest: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(&PostParams::default(), &serde_json::from_value(manifest).unwrap()).await.unwrap();
}

fn endpoint_manifest(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "eden.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": name}, "spec": spec})
}

/// Polls until the Endpoint's Ready condition has `status`, and returns the Endpoint.
async fn wait_ready_status(endpoints: &Api<Endpoint>, name: &str, status: &str) -> Endpoint {
    for _ in 0..150 {
        let endpoint = endpoints.get(name).await.unwrap();
        let ready = endpoint.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        if ready.is_some_and(|c| c.status == status) {
            return endpoint;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Endpoint {name} never reached Ready={status}: {:?}", endpoints.get(name).await.unwrap().status);
}

fn ready_message(endpoint: &Endpoint) -> String {
    endpoint.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap().message.clone()
}

#[tokio::test]
async fn endpoints_are_probed_with_secret_credentials_and_tls() {
    let control_plane = ControlPlane::shared();
    start_controller(control_plane).await;
    let namespace = control_plane.namespace("endpoint").await.unwrap();
    let client = control_plane.client().await.unwrap();
    let endpoints: Api<Endpoint> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);

    let protected = RedisServer::with_config(RedisConfig::default().directive("requirepass", "s3cret")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&["redis.test"]).unwrap(); // valid for its serverName only, not 127.0.0.1
    let files = pki.write_to(scratch.path()).unwrap();
    let tls = RedisServer::with_config(RedisConfig::default().tls(&files.ca, &files.cert, &files.key)).unwrap();

    create(&secrets, json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}})).await;
    create(&secrets, json!({"metadata": {"name": "wrong"}, "stringData": {"password": "guess"}})).await;
    create(&secrets, json!({"metadata": {"name": "ca"}, "stringData": {"ca.crt": pki.ca_pem}})).await;

    let protected_uri = format!("redis://127.0.0.1:{}", protected.port());
    create(
        &endpoints,
        endpoint_manifest("protected", json!({"uri": protected_uri, "credentialsSecretRef": {"name": "creds"}})),
    )
    .await;
    create(
        &endpoints,
        endpoint_manifest("wrong-password", json!({"uri": protected_uri, "credentialsSecretRef": {"name": "wrong"}})),
    )
    .await;
    create(
        &endpoints,
        endpoint_manifest(
            "tls",
            json!({"uri": tls.url(), "tls": {"caSecretRef": {"name": "ca"}, "serverName": "redis.test"}}),
        ),
    )
    .await;
    create(&endpoints, endpoint_manifest("untrusted", json!({"uri": tls.url()}))).await;
    let closed_port = eden_e2e::free_port().unwrap();
    create(&endpoints, endpoint_manifest("down", json!({"uri": format!("redis://127.0.0.1:{closed_port}")}))).await;
    create(
        &endpoints,
        endpoint_manifest("no-secret", json!({"uri": protected_uri, "credentialsSecretRef": {"name": "absent"}})),
    )
    .await;

    let ready = wait_ready_status(&endpoints, "protected", "True").await;
    let status = ready.status.unwrap();
    assert_eq!(status.server_version.as_deref(), Some(installed_redis_version().as_str()));
    assert_eq!(status.role.as_deref(), Some("master"));
    assert!(status.probe_latency_micros.is_some_and(|micros| micros > 0));
    assert_eq!(status.observed_generation, ready.metadata.generation);
    // Probed every PROBE_INTERVAL, not again on each of its own status writes (which once made
    // a loop: a probe and a write per API round trip, for as long as the operator ran).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = endpoints.get("protected").await.unwrap();
    assert_eq!(
        later.status.unwrap().last_probe_time,
        status.last_probe_time,
        "a Ready Endpoint was probed again within 2 s though its spec did not change"
    );

    wait_ready_status(&endpoints, "tls", "True").await;

    let wrong = wait_ready_status(&endpoints, "wrong-password", "False").await;
    assert!(ready_message(&wrong).contains("refused AUTH"), "{}", ready_message(&wrong));
    let untrusted = wait_ready_status(&endpoints, "untrusted", "False").await;
    assert!(ready_message(&untrusted).contains("TLS"), "{}", ready_message(&untrusted));
    let down = wait_ready_status(&endpoints, "down", "False").await;
    assert!(ready_message(&down).contains(&format!("127.0.0.1:{closed_port} unreachable")), "{}", ready_message(&down));
    let no_secret = wait_ready_status(&endpoints, "no-secret", "False").await;
    assert!(ready_message(&no_secret).contains("Secret absent"), "{}", ready_message(&no_secret));

    // What a user sees: the condition and the Event, in kubectl describe.
    let described = wait_for_text(control_plane, &namespace, "down", "ProbeFailed").await;
    assert!(described.contains("unreachable"), "{described}");
    let described = wait_for_text(control_plane, &namespace, "protected", "Ready").await;
    assert!(described.contains("answered in"), "the Ready Event says what the probe saw: {described}");
}

/// Events are written asynchronously; poll `kubectl describe` until `text` shows up in its
/// Events section.
async fn wait_for_text(control_plane: &ControlPlane, namespace: &str, name: &str, text: &str) -> String {
    let mut described = String::new();
    for _ in 0..50 {
        described = control_plane.run_kubectl(&["describe", "-n", namespace, "endpoints.eden.io", name]).unwrap();
        if described.split("Events:").nth(1).is_some_and(|events| events.contains(text)) {
            return described;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {text} Event for {name}: {described}");
}

/// The version `redis-server --version` reports, e.g. `7.0.15` from "Redis server v=7.0.15 ...".
fn installed_redis_version() -> String {
    let output = std::process::Command::new("redis-server").arg("--version").output().unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    text.split_whitespace().find_map(|word| word.strip_prefix("v=")).unwrap().to_string()
}
