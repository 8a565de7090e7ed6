//! The chart's RBAC against a real API server that authorizes with RBAC: the chart is rendered
//! by Helm and applied, checked with `kubectl auth can-i` as the ServiceAccounts, and then the
//! operator and a sidecar run as those ServiceAccounts through a migration with a gateway and
//! the injection webhook, so a permission the code needs and the chart lacks fails here.

use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{ControlPlane, Helm, RedisConfig, RedisServer};
use eden_operator::crd::{Migration, Phase};
use eden_operator::leader::{LeaderElector, Timing};
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_operator::webhook::{self, CallTarget, Certificates, FailurePolicy, WebhookOptions, register};
use eden_operator::{context::Context, endpoint, metrics::Metrics, migration};
use eden_sidecar::config::Applier;
use eden_sidecar::lease::LeaseReporter;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::{Api, DeleteParams, PostParams};
use tokio::sync::watch;

/// `kubectl auth can-i` as `user`: whether the API server's RBAC allows `verb resource`.
fn can_i(control_plane: &ControlPlane, user: &str, namespace: &str, verb: &str, resource: &str) -> bool {
    let mut args = vec!["auth", "can-i", verb, "-n", namespace];
    let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
    args.push(resource);
    let subresource = format!("--subresource={subresource}");
    if !subresource.ends_with('=') {
        args.push(&subresource);
    }
    let as_user = format!("--as={user}");
    args.push(&as_user);
    let output = control_plane.kubectl().args(&args).output().unwrap();
    match String::from_utf8_lossy(&output.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl {args:?}: {other} {}", String::from_utf8_lossy(&output.stderr)),
    }
}

fn assert_rights(control_plane: &ControlPlane, user: &str, namespace: &str, allowed: bool, rights: &[(&str, &str)]) {
    let wrong: Vec<String> = rights
        .iter()
        .filter(|(verb, resource)| can_i(control_plane, user, namespace, verb, resource) != allowed)
        .map(|(verb, resource)| format!("{verb} {resource}"))
        .collect();
    let expected = if allowed { "allowed" } else { "denied" };
    assert!(wrong.is_empty(), "{user} in {namespace} should be {expected}: {wrong:?}");
}

// Two workers: kubectl blocks the one that runs it while the API server calls the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_rbac_is_what_the_operator_and_sidecars_need_and_no_more() {
    let _ = tracing_subscriber::fmt().with_env_filter("info").with_test_writer().try_init();
    let control_plane = ControlPlane::shared();
    let system = control_plane.namespace("eden-system").await.unwrap();
    let app = control_plane.namespace("shop").await.unwrap();
    let helm = Helm::find().unwrap();
    control_plane.install_chart(&helm, &system, &[&format!("sidecarNamespaces={{{app}}}")]).unwrap();

    let operator = format!("system:serviceaccount:{system}:eden-operator");
    assert_rights(
        control_plane,
        &operator,
        &app,
        true,
        &[
            ("get", "endpoints.eden.io"),
            ("watch", "endpoints.eden.io"),
            ("patch", "endpoints.eden.io/status"),
            ("list", "migrations.eden.io"),
            ("patch", "migrations.eden.io"),
            ("patch", "migrations.eden.io/status"),
            ("update", "migrations.eden.io/finalizers"),
            ("watch", "configmaps"),
            ("patch", "configmaps"),
            ("delete", "configmaps"),
            ("get", "secrets"),
            ("list", "leases.coordination.k8s.io"),
            ("update", "leases.coordination.k8s.io"),
            ("deletecollection", "leases.coordination.k8s.io"),
            ("create", "events.events.k8s.io"),
            ("patch", "events.events.k8s.io"),
            ("patch", "deployments.apps"),
            ("delete", "services"),
            ("get", "namespaces"),
            ("create", "subjectaccessreviews.authorization.k8s.io"),
        ],
    );
    // The webhook's configuration is the chart's: the operator patches its caBundle, and may
    // neither create one nor patch another.
    let webhooks = "mutatingwebhookconfigurations.admissionregistration.k8s.io";
    for (verb, object, allowed) in [
        ("patch", format!("{webhooks}/eden-sidecar-injector"), "yes"),
        ("patch", format!("{webhooks}/other"), "no"),
        ("create", webhooks.to_string(), "no"),
    ] {
        let as_operator = format!("--as={operator}");
        let answer = control_plane.kubectl().args(["auth", "can-i", verb, &object, &as_operator]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), allowed, "{verb} {object}");
    }
    // The webhook's CA Secret is created in the operator's own namespace, nowhere else.
    assert_rights(control_plane, &operator, &system, true, &[("create", "secrets")]);
    // ...and rewritten when the CA rotates: that Secret, no other.
    for (secret, allowed) in [("secret/eden-webhook-ca", "yes"), ("secret/other", "no")] {
        let as_operator = format!("--as={operator}");
        let args = ["auth", "can-i", "update", secret, "-n", &system, &as_operator];
        let answer = control_plane.kubectl().args(args).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&answer.stdout).trim(), allowed, "update {secret}");
    }
    assert_rights(
        control_plane,
        &operator,
        &app,
        false,
        &[
            ("list", "secrets"),
            ("watch", "secrets"),
            ("create", "secrets"),
            ("create", "migrations.eden.io"),
            ("update", "migrations.eden.io"),
            ("delete", "migrations.eden.io"),
            ("patch", "endpoints.eden.io"),
            ("delete", "leases.coordination.k8s.io"),
            ("get", "deployments.apps"),
            ("list", "pods"),
            ("list", "namespaces"),
            ("create", "pods"),
            ("create", "rolebindings.rbac.authorization.k8s.io"),
        ],
    );
    let sidecar = format!("system:serviceaccount:{app}:default");
    assert_rights(
        control_plane,
        &sidecar,
        &app,
        true,
        &[
            ("get", "configmaps"),
            ("list", "configmaps"),
            ("watch", "configmaps"),
            ("patch", "leases.coordination.k8s.io"),
            ("delete", "leases.coordination.k8s.io"),
        ],
    );
    assert_rights(
        control_plane,
        &sidecar,
        &app,
        false,
        &[
            ("patch", "configmaps"),
            ("get", "secrets"),
            ("list", "leases.coordination.k8s.io"),
            ("get", "migrations.eden.io"),
        ],
    );
    assert_rights(
        control_plane,
        &sidecar,
        &system,
        false,
        &[("get", "configmaps"), ("patch", "leases.coordination.k8s.io")],
    );

    // The operator, as its ServiceAccount: leader election, both controllers in every
    // namespace, a Secret-protected target, a gateway, Events, a sidecar's ack, the finalizer.
    let as_operator = control_plane.client_as(&operator).await.unwrap();
    let (leading_tx, mut leading) = watch::channel(false);
    let elector = LeaderElector::new(
        Api::namespaced(as_operator.clone(), &system),
        "eden-operator-leader",
        "op-0",
        Timing::default(),
    );
    let election = tokio::spawn(elector.run(leading_tx));
    tokio::time::timeout(Duration::from_secs(10), leading.wait_for(|leads| *leads)).await.unwrap().unwrap();
    let ctx =
        Context::new(as_operator.clone(), Arc::new(Metrics::default()), Some("op-0".into()), DEFAULT_IMAGE.into());
    let controllers = [tokio::spawn(endpoint::run(ctx.clone())), tokio::spawn(migration::run(ctx, None))];
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let webhook_options = WebhookOptions {
        listen,
        call: CallTarget::Url(format!("https://{listen}")),
        failure_policy: FailurePolicy::Fail,
        namespace: system.clone(),
        image: DEFAULT_IMAGE.into(),
        instance: Some("op-0".into()),
        metrics: Arc::new(Metrics::default()),
        certificates: Certificates::Managed(Default::default()),
    };
    // No Service network here: as an administrator would, the chart's configuration is replaced
    // by one calling the webhook's address, whose caBundle the operator then writes.
    let configurations = Api::<MutatingWebhookConfiguration>::all(control_plane.client().await.unwrap());
    configurations.delete(register::NAME, &DeleteParams::default()).await.unwrap();
    let at_url = register::configuration(&webhook_options, "");
    configurations.create(&PostParams::default(), &at_url).await.unwrap();
    let webhook =
        webhook::start(as_operator.clone(), webhook_options).await.expect("the webhook starts as the operator");

    let source = RedisServer::start().unwrap();
    let target = RedisServer::with_config(RedisConfig::default().directive("requirepass", "s3cret")).unwrap();
    let manifest = format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: target-credentials}}
stringData: {{password: s3cret}}
---
apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {{name: source}}
spec: {{uri: \"{}\"}}
---
apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {{name: target}}
spec: {{uri: \"{}\", credentialsSecretRef: {{name: target-credentials}}}}
---
apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {{name: cache}}
spec:
  source: {{endpointRef: {{name: source}}}}
  target: {{endpointRef: {{name: target}}}}
  data: {{type: sync}}
  gateway: {{replicas: 1}}
",
        source.url(),
        target.url()
    );
    control_plane.apply_manifest(&app, &manifest).unwrap();

    let as_sidecar = control_plane.client_as(&sidecar).await.unwrap();
    let (applier, current) = Applier::new();
    let config_watch =
        tokio::spawn(applier.clone().watch_config_map(Api::namespaced(as_sidecar.clone(), &app), "eden-cache".into()));
    let lease = LeaseReporter::new(
        Api::namespaced(as_sidecar, &app),
        "gateway-0".into(),
        "cache".into(),
        current,
        applier.status(),
    );
    let acks = tokio::spawn(lease.run());

    let migrations: Api<Migration> = Api::namespaced(control_plane.client().await.unwrap(), &app);
    let (mut ready, mut last) = (false, None);
    for _ in 0..300 {
        last = migrations.get("cache").await.unwrap().status;
        ready = last.as_ref().is_some_and(|s| {
            s.phase == Some(Phase::Ready)
                && s.gateway.is_some()
                && s.sidecars.as_ref().is_some_and(|c| c.summary == "1/1" && c.configured_generation > 0)
        });
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "never Ready with a gateway and the sidecar's ack: {last:#?}");
    let admin = control_plane.client().await.unwrap();
    assert!(Api::<Deployment>::namespaced(admin.clone(), &app).get_opt("eden-cache-gateway").await.unwrap().is_some());
    // The webhook, as the operator, reads the Migration and its Endpoints for a pod that asks.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: app\n  annotations: {eden.io/inject: \"true\", \
               eden.io/migration: cache}\nspec:\n  containers: [{name: app, image: \"app:1\"}]\n";
    control_plane.apply_manifest(&app, pod).unwrap();
    let pod = Api::<Pod>::namespaced(admin.clone(), &app).get("app").await.unwrap();
    let init = pod.spec.unwrap().init_containers.unwrap_or_default();
    assert_eq!(init.first().map(|c| c.name.as_str()), Some("eden-sidecar"), "{:?}", pod.metadata.annotations);
    let describe = control_plane.run_kubectl(&["-n", &app, "describe", "migration", "cache"]).unwrap();
    for expected in ["PhaseChanged", "GatewayCreated", "StrategyPushed"] {
        assert!(describe.contains(expected), "the operator's Events lack {expected}:\n{describe}");
    }

    migrations.delete("cache", &DeleteParams::default()).await.unwrap();
    for _ in 0..100 {
        if migrations.get_opt("cache").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(migrations.get_opt("cache").await.unwrap().is_none(), "the finalizer did not finish");
    assert!(Api::<ConfigMap>::namespaced(admin.clone(), &app).get_opt("eden-cache").await.unwrap().is_none());
    assert!(Api::<Deployment>::namespaced(admin.clone(), &app).get_opt("eden-cache-gateway").await.unwrap().is_none());
    assert!(Api::<Service>::namespaced(admin, &app).get_opt("eden-cache").await.unwrap().is_none());

    acks.abort();
    config_watch.abort();
    webhook.abort();
    for controller in controllers {
        controller.abort();
    }
    election.abort();
    LeaderElector::new(Api::namespaced(as_operator, &system), "eden-operator-leader", "op-0", Timing::default())
        .release()
        .await
        .expect("the operator may release its own Lease");
}
