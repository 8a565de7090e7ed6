//! A shop on the node ([`crate::Node`]): what the node's test and its walkthrough (`make
//! demo-node`) both run. This build's images, two Redis pods behind Services, a Migration
//! `cache` between them with a gateway, and application pods whose `eden-writer` writes through
//! their injected sidecar (or the gateway) until it is stopped and says what it was told.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::writers::Acknowledged;
use crate::{Cluster, FixtureError, eventually};

/// `eden-writer` (`e2e/src/bin/eden-writer.rs`) of this build: the application.
pub const WRITER_IMAGE: &str = "localhost/eden-e2e/writer:test";
/// The annotations that ask for a sidecar of Migration `cache`, for [`pod`].
pub const INJECT: &str = "eden.io/inject: \"true\", eden.io/migration: cache";
/// The copy's pace, in operations on the target per second: a copy of many keys takes a while
/// (the lists `preload` makes are copied one by one).
pub const COPY_OPS_PER_SECOND: u32 = 2_000;

/// A restricted pod's security settings (the injected sidecar brings its own for its container).
const POD_SECURITY: &str =
    "securityContext: {runAsNonRoot: true, runAsUser: 65532, seccompProfile: {type: RuntimeDefault}}";
const CONTAINER_SECURITY: &str = "securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}";

/// This build's `eden-operator` and `eden-sidecar` packed as `make images` does (named as the
/// chart's default values name them), then the application's image of `eden-writer`, in `out`:
/// the archives, in that order.
pub fn pack_images(out: &Path) -> Result<Vec<PathBuf>, FixtureError> {
    let build = |args: &[&std::ffi::OsStr], binaries: &[PathBuf]| {
        let mut command = Command::new("python3");
        command.arg(crate::repo_root().join("images/build.py")).arg("--out").arg(out).args(args).args(binaries);
        crate::stdout_of(&mut command, None)
    };
    let chart = crate::repo_root().join("charts/eden");
    let eden =
        [crate::workspace_binary("operator", "eden-operator")?, crate::workspace_binary("sidecar", "eden-sidecar")?];
    build(&["--chart".as_ref(), chart.as_os_str()], &eden)?;
    let mut archives: Vec<PathBuf> =
        ["eden-operator", "eden-sidecar"].iter().map(|binary| out.join(format!("{binary}-0.1.0.oci.tar"))).collect();
    let writer = [crate::workspace_binary("e2e", "eden-writer")?];
    let printed = build(&["--name".as_ref(), WRITER_IMAGE.as_ref()], &writer)?;
    archives.push(PathBuf::from(printed.split_whitespace().next().unwrap_or_default()));
    Ok(archives)
}

/// A pod of `image` running `command` (a YAML flow sequence), with `annotations` (the inside
/// of a YAML flow mapping).
pub fn pod(name: &str, image: &str, annotations: &str, command: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {name}}}, annotations: {{{annotations}}}}}
spec:
  terminationGracePeriodSeconds: 1
  {POD_SECURITY}
  containers:
  - name: app
    image: {image}
    imagePullPolicy: Never
    command: {command}
    {CONTAINER_SECURITY}
"
    )
}

/// A pod of the application whose writer writes as `name` through `127.0.0.1`, with
/// `annotations`, or through `address` (a gateway's) when given.
pub fn writer(name: &str, annotations: &str, address: Option<&str>) -> String {
    let command = match address {
        Some(address) => format!("[eden-writer, {name}, \"{address}\"]"),
        None => format!("[eden-writer, {name}]"),
    };
    pod(name, WRITER_IMAGE, annotations, &command)
}

/// Starts [`redis_servers`] in `namespace`, waits until both serve, and puts `preloaded`
/// lists on the source ([`preload`]).
pub fn start_redis_servers(cluster: &Cluster, namespace: &str, preloaded: u64) -> Result<(), FixtureError> {
    cluster.apply_manifest(namespace, &redis_servers())?;
    let pods = ["pod/redis-source", "pod/redis-target"];
    cluster.run_kubectl(&["wait", "-n", namespace, "--for=condition=Ready", pods[0], pods[1], "--timeout=120s"])?;
    preload(cluster, namespace, preloaded)
}

/// Redis servers `redis-source` and `redis-target` in pods, each behind a Service of its name.
fn redis_servers() -> String {
    let server = |name: &str| {
        let command = r#"[redis-server, --save, "", --protected-mode, "no", --dir, /tmp]"#;
        let pod = pod(name, crate::node::TOOLS_IMAGE, "", command);
        format!(
            "{pod}---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
             spec: {{selector: {{app: {name}}}, ports: [{{port: 6379}}]}}\n"
        )
    };
    format!("{}---\n{}", server("redis-source"), server("redis-target"))
}

/// Endpoints `source` and `target` for [`redis_servers`] in `namespace`, by their Services'
/// DNS names, and Migration `cache` between them (a `sync` copy at [`COPY_OPS_PER_SECOND`],
/// reads and writes on the source, a gateway of one replica behind Service `eden-cache`).
pub fn endpoints_and_migration(namespace: &str) -> String {
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
  data: {{type: sync, targetOpsPerSecond: {COPY_OPS_PER_SECOND}}}
  gateway: {{replicas: 1}}
",
        endpoint("source"),
        endpoint("target")
    )
}

/// `redis-cli` in pod `pod` of `namespace` (its first container), with `args`.
pub fn redis_cli(cluster: &Cluster, namespace: &str, pod: &str, args: &[&str]) -> Result<String, FixtureError> {
    let mut all = vec!["exec", "-n", namespace, pod, "--", "redis-cli"];
    all.extend_from_slice(args);
    Ok(cluster.run_kubectl(&all)?.trim().to_string())
}

/// `count` lists (`list:<i>` holding `i`) on the source, which the copy writes one by one
/// (strings would go many to a command), so it keeps to its pace.
pub fn preload(cluster: &Cluster, namespace: &str, count: u64) -> Result<(), FixtureError> {
    let script = "for i = 1, ARGV[1] do redis.call('rpush', 'list:' .. i, i) end";
    redis_cli(cluster, namespace, "redis-source", &["eval", script, "0", &count.to_string()]).map(drop)
}

/// How many of [`preload`]'s `count` lists `server` holds as they were made.
pub async fn preloaded_on(server: &mut redis::aio::MultiplexedConnection, count: u64) -> redis::RedisResult<u64> {
    let script = "local n = 0 for i = 1, ARGV[1] do \
                  if redis.call('lindex', 'list:' .. i, 0) == tostring(i) then n = n + 1 end end return n";
    redis::cmd("EVAL").arg(script).arg(0).arg(count).query_async(server).await
}

/// Stops the writer of pod `name` and returns what its clients were told.
pub fn stop_writer(cluster: &Cluster, namespace: &str, name: &str) -> Result<Acknowledged, FixtureError> {
    cluster.run_kubectl(&["exec", "-n", namespace, name, "-c", "app", "--", "eden-writer", "stop"])?;
    eventually(&format!("{name}'s writer to stop"), Duration::from_secs(60), || {
        let log = cluster.run_kubectl(&["logs", "-n", namespace, name, "-c", "app"]).ok()?;
        log.lines().find_map(|line| serde_json::from_str(line.strip_prefix("acknowledged ")?).ok())
    })
}
