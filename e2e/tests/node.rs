//! Eden as users run it, on a real node (`eden_e2e::Node`): the project's images, packed from
//! this build and imported into containerd, installed with `helm install`; the operator in two
//! pods with their ServiceAccount's token, its webhook called through its Service, the sidecar
//! injected as a native sidecar the kubelet starts before the application, and a Migration
//! between two Redis pods driven through its whole journey (copy, read canary, cutover,
//! rollback, cutover, complete) while the application's pods write through `127.0.0.1` (and one
//! without a sidecar through the Migration's gateway, by its Service's DNS name), with
//! the faults users meet on the way: the leading operator pod deleted mid-copy, a sidecar
//! container killed, the operator rolled by `helm upgrade`. The writers are the fault suite's
//! ([`eden_e2e::writers`]), so the end is checked the same way: every write a client saw
//! acknowledged, on the server authoritative at the end, exactly once. Every namespace enforces
//! the `restricted` Pod Security Standard.

use std::path::Path;
use std::time::Duration;

use eden_e2e::node::TOOLS_IMAGE;
use eden_e2e::shop::{self, INJECT, pod};
use eden_e2e::writers::target_reads;
use eden_e2e::{Helm, Node, eventually};
use eden_operator::crd::{Migration, Phase};
use serde_json::Value;

/// The application's pods; the sidecar of the second is killed on the way.
const APPS: [&str; 2] = ["app-0", "app-1"];
/// A pod of the application without a sidecar, which reaches the Migration's gateway through
/// its Service's DNS name.
const GATEWAY_APP: &str = "gateway-app";
/// Proxies that follow the strategy: the two injected sidecars and the gateway's one replica.
const PROXIES: i32 = 3;
/// Lists on the source before the copy: at its pace, about 10 s to copy, long enough to
/// delete the leading operator pod in the middle of it.
const PRELOADED: u64 = 20_000;
const PATIENCE: Duration = Duration::from_secs(180);

fn json(node: &Node, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&node.run_kubectl(&all).unwrap()).unwrap()
}

/// The image runs as user 65532, which its passwd names, and holds the binary, the libraries it
/// links, the CA bundle and the name-service files: nothing else.
fn assert_holds_only_what_it_needs(archive: &Path, binary: &str) {
    let layout = tempfile::tempdir().unwrap();
    let tar = |args: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new("tar").args(args).current_dir(layout.path()).output().unwrap();
        assert!(output.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    tar(&["xf".as_ref(), archive.as_os_str()]);
    let blob = |digest: &Value| {
        layout.path().join("blobs/sha256").join(digest.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let read = |digest: &Value| -> Value { serde_json::from_slice(&std::fs::read(blob(digest)).unwrap()).unwrap() };
    let index: Value = serde_json::from_slice(&std::fs::read(layout.path().join("index.json")).unwrap()).unwrap();
    let manifest = read(&index["manifests"][0]["digest"]);
    let config = read(&manifest["config"]["digest"]);
    assert_eq!(config["config"]["User"], "65532:65532", "{binary} runs as the chart's non-root user");
    let layer = blob(&manifest["layers"][0]["digest"]);
    let listing = tar(&["tzf".as_ref(), layer.as_os_str()]);
    let files: Vec<&str> = listing.lines().filter(|path| !path.ends_with('/')).collect();
    let program = format!("usr/local/bin/{binary}");
    for needed in [program.as_str(), "etc/ssl/certs/ca-certificates.crt", "etc/passwd"] {
        assert!(files.contains(&needed), "{binary}'s image lacks {needed}: {files:?}");
    }
    let name_service = ["etc/passwd", "etc/group", "etc/nsswitch.conf", "etc/ssl/certs/ca-certificates.crt"];
    let library = |path: &str| (path.starts_with("lib") || path.starts_with("usr/lib")) && path.contains(".so");
    let extra: Vec<&&str> =
        files.iter().filter(|path| **path != program && !name_service.contains(path) && !library(path)).collect();
    assert!(extra.is_empty(), "{binary}'s image holds more than it needs: {extra:?}");
    let passwd = tar(&["xzOf".as_ref(), layer.as_os_str(), "etc/passwd".as_ref()]);
    assert!(passwd.lines().any(|line| line.contains(":65532:65532:")), "{passwd}");
}

/// When the test fails, what a person would look at next: the pods, the Migration, the
/// operator's log and the namespaces' Events.
struct ShowOnFailure<'a> {
    node: &'a Node,
    system: &'a str,
    apps: &'a str,
}

impl Drop for ShowOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = format!("--namespace={}", self.system);
        for args in [
            &["get", "pods", "--all-namespaces", "-o", "wide"][..],
            &["get", "migrations.eden.io,endpoints.eden.io", "-n", self.apps, "-o", "yaml"],
            &["logs", &logs, "deployment/eden-operator", "--tail=100"],
            &["get", "events", "-n", self.apps],
            &["get", "events", "-n", self.system],
        ] {
            let shown = self.node.run_kubectl(args).unwrap_or_else(|err| err.to_string());
            eprintln!("kubectl {}:\n{shown}", args.join(" "));
        }
    }
}

fn migration(node: &Node, namespace: &str) -> Migration {
    serde_json::from_value(json(node, &["get", "-n", namespace, "migration/cache"])).unwrap()
}

/// Waits until the Migration satisfies `done`, and returns it.
fn wait_for(node: &Node, namespace: &str, what: &str, done: impl Fn(&Migration) -> bool) -> Migration {
    eventually(what, PATIENCE, || Some(migration(node, namespace)).filter(&done))
        .unwrap_or_else(|err| panic!("{err}: {:#?}", migration(node, namespace).status))
}

fn wait_phase(node: &Node, namespace: &str, phase: Phase) -> Migration {
    wait_for(node, namespace, &format!("phase {phase:?}"), |m| m.status.as_ref().and_then(|s| s.phase) == Some(phase))
}

/// Merge-patches the Migration's spec with `spec` (JSON).
fn patch(node: &Node, namespace: &str, spec: &str) {
    let patch = format!("{{\"spec\":{spec}}}");
    node.run_kubectl(&["patch", "-n", namespace, "migration/cache", "--type=merge", "-p", &patch]).unwrap();
}

/// Waits until every sidecar and the gateway have applied the strategy the operator pushed
/// last, which `settled` accepts (the ConfigMap's `eden.yaml`).
fn wait_applied(node: &Node, namespace: &str, what: &str, settled: impl Fn(&str) -> bool) {
    let generation = eventually(what, PATIENCE, || {
        let payload = node
            .run_kubectl(&["get", "-n", namespace, "configmap/eden-cache", "-o", "jsonpath={.data.eden\\.yaml}"])
            .unwrap();
        let generation = payload.lines().find_map(|line| line.strip_prefix("generation: ")?.parse::<i64>().ok());
        generation.filter(|_| settled(&payload))
    })
    .unwrap();
    wait_for(node, namespace, &format!("{what}, applied by every sidecar"), |m| {
        let sidecars = m.status.as_ref().and_then(|s| s.sidecars.as_ref());
        sidecars.is_some_and(|s| s.configured_generation >= generation && s.acknowledged == PROXIES)
    });
}

/// The holder of the operator's leader-election Lease.
fn leader(node: &Node, system: &str) -> String {
    node.run_kubectl(&["get", "-n", system, "lease/eden-operator-leader", "-o", "jsonpath={.spec.holderIdentity}"])
        .unwrap()
}

/// The IP address of pod `name`.
fn pod_ip(node: &Node, namespace: &str, name: &str) -> String {
    json(node, &["get", "-n", namespace, "pod", name])["status"]["podIP"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn helm_installs_eden_and_a_migration_goes_its_whole_way_under_writing_pods_through_faults() {
    // The images are packed while the node comes up.
    let out = tempfile::tempdir().unwrap();
    let packing = std::thread::spawn({
        let out = out.path().to_path_buf();
        move || shop::pack_images(&out).unwrap()
    });
    let node = Node::shared();
    let archives = packing.join().unwrap();
    for (archive, binary) in archives.iter().zip(["eden-operator", "eden-sidecar"]) {
        assert_holds_only_what_it_needs(archive, binary);
    }
    for archive in &archives {
        node.import_image(archive).unwrap();
    }
    let system = node.restricted_namespace("eden-system").await.unwrap();
    let apps = node.restricted_namespace("shop").await.unwrap();
    let _show = ShowOnFailure { node, system: &system, apps: &apps };

    // The operator in two pods (the chart's default), with their ServiceAccount's token;
    // opted-in pods are refused while no replica answers.
    let helm = Helm::find().unwrap();
    let values = ["webhook.failurePolicy=fail", &format!("sidecarNamespaces={{{apps}}}")];
    helm.install_eden(node.kubeconfig(), &system, &values).unwrap();
    node.run_kubectl(&["-n", &system, "rollout", "status", "deployment/eden-operator", "--timeout=180s"]).unwrap();
    eventually("the webhook's caBundle", Duration::from_secs(60), || {
        let configuration = json(node, &["get", "mutatingwebhookconfiguration", "eden-sidecar-injector"]);
        configuration["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|ca| !ca.is_empty()).then_some(())
    })
    .unwrap();

    shop::start_redis_servers(node, &apps, PRELOADED).unwrap();

    // The application's pods write from the moment their sidecars have a strategy, through the
    // copy and everything after.
    node.apply_manifest(&apps, &shop::endpoints_and_migration(&apps)).unwrap();
    for name in APPS {
        node.apply_manifest(&apps, &shop::writer(name, INJECT, None)).unwrap();
    }

    // The leading replica's pod is deleted mid-copy: the other takes the Lease over and resumes
    // the copy from the checkpoint in the Migration's status.
    wait_for(node, &apps, "the copy under way", |m| {
        let progress = m.status.as_ref().and_then(|s| s.progress.as_ref());
        progress.is_some_and(|p| p.keys_copied > 0 && p.keys_copied < p.keys_total)
    });
    let deleted = leader(node, &system);
    node.run_kubectl(&["delete", "-n", &system, "pod", &deleted, "--wait=false"]).unwrap();
    let successor = eventually("another leader", Duration::from_secs(60), || {
        Some(leader(node, &system)).filter(|holder| !holder.is_empty() && *holder != deleted)
    })
    .unwrap();
    // Ready only once verified (a difference a live write made is checked again alone).
    let ready = wait_phase(node, &apps, Phase::Ready);
    let verified = ready.status.unwrap().last_verification.unwrap();
    assert_eq!((verified.missing, verified.extra, verified.mismatched), (0, 0, 0), "{verified:?}");
    let events = json(node, &["get", "events", "-n", &apps, "--field-selector", "reason=ReplicationStarted"]);
    let resumed = events["items"].as_array().unwrap().iter().any(|event| event["action"] == "Resume");
    assert!(resumed, "{successor} did not resume from the checkpoint: {events:#}");

    // The webhook made each sidecar a native one, and the kubelet started the application only
    // once its startup probe passed.
    let pods: Vec<String> = APPS.iter().map(|name| format!("pod/{name}")).collect();
    let mut wait = vec!["wait", "-n", &apps, "--for=condition=Ready", "--timeout=180s"];
    wait.extend(pods.iter().map(String::as_str));
    node.run_kubectl(&wait).unwrap();
    let app = json(node, &["get", "-n", &apps, "pod", APPS[0]]);
    let sidecar = &app["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "eden-sidecar", "{app:#}");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["securityContext"]["readOnlyRootFilesystem"], true);
    assert!(sidecar["startupProbe"].is_object(), "{sidecar:#}");
    let sidecar_status = &app["status"]["initContainerStatuses"][0];
    assert_eq!(sidecar_status["started"], true, "{sidecar_status:#}");
    let sidecar_started = sidecar_status["state"]["running"]["startedAt"].as_str().unwrap();
    let app_started = app["status"]["containerStatuses"][0]["state"]["running"]["startedAt"].as_str().unwrap();
    assert!(
        sidecar_started <= app_started,
        "the sidecar started at {sidecar_started}, the application at {app_started}"
    );

    // The gateway's Service, by its DNS name, for a pod that has no sidecar.
    node.run_kubectl(&["-n", &apps, "rollout", "status", "deployment/eden-cache-gateway", "--timeout=180s"]).unwrap();
    let gateway = format!("eden-cache.{apps}.svc.cluster.local:6379");
    node.apply_manifest(&apps, &shop::writer(GATEWAY_APP, "", Some(&gateway))).unwrap();
    let pod_name = format!("pod/{GATEWAY_APP}");
    node.run_kubectl(&["wait", "-n", &apps, "--for=condition=Ready", &pod_name, "--timeout=180s"]).unwrap();

    // The read canary, in two steps, each applied by every proxy; the target serves reads.
    for percent in [25, 50] {
        patch(node, &apps, &format!("{{\"strategy\":{{\"readPercentage\":{percent}}}}}"));
        let line = format!("read_percentage: {percent}");
        wait_applied(node, &apps, &format!("reads {percent}% on the target"), |payload| payload.contains(&line));
    }
    let admins: Vec<String> =
        APPS.iter().map(|name| format!("{}:{}", pod_ip(node, &apps, name), eden_operator::proxy::ADMIN_PORT)).collect();
    eventually("reads served by the target", Duration::from_secs(60), || {
        (admins.iter().map(|admin| target_reads(admin.as_str())).sum::<u64>() > 0).then_some(())
    })
    .unwrap();

    // A sidecar container killed: the kubelet starts it again, and its application's clients
    // connect again.
    let killed = json(node, &["get", "-n", &apps, "pod", APPS[1]]);
    node.kill_container(killed["status"]["initContainerStatuses"][0]["containerID"].as_str().unwrap()).unwrap();
    eventually("the killed sidecar started again", Duration::from_secs(60), || {
        let status = json(node, &["get", "-n", &apps, "pod", APPS[1]])["status"]["initContainerStatuses"][0].clone();
        (status["restartCount"].as_u64() >= Some(1) && status["ready"] == true).then_some(())
    })
    .unwrap();

    // Cutover, rollback, the operator rolled by `helm upgrade` (a value changed), cutover again
    // under the new pods, complete.
    let cutover = r#"{"strategy":{"writeMode":{"mode":"dualWrite","policy":"newAuthoritative"}}}"#;
    patch(node, &apps, cutover);
    wait_phase(node, &apps, Phase::CutOver);
    patch(
        node,
        &apps,
        r#"{"strategy":{"readPercentage":0,"writeMode":{"mode":"dualWrite","policy":"oldAuthoritative"}}}"#,
    );
    wait_phase(node, &apps, Phase::RolledBack);
    let before_upgrade = json(node, &["get", "-n", &system, "pods", "-o", "name"]);
    helm.upgrade_eden(node.kubeconfig(), &system, &["operator.logFormat=text"]).unwrap();
    node.run_kubectl(&["-n", &system, "rollout", "status", "deployment/eden-operator", "--timeout=180s"]).unwrap();
    assert_ne!(
        json(node, &["get", "-n", &system, "pods", "-o", "name"]),
        before_upgrade,
        "the upgrade rolled the operator"
    );
    patch(node, &apps, cutover);
    wait_phase(node, &apps, Phase::CutOver);
    patch(node, &apps, r#"{"complete":true}"#);
    wait_phase(node, &apps, Phase::Completed);

    // Every write each application's clients saw acknowledged is on the target, once, in order;
    // no read went back in time; only the killed sidecar's clients had to connect again.
    let target = redis::Client::open(format!("redis://{}:6379", pod_ip(node, &apps, "redis-target"))).unwrap();
    let mut target = target.get_multiplexed_async_connection().await.unwrap();
    let preloaded = shop::preloaded_on(&mut target, PRELOADED).await.unwrap();
    assert_eq!(preloaded, PRELOADED, "the lists on the source before the copy, on the target");
    for name in APPS.into_iter().chain([GATEWAY_APP]) {
        let acknowledged = shop::stop_writer(node, &apps, name).unwrap();
        acknowledged.assert_exact_on(name, &mut target).await;
        assert_eq!(acknowledged.refused, 0, "{name}: a sidecar in touch only ever held writes");
        assert_eq!(acknowledged.reconnects > 0, name == APPS[1], "{name}: {} reconnects", acknowledged.reconnects);
        let app = json(node, &["get", "-n", &apps, "pod", name]);
        assert_eq!(app["status"]["containerStatuses"][0]["restartCount"], 0, "{name}'s writer never failed");
    }

    // With failurePolicy fail and no operator replica answering, only the pods that opted in
    // are refused.
    node.run_kubectl(&["delete", "-n", &apps, "migration/cache", "--timeout=60s"]).unwrap();
    node.run_kubectl(&["scale", "-n", &system, "deployment/eden-operator", "--replicas=0"]).unwrap();
    eventually("the operator's pods to go", Duration::from_secs(60), || {
        let pods = node.run_kubectl(&["get", "pods", "-n", &system, "-o", "name"]).unwrap();
        pods.trim().is_empty().then_some(())
    })
    .unwrap();
    let unrelated = node.restricted_namespace("unrelated").await.unwrap();
    let sleeper = r#"[busybox, sleep, 1d]"#;
    node.apply_manifest(&unrelated, &pod("plain", TOOLS_IMAGE, "", sleeper)).unwrap();
    let refused = node.apply_manifest(&unrelated, &pod("asks", TOOLS_IMAGE, INJECT, sleeper)).unwrap_err();
    assert!(refused.to_string().contains("failed calling webhook \"inject.eden.io\""), "{refused}");

    // The webhook configuration belongs to the release.
    helm.uninstall_eden(node.kubeconfig(), &system).unwrap();
    let left = node.run_kubectl(&["get", "mutatingwebhookconfigurations", "-o", "name"]).unwrap();
    assert!(!left.contains("eden"), "left behind by helm uninstall: {left}");
}
