//! `kubectl eden`, found by kubectl on PATH, against a real API server: its verbs patch the
//! Migration, one that does not apply yet is refused with the reason, and `status` and `list`
//! show what the Migration, its Events and its sidecars' Leases say.

use std::path::Path;
use std::process::{Command, Output};

use eden_e2e::ControlPlane;
use eden_operator::crd::{Migration, WritePolicy};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::SignedDuration;
use k8s_openapi::jiff::tz::TimeZone;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

/// The README's example: a dual-write Migration with 10% of reads on the target.
const MANIFEST: &str = include_str!("../../examples/migration.yaml");

fn kubectl_eden(control_plane: &ControlPlane, namespace: &str, args: &[&str]) -> Output {
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-eden")).parent().unwrap();
    let path = format!("{}:{}", plugin_dir.display(), std::env::var("PATH").unwrap_or_default());
    // kubectl takes no flags before a plugin's name: the kubeconfig goes in the environment, which
    // the plugin reads too.
    Command::new("kubectl")
        .env("KUBECONFIG", control_plane.kubeconfig())
        .env("PATH", path)
        .args(["eden", "-n", namespace])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_verbs_patch_the_migration_and_refuse_what_does_not_apply_yet() {
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let namespace = control_plane.namespace("plugin").await.unwrap();
    control_plane.apply_manifest(&namespace, MANIFEST).unwrap();
    let migrations: Api<Migration> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);

    let cutover = kubectl_eden(control_plane, &namespace, &["cutover", "shop-cache"]);
    assert!(cutover.status.success(), "{}", String::from_utf8_lossy(&cutover.stderr));
    let spec = migrations.get("shop-cache").await.unwrap().spec;
    assert_eq!(spec.strategy.write_mode.policy, Some(WritePolicy::NewAuthoritative));
    assert_eq!(spec.strategy.read_percentage, 10, "the rest of the spec is as it was");

    // No operator runs here, so the Migration has no phase yet: not cut over.
    let complete = kubectl_eden(control_plane, &namespace, &["complete", "shop-cache"]);
    assert!(!complete.status.success());
    let stderr = String::from_utf8_lossy(&complete.stderr);
    assert!(stderr.contains("applies only once Migration shop-cache is CutOver"), "{stderr}");
    assert!(!migrations.get("shop-cache").await.unwrap().spec.complete);

    let rollback = kubectl_eden(control_plane, &namespace, &["rollback", "shop-cache", "--accept-lost-writes", "2"]);
    assert!(rollback.status.success(), "{}", String::from_utf8_lossy(&rollback.stderr));
    let migration = migrations.get("shop-cache").await.unwrap();
    assert_eq!(migration.spec.strategy.write_mode.policy, Some(WritePolicy::OldAuthoritative));
    assert_eq!(migration.spec.strategy.read_percentage, 0);
    assert_eq!(migration.metadata.annotations.unwrap()["eden.io/accept-lost-writes"], "2");

    let missing = kubectl_eden(control_plane, &namespace, &["pause", "nonexistent"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no Migration nonexistent"));
}

/// `status`, `list` and `set-read` against the real API server: a Migration the operator would
/// have reported on, its Events and two sidecars' Leases, one of them behind.
#[tokio::test]
async fn status_shows_the_path_the_sidecars_behind_and_what_to_do_next_and_set_read_moves_reads() {
    let control_plane = ControlPlane::shared();
    control_plane.install_eden_crds().unwrap();
    let namespace = control_plane.namespace("plugin-status").await.unwrap();
    control_plane.apply_manifest(&namespace, MANIFEST).unwrap();
    let client = control_plane.client().await.unwrap();
    let migrations: Api<Migration> = Api::namespaced(client.clone(), &namespace);
    let migration = migrations.get("shop-cache").await.unwrap();
    let created = migration.metadata.creation_timestamp.clone().unwrap().0;
    let status = json!({"status": {
        "phase": "Ready", "readyForCutover": true, "replicationLagMillis": 3,
        "sidecars": {"live": 2, "acknowledged": 1, "fenced": 0, "configuredGeneration": 4, "summary": "1/2"},
        "lastVerification": {"checked": 1000, "missing": 0, "extra": 0, "mismatched": 0, "kept": 0},
    }});
    migrations.patch_status("shop-cache", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();
    let at = |seconds: i64| created + SignedDuration::from_secs(seconds);
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    for (phase, seconds) in [("Syncing", 1), ("Ready", 270)] {
        let event: Event = serde_json::from_value(json!({
            "metadata": {"name": format!("shop-cache.{}", phase.to_lowercase())},
            "eventTime": MicroTime(at(seconds)), "reason": "PhaseChanged", "action": format!("To{phase}"),
            "type": "Normal", "reportingController": "eden.io/operator", "reportingInstance": "test",
            "regarding": {"apiVersion": "eden.io/v1alpha1", "kind": "Migration", "name": "shop-cache",
                          "namespace": namespace, "uid": migration.metadata.uid},
        }))
        .unwrap();
        events.create(&PostParams::default(), &event).await.unwrap();
    }
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    for (pod, generation) in [("app-0", "4"), ("app-1", "3")] {
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": format!("eden-sidecar-{pod}"), "labels": {"eden.io/migration": "shop-cache"},
                         "annotations": {"eden.io/applied-generation": generation}},
            "spec": {"holderIdentity": pod},
        }))
        .unwrap();
        leases.create(&PostParams::default(), &lease).await.unwrap();
    }

    let now = at(360).to_string();
    let shown = kubectl_eden(control_plane, &namespace, &["status", "shop-cache", "--now", &now]);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let clock = |seconds| at(seconds).to_zoned(TimeZone::UTC).strftime("%H:%M:%SZ").to_string();
    assert_eq!(
        String::from_utf8_lossy(&shown.stdout),
        format!(
            "Migration {namespace}/shop-cache
  Phase      Ready, for 1m30s
  Path       Pending {} → Syncing {} → Ready {}
  Lag        3 ms (guard 100 ms)
  Verified   1,000 keys checked: no differences
  Sidecars   2 live, 1 applied generation 4, 0 fenced; behind: app-1 (on 3)
  Traffic    reads 10% on the target; writes to both sides, the source answering
  Next       kubectl eden set-read shop-cache <percent> to move reads, or kubectl eden cutover shop-cache
",
            clock(0),
            clock(1),
            clock(270)
        ),
        "piped: no colour"
    );
    let as_json = kubectl_eden(control_plane, &namespace, &["status", "shop-cache", "-o", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&as_json.stdout).unwrap();
    assert_eq!(
        (report["phase"].as_str(), report["sidecars"]["behind"][0]["pod"].as_str()),
        (Some("Ready"), Some("app-1"))
    );

    let listed = kubectl_eden(control_plane, &namespace, &["list", "--now", &now]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "NAME         PHASE   FOR     COPY   LAG   SIDECARS   READS\nshop-cache   Ready   1m30s   -      3ms   1/2        10%\n"
    );

    let set_read = kubectl_eden(control_plane, &namespace, &["set-read", "shop-cache", "50"]);
    assert!(set_read.status.success(), "{}", String::from_utf8_lossy(&set_read.stderr));
    assert_eq!(migrations.get("shop-cache").await.unwrap().spec.strategy.read_percentage, 50);
    let too_many = kubectl_eden(control_plane, &namespace, &["set-read", "shop-cache", "150"]);
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("0 to 100, not 150"));
    assert_eq!(migrations.get("shop-cache").await.unwrap().spec.strategy.read_percentage, 50, "unchanged");
}
