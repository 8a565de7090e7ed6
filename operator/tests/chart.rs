//! The Helm chart as a user installs it: real Helm renders `charts/eden` (CRDs included), the
//! API server takes every object, and the operator binary runs the way the rendered Deployment
//! runs it: with the container's environment, as the chart's ServiceAccount (a token the API
//! server issues), so a value the chart passes that the operator rejects, or a permission it
//! lacks, fails here. The webhook's configuration is the release's: installed with `helm
//! install`, with `failurePolicy: fail` and no operator answering it refuses only the pods that
//! opted in, and `helm uninstall` leaves none of it behind.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eden_e2e::{ControlPlane, Helm, RedisServer, TestPki, free_port};
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_operator::webhook::register::{self, CallTarget, WEBHOOKS};
use eden_operator::webhook::{Certificates, FailurePolicy, Lifetimes, WebhookOptions};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::{AuthInfo, Kubeconfig};
use tokio::sync::Mutex;

/// The replica's pod name: what the downward API would give `metadata.name`.
const POD_NAME: &str = "eden-operator-7d9f8-x2x4q";

/// The API server has one configuration of the webhook, which the operator writes: the tests
/// of this file take turns.
static ONE_CONFIGURATION: Mutex<()> = Mutex::const_new(());

#[tokio::test]
async fn the_rendered_chart_installs_and_its_operator_runs_as_deployed() {
    let _turn = ONE_CONFIGURATION.lock().await;
    let control_plane = ControlPlane::shared();
    let helm = Helm::find().unwrap();
    let system = control_plane.namespace("eden-system").await.unwrap();
    let app = control_plane.namespace("shop").await.unwrap();
    let values = [format!("sidecarNamespaces={{{app}}}"), "webhook.failurePolicy=fail".into()];
    control_plane.install_chart(&helm, &system, &values.each_ref().map(String::as_str)).unwrap();

    let client = control_plane.client().await.unwrap();
    let deployment = Api::<Deployment>::namespaced(client.clone(), &system).get("eden-operator").await.unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("eden-operator"));
    let container = &pod.containers[0];

    // The webhook's path: Service port 443 → the container port named `webhook` → the address
    // the operator listens on.
    let service = Api::<Service>::namespaced(client.clone(), &system).get("eden-operator-webhook").await.unwrap();
    let service_port = &service.spec.unwrap().ports.unwrap()[0];
    assert_eq!(service_port.port, 443);
    let Some(IntOrString::String(target_port)) = &service_port.target_port else { panic!("{service_port:?}") };
    let env = container_env(container, &system);
    // The images by default: fully qualified (what a container runtime pulls or `make images`
    // archives hold), and the sidecar the operator injects is the one it would inject unconfigured.
    let image = container.image.as_deref().unwrap();
    assert!(image.starts_with("ghcr.io/") && image.ends_with(&format!(":{}", env!("CARGO_PKG_VERSION"))), "{image}");
    assert_eq!(env["EDEN_SIDECAR_IMAGE"], DEFAULT_IMAGE);
    assert_eq!(env["EDEN_WEBHOOK_LISTEN"].rsplit_once(':').unwrap().1, container_port(container, target_port));

    let mut operator = Operator::start(control_plane, &system, env);

    // It writes the caBundle of the chart's webhooks, behind the chart's Service, with the
    // chart's failure policy.
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let registered = operator.registration(&configurations).await;
    for hook in registered.webhooks.unwrap() {
        assert_eq!(hook.failure_policy.as_deref(), Some("Fail"));
        let called = hook.client_config.service.as_ref().unwrap();
        assert_eq!(
            (called.namespace.as_str(), called.name.as_str(), called.port),
            (system.as_str(), "eden-operator-webhook", Some(443))
        );
    }
    // `fail` is in force: with no Service network here the API server cannot reach the webhook,
    // so a pod that asks is refused rather than created without its sidecar.
    let refused = Api::<Pod>::namespaced(client.clone(), &app).create(&PostParams::default(), &app_pod()).await;
    let refused = refused.map(|pod| pod.metadata.name).unwrap_err().to_string();
    assert!(refused.contains("failed calling webhook"), "{refused}");

    // And it reconciles, as the chart's ServiceAccount: an Endpoint in a sidecar namespace
    // becomes Ready.
    let redis = RedisServer::start().unwrap();
    let endpoint = format!(
        "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: cache}}\nspec: {{uri: '{}'}}\n",
        redis.url()
    );
    control_plane.apply_manifest(&app, &endpoint).unwrap();
    let ready = control_plane.run_kubectl(&[
        "wait",
        "-n",
        &app,
        "--for=condition=Ready",
        "endpoints.eden.io/cache",
        "--timeout=60s",
    ]);
    assert!(ready.is_ok(), "{ready:?}\noperator log:\n{}", operator.log());

    configurations.delete("eden-sidecar-injector", &DeleteParams::default()).await.unwrap();
}

/// The chart's webhooks are the ones the operator would register at a URL
/// (`register::configuration`), called through the chart's Service, with no caBundle of their own.
#[tokio::test]
async fn the_chart_installs_the_webhooks_the_operator_defines() {
    let helm = Helm::find().unwrap();
    let rendered = helm.template_eden("eden-system", &["webhook.failurePolicy=fail"]).unwrap();
    let document = rendered.split("\n---").find(|document| document.contains("kind: MutatingWebhookConfiguration"));
    let chart: MutatingWebhookConfiguration = serde_yaml::from_str(document.expect("a webhook configuration")).unwrap();
    let call = CallTarget::Service { namespace: "eden-system".into(), name: "eden-operator-webhook".into(), port: 443 };
    let options = WebhookOptions {
        listen: "127.0.0.1:9443".parse().unwrap(),
        call,
        failure_policy: FailurePolicy::Fail,
        namespace: "eden-system".into(),
        image: String::new(),
        instance: None,
        metrics: Default::default(),
        certificates: Certificates::Managed(Lifetimes::default()),
    };
    let mut defined = register::configuration(&options, "");
    for hook in defined.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = None;
    }
    assert_eq!(chart.metadata.name, defined.metadata.name);
    assert_eq!(chart.webhooks, defined.webhooks);
}

/// `values.schema.json`: a wrong value is refused before anything renders, with where and what;
/// the production knobs render as the values say.
#[test]
fn wrong_values_are_refused_by_name_and_the_production_knobs_render() {
    let helm = Helm::find().unwrap();
    for (value, says) in [
        ("operator.replicas=0", "at '/operator/replicas': minimum: got 0, want 1"),
        ("operator.replica=2", "at '/operator': additional properties 'replica' not allowed"),
        ("webhook.failurePolicy=sometimes", "at '/webhook/failurePolicy': value must be one of"),
        ("sidecarNamespaces={Shop}", "at '/sidecarNamespaces/0': 'Shop' does not match pattern"),
        ("operator.topologySpreadConstraints[0].whenUnsatisfiable=Never", "value must be one of"),
    ] {
        let refused = helm.template_eden("eden-system", &[value]).unwrap_err().to_string();
        assert!(refused.contains(says), "{value}: {refused}");
    }

    let rendered = helm.template_eden("eden-system", &["operator.priorityClassName=eden-critical"]).unwrap();
    let find = |kind: &str| {
        let document = rendered.split("\n---").find(|document| document.contains(&format!("\nkind: {kind}\n")));
        serde_yaml::from_str::<serde_json::Value>(document.unwrap_or_else(|| panic!("no {kind}"))).unwrap()
    };
    let selector = serde_json::json!({"matchLabels": {"app.kubernetes.io/name": "eden-operator"}});
    let budget = find("PodDisruptionBudget");
    assert_eq!((&budget["spec"]["minAvailable"], &budget["spec"]["selector"]), (&1.into(), &selector));
    let pod = &find("Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "eden-critical");
    let spread = &pod["topologySpreadConstraints"][0];
    assert_eq!((&spread["topologyKey"], &spread["labelSelector"]), (&"kubernetes.io/hostname".into(), &selector));

    let alone = helm.template_eden("eden-system", &["operator.replicas=1"]).unwrap();
    assert!(!alone.contains("kind: PodDisruptionBudget"), "one replica: a budget would block every drain");
}

/// `helm install` with `webhook.failurePolicy=fail`; the operator writes the caBundle and stops
/// (scaled to 0, or down): a pod that did not opt in, in a namespace of its own, is created; a pod
/// that asks, or one in a labelled namespace, is refused and told which webhook failed; after
/// `helm uninstall` no webhook configuration of Eden's is left.
#[tokio::test]
async fn with_fail_and_no_operator_only_opted_in_pods_are_refused_and_uninstall_leaves_no_webhook() {
    let _turn = ONE_CONFIGURATION.lock().await;
    let control_plane = ControlPlane::shared();
    let helm = Helm::find().unwrap();
    // The other tests of this file apply the chart's cluster-wide objects without a release,
    // which Helm would refuse to adopt.
    let leftovers = ["delete", "--ignore-not-found", "clusterrole/eden-operator", "clusterrolebinding/eden-operator"];
    control_plane.run_kubectl(&leftovers).unwrap();
    let system = control_plane.namespace("eden-system").await.unwrap();
    let app = control_plane.namespace("shop").await.unwrap();
    let labelled = control_plane.namespace("orders").await.unwrap();
    control_plane.run_kubectl(&["label", "namespace", &labelled, "eden.io/inject=enabled"]).unwrap();
    let unrelated = control_plane.namespace("unrelated").await.unwrap();
    let values = [format!("sidecarNamespaces={{{app},{labelled}}}"), "webhook.failurePolicy=fail".into()];
    helm.install_eden(control_plane.kubeconfig(), &system, &values.each_ref().map(String::as_str)).unwrap();

    // The operator ran, and wrote its caBundle; now no replica answers.
    let client = control_plane.client().await.unwrap();
    let deployment = Api::<Deployment>::namespaced(client.clone(), &system).get("eden-operator").await.unwrap();
    let env = container_env(&deployment.spec.unwrap().template.spec.unwrap().containers[0], &system);
    let mut operator = Operator::start(control_plane, &system, env);
    let configurations = Api::<MutatingWebhookConfiguration>::all(client.clone());
    operator.registration(&configurations).await;
    drop(operator);

    let run = |namespace: &str, name: &str, annotations: &[&str]| {
        let mut args = vec!["run", name, "-n", namespace, "--image=registry.example/app:1", "--restart=Never"];
        let annotations: Vec<String> = annotations.iter().map(|a| format!("--annotations={a}")).collect();
        args.extend(annotations.iter().map(String::as_str));
        control_plane.run_kubectl(&args)
    };
    run(&unrelated, "plain", &[]).expect("a pod that did not opt in is never sent to the webhook");
    run(&app, "plain", &[]).expect("nor in a sidecar namespace");
    run(&labelled, "refuses", &["eden.io/inject=false"]).expect("nor one that opts out of its namespace");
    for (namespace, annotations, webhook) in [
        (&app, &["eden.io/inject=true", "eden.io/migration=cache"][..], "inject.eden.io"),
        (&unrelated, &["eden.io/inject=true", "eden.io/migration=cache"][..], "inject.eden.io"),
        (&labelled, &[][..], "namespace.inject.eden.io"),
    ] {
        let refused = run(namespace, "asks", annotations).expect_err("a pod that asks is refused").to_string();
        assert!(refused.contains(&format!("failed calling webhook \"{webhook}\"")), "{refused}");
    }

    helm.uninstall_eden(control_plane.kubeconfig(), &system).unwrap();
    let left = control_plane.run_kubectl(&["get", "mutatingwebhookconfigurations", "-o", "name"]).unwrap();
    assert!(!left.contains("eden"), "left behind by helm uninstall: {left}");
    run(&unrelated, "after", &["eden.io/inject=true"]).expect("nothing refuses a pod once Eden is uninstalled");
}

/// The container's environment as the kubelet would set it: literal values, and the two
/// downward-API fields the chart uses.
fn container_env(container: &Container, namespace: &str) -> BTreeMap<String, String> {
    let resolve = |var: &EnvVar| match (&var.value, var.value_from.as_ref().and_then(|from| from.field_ref.as_ref())) {
        (Some(value), _) => value.clone(),
        (None, Some(field)) if field.field_path == "metadata.name" => POD_NAME.into(),
        (None, Some(field)) if field.field_path == "metadata.namespace" => namespace.into(),
        _ => panic!("an environment variable this test cannot resolve: {var:?}"),
    };
    container.env.iter().flatten().map(|var| (var.name.clone(), resolve(var))).collect()
}

fn container_port(container: &Container, name: &str) -> String {
    let ports = container.ports.iter().flatten();
    ports.filter(|port| port.name.as_deref() == Some(name)).map(|port| port.container_port.to_string()).next().unwrap()
}

/// A kubeconfig for the same API server that authenticates as `namespace/name` with a token
/// the API server issues (`kubectl create token`), as a pod's projected token would.
fn service_account_kubeconfig(control_plane: &ControlPlane, namespace: &str, name: &str) -> tempfile::NamedTempFile {
    let token = control_plane.run_kubectl(&["create", "token", name, "-n", namespace]).unwrap();
    let mut kubeconfig = Kubeconfig::read_from(control_plane.kubeconfig()).unwrap();
    for user in &mut kubeconfig.auth_infos {
        user.auth_info = Some(AuthInfo { token: Some(token.trim().to_string().into()), ..Default::default() });
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    serde_yaml::to_writer(&file, &kubeconfig).unwrap();
    file
}

fn app_pod() -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "app", "annotations": {"eden.io/inject": "true", "eden.io/migration": "cache"}},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap()
}

/// With `webhook.certManager.enabled`, the operator serves the certificate cert-manager keeps
/// in the Secret the Deployment mounts, issued for the webhook Service's names, and registers
/// its `ca.crt` as the `caBundle`. cert-manager is not installed here: its objects are checked
/// as rendered, and the files its Secret would hold are written where the operator reads them.
#[tokio::test]
async fn with_cert_manager_the_operator_serves_the_mounted_certificate() {
    let _turn = ONE_CONFIGURATION.lock().await;
    let control_plane = ControlPlane::shared();
    let helm = Helm::find().unwrap();
    let system = control_plane.namespace("eden-system").await.unwrap();
    let rendered = helm.template_eden(&system, &["webhook.certManager.enabled=true"]).unwrap();
    let (cert_manager, rest): (Vec<&str>, Vec<&str>) =
        rendered.split("\n---").partition(|document| document.contains("apiVersion: cert-manager.io/"));
    control_plane.apply_manifest(&system, &rest.join("\n---")).unwrap();

    let serving = cert_manager
        .iter()
        .map(|document| serde_yaml::from_str::<serde_json::Value>(document).unwrap())
        .find(|object| object["kind"] == "Certificate" && object["spec"]["isCA"] != true)
        .expect("a serving Certificate");
    let dns_names = serving["spec"]["dnsNames"].as_array().unwrap();
    assert!(dns_names.contains(&format!("eden-operator-webhook.{system}.svc").into()), "{dns_names:?}");
    let client = control_plane.client().await.unwrap();
    let deployment = Api::<Deployment>::namespaced(client.clone(), &system).get("eden-operator").await.unwrap();
    let pod = deployment.spec.unwrap().template.spec.unwrap();
    let volume = &pod.volumes.as_ref().unwrap()[0];
    assert_eq!(volume.secret.as_ref().unwrap().secret_name.as_deref(), serving["spec"]["secretName"].as_str());
    let container = &pod.containers[0];
    let mount = container.volume_mounts.iter().flatten().find(|mount| mount.name == volume.name).unwrap();
    let mut env = container_env(container, &system);
    assert_eq!(env["EDEN_WEBHOOK_CERT_DIR"], mount.mount_path);

    let mounted = tempfile::tempdir().unwrap();
    let pki = TestPki::new(&[&format!("eden-operator-webhook.{system}.svc")]).unwrap();
    pki.write_to(mounted.path()).unwrap();
    env.insert("EDEN_WEBHOOK_CERT_DIR".into(), mounted.path().display().to_string());
    let mut operator = Operator::start(control_plane, &system, env);
    let configurations = Api::<MutatingWebhookConfiguration>::all(client);
    let registered = operator.registration(&configurations).await;
    for hook in registered.webhooks.unwrap() {
        let bundle = hook.client_config.ca_bundle;
        assert_eq!(bundle.as_ref().map(|bundle| bundle.0.as_slice()), Some(pki.ca_pem.as_bytes()));
    }
    configurations.delete("eden-sidecar-injector", &DeleteParams::default()).await.unwrap();
}

/// The operator process, killed when the test ends however it ends.
struct Operator {
    child: Child,
    log: tempfile::NamedTempFile,
    _kubeconfig: tempfile::NamedTempFile,
}

impl Operator {
    /// The operator binary with the rendered container's environment `env`, as the chart's
    /// ServiceAccount.
    fn start(control_plane: &ControlPlane, namespace: &str, env: BTreeMap<String, String>) -> Operator {
        // In its pod the operator has these ports to itself; here they are free loopback ports.
        let (admin, webhook) = (free_port().unwrap(), free_port().unwrap());
        let kubeconfig = service_account_kubeconfig(control_plane, namespace, "eden-operator");
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_eden-operator"))
            .envs(&env)
            .env("EDEN_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("EDEN_WEBHOOK_LISTEN", format!("127.0.0.1:{webhook}"))
            .env("KUBECONFIG", kubeconfig.path())
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        Operator { child, log, _kubeconfig: kubeconfig }
    }

    /// The chart's webhook configuration, once the operator has written the caBundle of every
    /// webhook.
    async fn registration(
        &mut self,
        configurations: &Api<MutatingWebhookConfiguration>,
    ) -> MutatingWebhookConfiguration {
        within(self, "the webhook's caBundle", || {
            let configurations = configurations.clone();
            async move {
                let configuration = configurations.get_opt(register::NAME).await.unwrap()?;
                let hooks = configuration.webhooks.iter().flatten();
                let bundled =
                    hooks.filter(|hook| hook.client_config.ca_bundle.as_ref().is_some_and(|b| !b.0.is_empty()));
                (bundled.count() == WEBHOOKS.len()).then_some(configuration)
            }
        })
        .await
    }

    /// What it logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `probe` until it returns something, for at most 60 s; fails with the operator's log.
async fn within<T, F: Future<Output = Option<T>>>(operator: &mut Operator, what: &str, probe: impl Fn() -> F) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(found) = probe().await {
            return found;
        }
        if Instant::now() > deadline || operator.child.try_wait().unwrap().is_some() {
            panic!("{what}: not within 60 s; operator log:\n{}", operator.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
