//! The injection webhook against a real API server: registered by the operator with its own CA,
//! called by the API server for the pods that opted in, it adds the sidecar to the pods that ask
//! (applied with kubectl, or all of a labelled namespace's), leaves the rest alone, says why when
//! it cannot inject, a second replica serves with the same CA, and the CA and the serving
//! certificates rotate without a pod going without its sidecar.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eden_e2e::{ControlPlane, TestPki};
use eden_operator::metrics::Metrics;
use eden_operator::proxy::{CONTAINER_NAME, DEFAULT_IMAGE};
use eden_operator::webhook::inject::SKIPPED;
use eden_operator::webhook::register::NAME;
use eden_operator::webhook::{self, CA_SECRET, CallTarget, Certificates, FailurePolicy, Lifetimes, WebhookOptions};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Container, Event, Pod, Secret};
use kube::Api;
use kube::api::ListParams;
use tokio::sync::{Mutex, MutexGuard};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// The API server has one configuration of this webhook, which every replica writes: the tests
/// of this file take turns.
static ONE_CONFIGURATION: Mutex<()> = Mutex::const_new(());

const SIDECAR_RULES: &str = include_str!("../../charts/eden/rbac/sidecar-rules.yaml");

const MANIFEST: &str = "apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {name: source}
spec: {uri: \"redis://10.0.1.50:6379\"}
---
apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {name: target}
spec: {uri: \"rediss://new.example:6380\", credentialsSecretRef: {name: target-password}}
---
apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {name: cache}
spec:
  source: {endpointRef: {name: source}}
  target: {endpointRef: {name: target}}
";

/// A pod applied with kubectl: `annotations` and `spec_extra` are YAML flow mappings' insides.
fn pod(name: &str, annotations: &str, spec_extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  annotations: {{{annotations}}}
spec:
  {spec_extra}
  containers: [{{name: app, image: \"app:1\"}}]
"
    )
}

/// The chart's sidecar Role and RoleBinding for `namespace`.
fn sidecar_rbac(namespace: &str) -> String {
    format!(
        "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: eden-sidecar}}\nrules:\n{SIDECAR_RULES}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: eden-sidecar}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: eden-sidecar}}\n\
         subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: \"system:serviceaccounts:{namespace}\"}}]\n"
    )
}

/// The Events of `namespace` with `reason`.
async fn events(client: &kube::Client, namespace: &str, reason: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let mut found = events.list(&ListParams::default()).await.unwrap().items;
    found.retain(|event| event.reason.as_deref() == Some(reason));
    found
}

fn free_address() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn start_replica(
    client: &kube::Client,
    operator_namespace: &str,
    instance: &str,
    certificates: Certificates,
) -> (Arc<Metrics>, SocketAddr) {
    let metrics = Arc::new(Metrics::default());
    let listen = free_address();
    let options = WebhookOptions {
        listen,
        call: CallTarget::Url(format!("https://{listen}")),
        // An opted-in pod the webhook was not asked about would be refused: every such
        // creation below proves the API server called it.
        failure_policy: FailurePolicy::Fail,
        namespace: operator_namespace.into(),
        image: DEFAULT_IMAGE.into(),
        instance: Some(instance.into()),
        metrics: metrics.clone(),
        certificates,
    };
    webhook::start(client.clone(), options).await.expect("the webhook starts and registers");
    (metrics, listen)
}

/// This test's turn, the shared control plane with Eden's CRDs, an admin client, a namespace
/// for the operator, and one named after `prefix` holding [`MANIFEST`]'s Migration.
async fn cluster(prefix: &str) -> (MutexGuard<'static, ()>, &'static ControlPlane, kube::Client, String, String) {
    let turn = ONE_CONFIGURATION.lock().await;
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let client = control_plane.client().await.unwrap();
    let operator_namespace = control_plane.namespace("eden-system").await.unwrap();
    let namespace = control_plane.namespace(prefix).await.unwrap();
    control_plane.apply_manifest(&namespace, MANIFEST).unwrap();
    (turn, control_plane, client, operator_namespace, namespace)
}

fn sidecars(pod: &Pod) -> Vec<&Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).filter(|c| c.name == CONTAINER_NAME).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_ask_get_the_sidecar_and_the_others_are_left_alone_or_told_why() {
    let (_turn, control_plane, client, operator_namespace, namespace) = cluster("shop").await;
    let (metrics, _) =
        start_replica(&client, &operator_namespace, "replica-a", Certificates::Managed(Lifetimes::default())).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);

    // Asked, for an existing Migration: a native sidecar, first among the init containers.
    let opted_in = "eden.io/inject: \"true\", eden.io/migration: cache";
    control_plane.apply_manifest(&namespace, &pod("injected", opted_in, "")).unwrap();
    let injected = pods.get("injected").await.unwrap();
    let init = injected.spec.as_ref().unwrap().init_containers.as_ref().expect("an init container");
    let sidecar = &init[0];
    assert_eq!((sidecar.name.as_str(), sidecar.restart_policy.as_deref()), (CONTAINER_NAME, Some("Always")));
    let args = sidecar.args.as_ref().unwrap().join(" ");
    for expected in [
        "--listen 127.0.0.1:6379",
        "--source redis://10.0.1.50:6379",
        "--configmap eden-cache",
        &format!("--namespace {namespace}"),
        "--pod-name $(POD_NAME)",
    ] {
        assert!(args.contains(expected), "{expected:?} in {args}");
    }
    let startup = sidecar.startup_probe.as_ref().and_then(|probe| probe.http_get.as_ref()).unwrap();
    assert_eq!(startup.path.as_deref(), Some("/readyz"), "the application starts once the sidecar has a strategy");
    let security = sidecar.security_context.as_ref().unwrap();
    assert_eq!((security.run_as_non_root, security.read_only_root_filesystem), (Some(true), Some(true)));
    let volume = &injected.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
    assert_eq!(volume.secret.as_ref().unwrap().secret_name.as_deref(), Some("target-password"));
    assert_eq!(injected.spec.as_ref().unwrap().containers.len(), 1, "the application's container is as it was");

    // The README's example Deployment is one the API server takes.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/app.yaml");
    control_plane.run_kubectl(&["apply", "--dry-run=server", "-n", &namespace, "-f", example]).unwrap();

    // Not asked, or asked for a sidecar it has already: untouched.
    control_plane.apply_manifest(&namespace, &pod("plain", "", "")).unwrap();
    assert!(sidecars(&pods.get("plain").await.unwrap()).is_empty());
    let own = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: own\n  annotations: {{{opted_in}}}\nspec:\n  containers:\n  \
         - {{name: app, image: \"app:1\"}}\n  - {{name: {CONTAINER_NAME}, image: \"mine:1\"}}\n"
    );
    control_plane.apply_manifest(&namespace, &own).unwrap();
    let own = pods.get("own").await.unwrap();
    assert_eq!(sidecars(&own).len(), 1);
    assert_eq!(sidecars(&own)[0].image.as_deref(), Some("mine:1"));

    // Asked, but no sidecar can go in: created without one, with the reason.
    let missing = "eden.io/inject: \"true\", eden.io/migration: nonexistent";
    control_plane.apply_manifest(&namespace, &pod("unknown-migration", missing, "")).unwrap();
    let unknown = pods.get("unknown-migration").await.unwrap();
    assert!(sidecars(&unknown).is_empty());
    let reason = &unknown.metadata.annotations.as_ref().unwrap()[SKIPPED];
    assert!(reason.contains("Migration nonexistent not found"), "{reason}");
    control_plane.apply_manifest(&namespace, &pod("host", opted_in, "hostNetwork: true")).unwrap();
    let host = pods.get("host").await.unwrap();
    assert!(sidecars(&host).is_empty());
    assert!(host.metadata.annotations.as_ref().unwrap()[SKIPPED].contains("hostNetwork"));
    // The Migration it named tells its owner too. The webhook records Events before it answers.
    let skipped = events(&client, &namespace, "SidecarSkipped").await;
    let event = skipped.iter().find(|e| e.message.as_deref().unwrap_or_default().contains("pod host")).unwrap();
    assert_eq!(event.involved_object.name.as_deref(), Some("cache"));
    // This namespace is not among the chart's sidecarNamespaces: the injected sidecars' default
    // ServiceAccount may not read their ConfigMap, which their Migration is told.
    let lacking = events(&client, &namespace, "SidecarLacksAccess").await;
    let note = lacking.first().and_then(|e| e.message.clone()).expect("a SidecarLacksAccess Event");
    assert!(note.contains("pod injected") && note.contains("sidecarNamespaces"), "{note}");

    // A namespace labelled eden.io/inject=enabled asks for its pods; its annotation names the
    // Migration; a pod's own "false" wins.
    let labelled = control_plane.namespace("orders").await.unwrap();
    control_plane.apply_manifest(&labelled, MANIFEST).unwrap();
    control_plane.apply_manifest(&labelled, &sidecar_rbac(&labelled)).unwrap();
    control_plane.run_kubectl(&["label", "namespace", &labelled, "eden.io/inject=enabled"]).unwrap();
    control_plane.run_kubectl(&["annotate", "namespace", &labelled, "eden.io/migration=cache"]).unwrap();
    let in_labelled: Api<Pod> = Api::namespaced(client.clone(), &labelled);
    control_plane.apply_manifest(&labelled, &pod("unannotated", "", "")).unwrap();
    assert_eq!(sidecars(&in_labelled.get("unannotated").await.unwrap()).len(), 1);
    control_plane.apply_manifest(&labelled, &pod("refuses", "eden.io/inject: \"false\"", "")).unwrap();
    assert!(sidecars(&in_labelled.get("refuses").await.unwrap()).is_empty());
    assert!(events(&client, &labelled, "SidecarLacksAccess").await.is_empty(), "the chart's Role is there");

    let counted = metrics.render();
    // Of the pods that did not opt in ("plain", "refuses"), the API server asked about none.
    for (outcome, count) in [("injected", 2), ("skipped", 2), ("untouched", 1)] {
        let series = format!("eden_operator_webhook_admissions_total{{outcome=\"{outcome}\"}} {count}");
        assert!(counted.contains(&series), "{series} in\n{counted}");
    }

    // A second replica signs with the CA the first one stored, so the caBundle stays valid
    // when the API server calls it instead.
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = |c: MutatingWebhookConfiguration| c.webhooks.unwrap()[0].client_config.ca_bundle.clone().unwrap();
    let first = bundle(configurations.get(NAME).await.unwrap());
    let secret = Api::<Secret>::namespaced(client.clone(), &operator_namespace).get(CA_SECRET).await.unwrap();
    assert_eq!(first.0, secret.data.unwrap()["ca.crt"].0);
    start_replica(&client, &operator_namespace, "replica-b", Certificates::Managed(Lifetimes::default())).await;
    assert_eq!(bundle(configurations.get(NAME).await.unwrap()), first);
    control_plane.apply_manifest(&namespace, &pod("second", opted_in, "")).unwrap();
    assert_eq!(sidecars(&pods.get("second").await.unwrap()).len(), 1);
}

/// The CA (18 s here) and the serving certificates (6 s) rotate while pods are created: with
/// `Fail`, a pod the API server could not call the webhook for would be refused, and every one
/// gets its sidecar; a new connection always gets a certificate the live `caBundle` trusts; the
/// replaced CA stays in the bundle until it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_and_the_serving_certificates_rotate_while_pods_keep_getting_their_sidecar() {
    let (_turn, control_plane, client, operator_namespace, namespace) = cluster("rotating").await;
    let lifetimes = Lifetimes {
        ca: Duration::from_secs(18),
        serving: Duration::from_secs(6),
        check_every: Duration::from_millis(250),
    };
    let (_, listen) = start_replica(&client, &operator_namespace, "replica-a", Certificates::Managed(lifetimes)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &operator_namespace);
    let generation = |secret: Secret| String::from_utf8(secret.data.unwrap()["ca.generation"].0.clone()).unwrap();
    assert_eq!(generation(secrets.get(CA_SECRET).await.unwrap()), "1");

    let (mut served, mut most_cas_trusted) = (HashSet::new(), 0);
    let started = Instant::now();
    for n in 0.. {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let name = format!("app-{n}");
        control_plane
            .apply_manifest(&namespace, &pod(&name, "eden.io/inject: \"true\", eden.io/migration: cache", ""))
            .unwrap();
        assert_eq!(sidecars(&pods.get(&name).await.unwrap()).len(), 1, "{name}");
        let bundle = configurations.get(NAME).await.unwrap().webhooks.unwrap()[0].client_config.ca_bundle.clone();
        let bundle = bundle.unwrap().0;
        most_cas_trusted = most_cas_trusted.max(CertificateDer::pem_slice_iter(&bundle).count());
        served.insert(served_certificate(listen, &bundle).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(generation(secrets.get(CA_SECRET).await.unwrap()).parse::<u32>().unwrap() >= 2, "the CA rotated");
    assert_eq!(most_cas_trusted, 2, "the replaced CA was trusted beside the new one for a while");
    assert!(served.len() >= 4, "serving certificates renewed: {} seen", served.len());
}

/// A certificate another issuer keeps in files (cert-manager's Secret, mounted) is served with
/// its `ca.crt` as the `caBundle`, and served anew when the issuer replaces the files, even with
/// a new CA; files that cannot be read leave the served certificate as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mounted_certificate_is_served_and_reloaded_when_its_issuer_renews_it() {
    let (_turn, control_plane, client, operator_namespace, namespace) = cluster("mounted").await;
    let dir = tempfile::tempdir().unwrap();
    let first = TestPki::new(&["127.0.0.1"]).unwrap();
    mount(dir.path(), &first);
    let certificates = Certificates::Mounted { dir: dir.path().into(), check_every: Duration::from_millis(200) };
    let (_, listen) = start_replica(&client, &operator_namespace, "replica-a", certificates).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let configurations: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let live_bundle = async || {
        let configuration = configurations.get(NAME).await.unwrap();
        configuration.webhooks.unwrap()[0].client_config.ca_bundle.clone().unwrap().0
    };
    let injected = async |name: &str| {
        let opted_in = "eden.io/inject: \"true\", eden.io/migration: cache";
        control_plane.apply_manifest(&namespace, &pod(name, opted_in, "")).unwrap();
        sidecars(&pods.get(name).await.unwrap()).len() == 1
    };
    assert_eq!(live_bundle().await, first.ca_pem.as_bytes());
    assert!(injected("first").await);
    let served = served_certificate(listen, first.ca_pem.as_bytes()).await;
    let pem_of = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec();
    assert_eq!(served, pem_of(&first.cert_pem));

    // Unreadable files: a warning, and the certificate served stays.
    std::fs::write(dir.path().join("..data/tls.crt"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(served_certificate(listen, first.ca_pem.as_bytes()).await, served);
    assert!(injected("while-broken").await);

    // Renewed, with a new CA: the bundle follows, then the certificate.
    let renewed = TestPki::new(&["127.0.0.1"]).unwrap();
    mount(dir.path(), &renewed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while live_bundle().await != renewed.ca_pem.as_bytes() {
        assert!(Instant::now() < deadline, "the renewed ca.crt never became the caBundle");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(served_certificate(listen, renewed.ca_pem.as_bytes()).await, pem_of(&renewed.cert_pem));
    assert!(injected("after-renewal").await);
}

/// Writes `pki` into `dir` as the kubelet updates a mounted Secret: the files are links into
/// `..data`, itself a link to the current version's directory, replaced in one rename.
fn mount(dir: &std::path::Path, pki: &TestPki) {
    let version = tempfile::Builder::new().prefix("..version-").tempdir_in(dir).unwrap().keep();
    pki.write_to(&version).unwrap();
    let staged = dir.join("..data_tmp");
    std::os::unix::fs::symlink(&version, &staged).unwrap();
    std::fs::rename(&staged, dir.join("..data")).unwrap();
    for name in ["ca.crt", "tls.crt", "tls.key"] {
        let _ = std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name));
    }
}

/// The certificate a new TLS connection to `listen` gets, verified against `bundle` (PEM).
async fn served_certificate(listen: SocketAddr, bundle: &[u8]) -> Vec<u8> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(bundle) {
        roots.add(certificate.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = tokio::net::TcpStream::connect(listen).await.unwrap();
    let server = ServerName::IpAddress(listen.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server, stream).await;
    let tls = tls.unwrap_or_else(|err| panic!("the served certificate is not trusted by the live caBundle: {err}"));
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}
