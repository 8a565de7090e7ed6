//! Eden as users run it, on a real node (`eden_e2e::Node`): the project's images, packed from
//! this build and imported into containerd, installed with `helm install`; the operator in a pod
//! with its ServiceAccount token, its webhook called through its Service, the sidecar injected
//! as a native sidecar the kubelet starts before the application, and a Migration between two
//! Redis pods driven through cutover by the operator while the application writes through
//! `127.0.0.1`. Every namespace enforces the `restricted` Pod Security Standard.

use std::path::{Path, PathBuf};
use std::time::Duration;

use eden_e2e::node::TOOLS_IMAGE;
use eden_e2e::{Helm, Node, eventually};
use serde_json::Value;

/// The application: numbered writes (`RPUSH writes <n>`) through the sidecar on 127.0.0.1 until
/// the key `stop` is set, each checked against the list's length in the reply, so a write lost,
/// applied twice or served from a server behind shows at once. Then it says how many it wrote.
const WRITER: &str = r#"i=0
while [ "$(redis-cli get stop)" != 1 ]; do
  i=$((i+1))
  reply=$(redis-cli rpush writes $i)
  if [ "$reply" != "$i" ]; then echo "write $i answered '$reply'"; exit 1; fi
  busybox sleep 0.05
done
echo "wrote $i"
exec busybox sleep 1d"#;

/// A restricted pod's security settings (the injected sidecar brings its own for its container).
const POD_SECURITY: &str =
    "securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}";
const CONTAINER_SECURITY: &str = "securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}";

/// A pod of the tools image running `command` (a YAML flow sequence), with `annotations` (the
/// inside of a YAML flow mapping).
fn pod(name: &str, annotations: &str, command: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {name}}}, annotations: {{{annotations}}}}}
spec:
  terminationGracePeriodSeconds: 1
  {POD_SECURITY}
  containers:
  - name: app
    image: {TOOLS_IMAGE}
    imagePullPolicy: Never
    command: {command}
    {CONTAINER_SECURITY}
"
    )
}

/// A Redis server in a pod, behind a Service of the same name.
fn redis(name: &str) -> String {
    let server = pod(name, "", r#"[redis-server, --save, "", --protected-mode, "no", --dir, /tmp]"#);
    format!(
        "{server}---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{selector: {{app: {name}}}, ports: [{{port: 6379}}]}}\n"
    )
}

fn endpoints_and_migration(namespace: &str) -> String {
    let endpoint = |name: &str| {
        format!(
            "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: {name}}}\n\
             spec: {{uri: \"redis://redis-{name}.{namespace}.svc.cluster.local:6379\"}}\n---\n"
        )
    };
    format!(
        "{}{}apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {{name: cache}}
spec:
  source: {{endpointRef: {{name: source}}}}
  target: {{endpointRef: {{name: target}}}}
  strategy:
    readPercentage: 0
    writeMode: {{mode: dualWrite, policy: oldAuthoritative}}
  data: {{type: sync}}
",
        endpoint("source"),
        endpoint("target")
    )
}

fn json(node: &Node, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&node.run_kubectl(&all).unwrap()).unwrap()
}

/// `redis-cli` in pod `pod` (its first container; in the application's pod, through the sidecar).
fn redis_cli(node: &Node, namespace: &str, pod: &str, args: &[&str]) -> String {
    let mut all = vec!["exec", "-n", namespace, pod, "--", "redis-cli"];
    all.extend_from_slice(args);
    node.run_kubectl(&all).unwrap().trim().to_string()
}

/// This build's `eden-operator` and `eden-sidecar` packed as `make images` does (named as the
/// chart's default values name them), in `out`, each checked to hold only what it needs.
fn pack_eden_images(out: &Path) -> Vec<PathBuf> {
    let mut command = std::process::Command::new("python3");
    command.arg(eden_e2e::repo_root().join("images/build.py")).arg("--out").arg(out);
    command.arg("--chart").arg(eden_e2e::repo_root().join("charts/eden"));
    for (package, binary) in [("operator", "eden-operator"), ("sidecar", "eden-sidecar")] {
        command.arg(eden_e2e::workspace_binary(package, binary).unwrap());
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "images/build.py: {}", String::from_utf8_lossy(&output.stderr));
    let archives = ["eden-operator", "eden-sidecar"].map(|binary| {
        let archive = out.join(format!("{binary}-0.1.0.oci.tar"));
        assert_holds_only_what_it_needs(&archive, binary);
        archive
    });
    archives.into()
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

#[tokio::test]
async fn helm_installs_eden_whose_injected_sidecar_carries_an_applications_writes_through_cutover() {
    // The images are packed while the node comes up.
    let out = tempfile::tempdir().unwrap();
    let packing = std::thread::spawn({
        let out = out.path().to_path_buf();
        move || pack_eden_images(&out)
    });
    let node = Node::shared();
    for archive in packing.join().unwrap() {
        node.import_image(&archive).unwrap();
    }
    let system = node.restricted_namespace("eden-system").await.unwrap();
    let apps = node.restricted_namespace("shop").await.unwrap();
    let _show = ShowOnFailure { node, system: &system, apps: &apps };

    // The operator in a pod, with its ServiceAccount's token; opted-in pods are refused while
    // no replica answers.
    let helm = Helm::find().unwrap();
    let values = ["operator.replicas=1", "webhook.failurePolicy=fail", &format!("sidecarNamespaces={{{apps}}}")];
    helm.install_eden(node.kubeconfig(), &system, &values).unwrap();
    node.run_kubectl(&["-n", &system, "rollout", "status", "deployment/eden-operator", "--timeout=180s"]).unwrap();
    eventually("the webhook's caBundle", Duration::from_secs(60), || {
        let configuration = json(node, &["get", "mutatingwebhookconfiguration", "eden-sidecar-injector"]);
        configuration["webhooks"][0]["clientConfig"]["caBundle"].as_str().is_some_and(|ca| !ca.is_empty()).then_some(())
    })
    .unwrap();

    node.apply_manifest(&apps, &format!("{}---\n{}", redis("redis-source"), redis("redis-target"))).unwrap();
    node.run_kubectl(&[
        "wait",
        "-n",
        &apps,
        "--for=condition=Ready",
        "pod/redis-source",
        "pod/redis-target",
        "--timeout=120s",
    ])
    .unwrap();
    node.apply_manifest(&apps, &endpoints_and_migration(&apps)).unwrap();
    let annotations = "eden.io/inject: \"true\", eden.io/migration: cache";
    let writer = serde_json::to_string(&["busybox", "sh", "-c", WRITER]).unwrap();
    node.apply_manifest(&apps, &pod("shop-api", annotations, &writer)).unwrap();
    node.run_kubectl(&["wait", "-n", &apps, "--for=condition=Ready", "pod/shop-api", "--timeout=180s"]).unwrap();

    // The webhook made the sidecar a native one, and the kubelet started the application only
    // once its startup probe passed.
    let app = json(node, &["get", "-n", &apps, "pod/shop-api"]);
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

    // The operator copies the data and, once the target is in sync, cuts over while the
    // application writes.
    let phase = |phase: &str| format!("--for=jsonpath={{.status.phase}}={phase}");
    node.run_kubectl(&["wait", "-n", &apps, "migration/cache", &phase("Ready"), "--timeout=180s"]).unwrap();
    let before_cutover: u64 = redis_cli(node, &apps, "redis-source", &["llen", "writes"]).parse().unwrap();
    assert!(before_cutover > 0, "the application writes through its sidecar");
    let cutover = r#"{"spec":{"strategy":{"writeMode":{"mode":"dualWrite","policy":"newAuthoritative"}}}}"#;
    node.run_kubectl(&["patch", "-n", &apps, "migration/cache", "--type=merge", "-p", cutover]).unwrap();
    node.run_kubectl(&["wait", "-n", &apps, "migration/cache", &phase("CutOver"), "--timeout=120s"]).unwrap();
    eventually("writes on the target after cutover", Duration::from_secs(60), || {
        let on_target: u64 = redis_cli(node, &apps, "redis-target", &["llen", "writes"]).parse().unwrap();
        (on_target > before_cutover + 20).then_some(())
    })
    .unwrap();
    redis_cli(node, &apps, "shop-api", &["set", "stop", "1"]);
    let wrote = eventually("the application to stop", Duration::from_secs(30), || {
        let log = node.run_kubectl(&["logs", "-n", &apps, "shop-api", "-c", "app"]).unwrap();
        assert!(!log.contains("answered"), "{log}");
        log.lines().find_map(|line| line.strip_prefix("wrote ")?.parse::<u64>().ok())
    })
    .unwrap();
    let expected: Vec<String> = (1..=wrote).map(|n| n.to_string()).collect();
    for server in ["redis-target", "redis-source"] {
        let list = redis_cli(node, &apps, server, &["lrange", "writes", "0", "-1"]);
        assert_eq!(list.lines().collect::<Vec<_>>(), expected, "every write, once, in order, on {server}");
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
    node.apply_manifest(&unrelated, &pod("plain", "", sleeper)).unwrap();
    let refused = node.apply_manifest(&unrelated, &pod("asks", annotations, sleeper)).unwrap_err();
    assert!(refused.to_string().contains("failed calling webhook \"inject.eden.io\""), "{refused}");

    // The webhook configuration belongs to the release.
    helm.uninstall_eden(node.kubeconfig(), &system).unwrap();
    let left = node.run_kubectl(&["get", "mutatingwebhookconfigurations", "-o", "name"]).unwrap();
    assert!(!left.contains("eden"), "left behind by helm uninstall: {left}");
}
