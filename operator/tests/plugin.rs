//! `kubectl eden`, found by kubectl on PATH, against a real API server: its verbs patch the
//! Migration, and one that does not apply yet is refused with the reason.

use std::path::Path;
use std::process::{Command, Output};

use eden_e2e::ControlPlane;
use eden_operator::crd::{Migration, WritePolicy};
use kube::Api;

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
