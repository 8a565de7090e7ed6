//! The Migration schema is enforced by the real API server: impossible values are refused at
//! `kubectl apply` with a message that names the problem, before the operator sees them.

use eden_e2e::ControlPlane;
use eden_operator::crd::{Migration, Phase, WriteModeKind, WritePolicy};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

const EXAMPLE: &str = include_str!("../../examples/migration.yaml");
const GATEWAY: &str = include_str!("../../examples/gateway.yaml");

/// `kubectl apply` of `manifest`; Ok(stdout) or Err(what kubectl printed).
fn apply(control_plane: &ControlPlane, namespace: &str, manifest: &str) -> Result<String, String> {
    control_plane.apply_manifest(namespace, manifest).map_err(|err| err.to_string())
}

async fn setup(prefix: &str) -> (&'static ControlPlane, String) {
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let namespace = control_plane.namespace(prefix).await.unwrap();
    (control_plane, namespace)
}

#[tokio::test]
async fn the_example_applies_and_reads_back_with_defaults_filled_in() {
    let (control_plane, namespace) = setup("mig-example").await;
    apply(control_plane, &namespace, EXAMPLE).unwrap();
    let minimal = EXAMPLE.replace("name: shop-cache", "name: minimal");
    let minimal = &minimal[..minimal.find("  strategy:").unwrap()];
    apply(control_plane, &namespace, minimal).unwrap();

    let migrations: Api<Migration> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);
    let example = migrations.get("shop-cache").await.unwrap();
    assert_eq!(example.spec.strategy.read_percentage, 10);
    assert_eq!(example.spec.strategy.write_mode.policy, Some(WritePolicy::OldAuthoritative));

    let minimal = migrations.get("minimal").await.unwrap();
    assert_eq!(minimal.spec.strategy.read_percentage, 0, "no reads move until asked");
    assert_eq!(minimal.spec.strategy.write_mode.mode, WriteModeKind::DualWrite);
    assert!(minimal.spec.cutover.require_verification, "verification is required by default");
}

#[tokio::test]
async fn impossible_values_are_refused_with_a_message_that_names_them() {
    let (control_plane, namespace) = setup("mig-invalid").await;
    let cases = [
        ("readPercentage: 10", "readPercentage: 150", "spec.strategy.readPercentage"),
        ("shadowReadPercentage: 5", "shadowReadPercentage: -1", "spec.strategy.shadowReadPercentage"),
        ("endpointRef: {name: target}", "endpointRef: {name: source}", "source and target must be different Endpoints"),
        (
            "policy: oldAuthoritative",
            "policy: oldAuthoritative\n      writePercentage: 50",
            "writePercentage applies to mode cutover only",
        ),
        ("mode: dualWrite", "mode: sometimes", "spec.strategy.writeMode.mode"),
        ("type: sync", "type: rsync", "spec.data.type"),
        ("type: sync", "type: sync\n    sourceOpsPerSecond: 500", "sourceOpsPerSecond applies to type scan only"),
        ("type: sync", "type: scan\n    targetOpsPerSecond: 0", "spec.data.targetOpsPerSecond"),
        ("maxWritePauseMillis: 2000", "maxWritePauseMillis: 0", "spec.cutover.maxWritePauseMillis"),
    ];
    for (from, to, expected) in cases {
        assert!(EXAMPLE.contains(from), "the example has {from}");
        let manifest = EXAMPLE.replace(from, to);
        let refused = apply(control_plane, &namespace, &manifest).expect_err(&format!("{to} must be refused"));
        assert!(refused.contains(expected), "refusing `{to}` should mention {expected:?}: {refused}");
    }
    let migrations: Api<Migration> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);
    assert!(migrations.list(&Default::default()).await.unwrap().items.is_empty(), "nothing invalid was stored");
}

#[tokio::test]
async fn endpoints_are_editable_while_pending_and_frozen_once_syncing() {
    let (control_plane, namespace) = setup("mig-immutable").await;
    apply(control_plane, &namespace, EXAMPLE).unwrap();
    let retargeted = EXAMPLE.replace("endpointRef: {name: target}", "endpointRef: {name: other}");

    let migrations: Api<Migration> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);
    let set_phase = |phase: Phase| {
        let patch = json!({"status": {"phase": phase}});
        let migrations = migrations.clone();
        async move {
            migrations.patch_status("shop-cache", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
    };

    set_phase(Phase::Pending).await;
    apply(control_plane, &namespace, &retargeted).expect("the target may change before syncing starts");
    apply(control_plane, &namespace, EXAMPLE).unwrap();

    set_phase(Phase::Syncing).await;
    let refused = apply(control_plane, &namespace, &retargeted).expect_err("the target is frozen while syncing");
    assert!(refused.contains("cannot change once the migration has started syncing"), "{refused}");
    apply(control_plane, &namespace, &EXAMPLE.replace("readPercentage: 10", "readPercentage: 50"))
        .expect("the strategy stays editable while syncing");

    let completed = format!("{EXAMPLE}  complete: true\n");
    apply(control_plane, &namespace, &completed).unwrap();
    let refused = apply(control_plane, &namespace, EXAMPLE.trim_end()).expect_err("complete cannot be unset");
    assert!(refused.contains("complete cannot be undone"), "{refused}");
}

#[tokio::test]
async fn the_gateway_example_applies_and_bad_gateways_are_refused() {
    let (control_plane, namespace) = setup("mig-gateway").await;
    apply(control_plane, &namespace, GATEWAY).unwrap();
    let minimal = GATEWAY.replace("name: shop-sessions", "name: minimal");
    let minimal = format!("{}  gateway: {{}}\n", &minimal[..minimal.find("  gateway:").unwrap()]);
    apply(control_plane, &namespace, &minimal).unwrap();
    let migrations: Api<Migration> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);
    let gateway = migrations.get("minimal").await.unwrap().spec.gateway.expect("a gateway");
    assert_eq!((gateway.replicas, gateway.port, gateway.service_name), (2, 6379, None));

    let cases = [
        ("replicas: 2", "replicas: 0", "spec.gateway.replicas"),
        ("replicas: 2", "replicas: 21", "spec.gateway.replicas"),
        ("port: 6379", "port: 9090", "port 9090 is the proxy's admin port"),
        ("port: 6379", "port: 70000", "spec.gateway.port"),
        ("serviceName: shop-redis", "serviceName: Shop_Redis", "spec.gateway.serviceName"),
    ];
    for (from, to, expected) in cases {
        let refused =
            apply(control_plane, &namespace, &GATEWAY.replace(from, to)).expect_err(&format!("{to} must be refused"));
        assert!(refused.contains(expected), "refusing `{to}` should mention {expected:?}: {refused}");
    }
    // Without serviceName the Service is eden-<migration>, which must be a DNS label too.
    let dotted =
        GATEWAY.replace("name: shop-sessions", "name: shop.sessions").replace("    serviceName: shop-redis\n", "");
    let refused = apply(control_plane, &namespace, &dotted).expect_err("eden-shop.sessions is no Service name");
    assert!(refused.contains("set spec.gateway.serviceName"), "{refused}");
}
