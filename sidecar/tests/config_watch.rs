//! Strategy changes reach the sidecar through a real API server (and a file), bad payloads are
//! rejected while the last good configuration stays in force, and the Lease tells the operator
//! what was applied.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eden_e2e::ControlPlane;
use eden_sidecar::config::{Applier, CurrentConfig, EdenConfig, PAYLOAD_KEY};
use eden_sidecar::lease::{
    ANNOTATION_CONFIG_ERROR, ANNOTATION_GENERATION, ANNOTATION_WRITES, LABEL_MIGRATION, LeaseReporter,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use support::wait_for_lease;

fn payload(generation: u64, read_percentage: &str, writes: &str) -> String {
    format!(
        "generation: {generation}\nmigration: shop/cache\nsource: {{uri: 'redis://127.0.0.1:6379'}}\n\
         target: {{uri: 'redis://127.0.0.1:6380'}}\nread_percentage: {read_percentage}\nwrites: {writes}\n"
    )
}

/// Waits until the configuration in force satisfies `done`.
async fn wait_for(current: &mut CurrentConfig, done: impl Fn(&EdenConfig) -> bool) -> Arc<EdenConfig> {
    let config = tokio::time::timeout(Duration::from_secs(10), current.wait_for(|c| c.as_deref().is_some_and(&done)))
        .await
        .expect("the configuration arrived within 10s")
        .expect("the applier is alive");
    config.clone().unwrap()
}

async fn set_payload(config_maps: &Api<ConfigMap>, text: String) {
    let patch = serde_json::json!({"data": {PAYLOAD_KEY: text}});
    config_maps.patch("eden-cache", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
}

#[tokio::test]
async fn config_map_changes_apply_live_and_bad_payloads_are_rejected() {
    let control_plane = ControlPlane::shared();
    let namespace = control_plane.namespace("sidecar-config").await.unwrap();
    let client = control_plane.client().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let config_map = ConfigMap {
        metadata: ObjectMeta { name: Some("eden-cache".into()), ..Default::default() },
        data: Some(BTreeMap::from([(PAYLOAD_KEY.to_string(), payload(1, "0", "flowing"))])),
        ..Default::default()
    };
    config_maps.create(&PostParams::default(), &config_map).await.unwrap();

    let (applier, mut current) = Applier::new();
    let status = applier.status();
    tokio::spawn(applier.clone().watch_config_map(config_maps.clone(), "eden-cache".into()));
    assert_eq!(wait_for(&mut current, |c| c.generation == 1).await.read_percentage, 0);

    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let reporter =
        LeaseReporter::new(leases.clone(), "app-7f9c".into(), "cache".into(), applier.subscribe(), status.clone());
    let lease_name = reporter.lease_name();
    tokio::spawn(reporter.run());

    set_payload(&config_maps, payload(2, "25", "paused")).await;
    let applied = wait_for(&mut current, |c| c.generation == 2).await;
    assert_eq!(applied.read_percentage, 25);

    let lease = wait_for_lease(&leases, &lease_name, |a| a[ANNOTATION_GENERATION] == "2").await;
    let annotations = lease.metadata.annotations.unwrap();
    assert_eq!(annotations[ANNOTATION_WRITES], "paused");
    assert!(!annotations.contains_key(ANNOTATION_CONFIG_ERROR));
    assert_eq!(lease.metadata.labels.unwrap()[LABEL_MIGRATION], "cache");
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("app-7f9c"));

    for (broken, expected_error) in [
        ("generation: [unclosed\n".to_string(), "not valid"),
        (payload(3, "150", "flowing"), "read_percentage is 150"),
        (payload(1, "0", "flowing"), "generations only go forward"),
        (payload(2, "99", "paused"), "a new generation for a changed strategy"),
    ] {
        let rejected_before = status.rejected_total();
        set_payload(&config_maps, broken).await;
        tokio::time::timeout(Duration::from_secs(10), async {
            while status.rejected_total() == rejected_before {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the broken payload was seen and rejected");
        assert_eq!(current.borrow().as_ref().unwrap().generation, 2, "the last good configuration stays in force");
        assert!(status.last_error().unwrap().contains(expected_error), "{:?}", status.last_error());
        // A rejection changes no configuration; it reaches the Lease at once all the same.
        let reported =
            |a: &BTreeMap<String, String>| a.get(ANNOTATION_CONFIG_ERROR).is_some_and(|e| e.contains(expected_error));
        let lease = wait_for_lease(&leases, &lease_name, reported).await;
        assert_eq!(
            lease.metadata.annotations.unwrap()[ANNOTATION_GENERATION],
            "2",
            "the applied generation is unchanged"
        );
    }

    set_payload(&config_maps, payload(4, "75", "flowing")).await;
    assert_eq!(wait_for(&mut current, |c| c.generation == 4).await.read_percentage, 75);
    let lease = wait_for_lease(&leases, &lease_name, |a| a[ANNOTATION_GENERATION] == "4").await;
    assert!(
        !lease.metadata.annotations.unwrap().contains_key(ANNOTATION_CONFIG_ERROR),
        "a good payload clears the error"
    );
}

#[tokio::test]
async fn the_file_fallback_applies_changes_and_keeps_the_last_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eden.yaml");
    std::fs::write(&path, payload(1, "5", "flowing")).unwrap();

    let (applier, mut current) = Applier::new();
    let status = applier.status();
    tokio::spawn(applier.watch_file(path.clone(), Duration::from_millis(20)));
    assert_eq!(wait_for(&mut current, |c| c.generation == 1).await.read_percentage, 5);

    std::fs::write(&path, "read_percentage: lots\n").unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while status.rejected_total() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the broken file was rejected");
    assert_eq!(current.borrow().as_ref().unwrap().generation, 1);

    std::fs::write(&path, payload(2, "100", "flowing")).unwrap();
    assert_eq!(wait_for(&mut current, |c| c.generation == 2).await.read_percentage, 100);
    assert_eq!(status.applied_generation(), 2);
}
