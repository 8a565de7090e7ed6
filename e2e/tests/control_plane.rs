//! The local control plane is a real Kubernetes API server: CRDs install and validate, kubectl
//! and kube-rs see the same objects, and admission webhooks on loopback URLs are called.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use eden_e2e::{ControlPlane, TestPki};
use eden_operator::crd::Endpoint;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::pem::PemObject};

fn repo_path(relative: &str) -> PathBuf {
    eden_e2e::repo_root().join(relative)
}

#[tokio::test]
async fn endpoint_applied_with_kubectl_reads_back_through_kube_rs() {
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let namespace = control_plane.namespace("crd").await.unwrap();

    let example = repo_path("examples/endpoints.yaml");
    control_plane.run_kubectl(&["apply", "-n", &namespace, "-f", example.to_str().unwrap()]).unwrap();

    let endpoints: Api<Endpoint> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);
    let target = endpoints.get("target").await.unwrap();
    assert_eq!(target.spec.uri, "rediss://redis-target.shop.svc.cluster.local:6380/0");
    assert_eq!(target.spec.credentials_secret_ref.unwrap().name, "target-redis-credentials");
    let tls = target.spec.tls.unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("redis-target.shop.svc.cluster.local"));
    assert!(!tls.insecure_skip_verify, "the schema default is to verify");

    let listed = endpoints.list(&Default::default()).await.unwrap();
    let mut names: Vec<_> = listed.items.iter().filter_map(|e| e.metadata.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["source", "target"]);
}

#[tokio::test]
async fn the_schema_rejects_an_endpoint_that_is_not_a_redis_uri() {
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let namespace = control_plane.namespace("crd-invalid").await.unwrap();

    let manifest =
        "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {name: bad}\nspec: {uri: 'http://example.com'}\n";
    let refused = control_plane.apply_manifest(&namespace, manifest).expect_err("an http:// URI must be refused");
    let stderr = refused.to_string();
    assert!(stderr.contains("spec.uri"), "the error names the field: {stderr}");
}

/// A minimal HTTPS admission webhook: reports each reviewed object's name on `seen` and
/// answers with a JSON patch that adds an annotation, so the test can see both the call and
/// its effect.
async fn serve_webhook(listener: TcpListener, pki: TestPki, seen: mpsc::UnboundedSender<String>) {
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let (tcp, _) = listener.accept().await.unwrap();
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = service_fn(move |request: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let review: Value = serde_json::from_slice(&body).unwrap();
                    let request = &review["request"];
                    let _ = seen.send(request["name"].as_str().unwrap_or_default().to_string());
                    let patch = json!([{"op": "add", "path": "/metadata/annotations", "value": {"eden.io/webhook-saw": "true"}}]);
                    let response = json!({
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": {
                            "uid": request["uid"],
                            "allowed": true,
                            "patchType": "JSONPatch",
                            "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
                        }
                    });
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(response.to_string()))))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

#[tokio::test]
async fn a_mutating_webhook_on_a_loopback_url_is_called_for_new_pods() {
    let control_plane = ControlPlane::shared();
    let client = control_plane.client().await.unwrap();
    let namespace = control_plane.namespace("webhook").await.unwrap();

    let pki = TestPki::new(&["127.0.0.1"]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(serve_webhook(listener, pki.clone(), seen_tx));

    let webhook_name = format!("{namespace}.probe.eden.io");
    let configuration = MutatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(webhook_name.clone()), ..Default::default() },
        webhooks: Some(vec![MutatingWebhook {
            name: webhook_name.clone(),
            client_config: WebhookClientConfig {
                url: Some(format!("https://127.0.0.1:{port}/mutate")),
                ca_bundle: Some(ByteString(pki.ca_pem.clone().into_bytes())),
                ..Default::default()
            },
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            // Only this test's namespace, so concurrent tests never pass through this webhook.
            namespace_selector: Some(LabelSelector {
                match_labels: Some([("kubernetes.io/metadata.name".to_string(), namespace.clone())].into()),
                ..Default::default()
            }),
            side_effects: "None".into(),
            admission_review_versions: vec!["v1".into()],
            failure_policy: Some("Fail".into()),
            timeout_seconds: Some(5),
            ..Default::default()
        }]),
    };
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configurations.create(&PostParams::default(), &configuration).await.unwrap();

    // The API server picks up new webhook configurations asynchronously: retry with fresh
    // pods until one comes back mutated.
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let mut mutated = None;
    for attempt in 0..50 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("app-{attempt}")},
            "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}
        }))
        .unwrap();
        let created = pods.create(&PostParams::default(), &pod).await.unwrap();
        if created.metadata.annotations.as_ref().is_some_and(|a| a.contains_key("eden.io/webhook-saw")) {
            mutated = Some(created);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mutated = mutated.expect("the webhook mutated a pod within 5s");
    let name = mutated.metadata.name.unwrap();
    assert_eq!(mutated.metadata.annotations.unwrap()["eden.io/webhook-saw"], "true");

    let mut seen = Vec::new();
    while let Ok(pod) = seen_rx.try_recv() {
        seen.push(pod);
    }
    assert!(seen.contains(&name), "the webhook saw {name}: {seen:?}");

    configurations.delete(&webhook_name, &DeleteParams::default()).await.unwrap();
}
