//! `make demo`: Eden end to end on the embedded default — a local control plane, two
//! redis-servers, the operator and a sidecar, all real processes on loopback.
//!
//! Each step prints what it did; any failure stops the demo with a non-zero exit and says
//! which step failed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eden_e2e::{ControlPlane, RedisServer, free_port};
use redis::AsyncCommands;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const NAMESPACE: &str = "eden-demo";
const KEYS: usize = 1_000;

#[tokio::main]
async fn main() {
    let started = Instant::now();
    match demo().await {
        Ok(()) => println!("\ndemo finished in {:.1}s: every step passed", started.elapsed().as_secs_f64()),
        Err(err) => {
            eprintln!("\ndemo failed: {err}");
            std::process::exit(1);
        }
    }
}

async fn demo() -> Result<()> {
    let logs = tempfile::Builder::new().prefix("eden-demo-logs-").tempdir()?.keep();
    println!("process logs go to {}", logs.display());

    step("Starting the local control plane (etcd + kube-apiserver)");
    let control_plane = ControlPlane::start()?;
    let version = control_plane.run_kubectl(&["version", "-o", "json"])?;
    let server: serde_json::Value = serde_json::from_str(&version)?;
    done(&format!("kube-apiserver {} ready", server["serverVersion"]["gitVersion"].as_str().unwrap_or("?")));

    step("Starting two redis-servers: the source and the target");
    let source = RedisServer::start()?;
    let target = RedisServer::start()?;
    done(&format!("source {}  target {}", source.url(), target.url()));

    step("Installing Eden's CRDs and applying two Endpoints");
    control_plane.install_eden_crds()?;
    control_plane.run_kubectl(&["create", "namespace", NAMESPACE])?;
    let endpoints = format!(
        "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: source}}\nspec: {{uri: '{}'}}\n---\n\
         apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: target}}\nspec: {{uri: '{}'}}\n",
        source.url(),
        target.url()
    );
    control_plane.apply_manifest(NAMESPACE, &endpoints)?;
    done("endpoints.eden.io/source and endpoints.eden.io/target created");

    step("Starting eden-operator with its injection webhook; waiting for both Endpoints to become Ready");
    let (operator_admin, webhook) = (free_port()?, free_port()?);
    let _operator = Process::spawn(
        Command::new(sibling_binary("eden-operator")?)
            .args(["--admin-listen", &format!("127.0.0.1:{operator_admin}"), "--log-format", "text"])
            // No Service network here: the API server calls the webhook at its address.
            .args(["--webhook-listen", &format!("127.0.0.1:{webhook}")])
            .args(["--webhook-url", &format!("https://127.0.0.1:{webhook}")])
            .env("KUBECONFIG", control_plane.kubeconfig()),
        &logs.join("operator.log"),
    )?;
    control_plane.run_kubectl(&[
        "wait",
        "-n",
        NAMESPACE,
        "--for=condition=Ready",
        "endpoints.eden.io/source",
        "endpoints.eden.io/target",
        "--timeout=60s",
    ])?;
    print!("{}", indent(&control_plane.run_kubectl(&["get", "-n", NAMESPACE, "endpoints.eden.io"])?));
    let described = control_plane.run_kubectl(&["describe", "-n", NAMESPACE, "endpoints.eden.io", "source"])?;
    let events = described.split("Events:").nth(1).unwrap_or_default();
    print!("    kubectl describe endpoints.eden.io source (events):{}", indent(events));

    step("The application's existing data: 1000 keys on the source");
    let mut on_source = redis::Client::open(source.url())?.get_multiplexed_async_connection().await?;
    let mut on_target = redis::Client::open(target.url())?.get_multiplexed_async_connection().await?;
    let mut pipeline = redis::pipe();
    for i in 0..KEYS {
        pipeline.set(format!("user:{i}"), format!("profile-{i}")).ignore();
    }
    pipeline.hset("cart:7", "apples", 3).ignore().rpush("queue:emails", "welcome").ignore();
    pipeline.query_async::<()>(&mut on_source).await?;
    done(&format!("source holds {} keys; the target is empty", dbsize(&mut on_source).await?));

    step("kubectl apply a Migration: sync the data, then send 25% of reads to the target");
    control_plane.apply_manifest(NAMESPACE, MIGRATION)?;
    step("kubectl apply the application's pod, annotated eden.io/inject; the webhook adds eden-sidecar");
    control_plane.apply_manifest(NAMESPACE, APP_POD)?;
    let pod: serde_json::Value = serde_json::from_str(&control_plane.run_kubectl(&[
        "get",
        "pod",
        "-n",
        NAMESPACE,
        "shop-app-0",
        "-o",
        "json",
    ])?)?;
    let injected = &pod["spec"]["initContainers"][0];
    if injected["name"] != "eden-sidecar" || injected["restartPolicy"] != "Always" {
        return Err(format!("the pod has no native eden-sidecar: {}", pod["spec"]).into());
    }
    let injected_args: Vec<String> = serde_json::from_value(injected["args"].clone())?;
    done(&format!("initContainers[0]: eden-sidecar, restartPolicy Always, args: {}", injected_args.join(" ")));

    step("No kubelet here: the injected command line runs as a local process, on free ports");
    let (listen, admin) = (free_port()?, free_port()?);
    let _sidecar = Process::spawn(
        Command::new(sibling_binary("eden-sidecar")?)
            .args(on_loopback(&injected_args, listen, admin, "shop-app-0"))
            .env("KUBECONFIG", control_plane.kubeconfig()),
        &logs.join("sidecar.log"),
    )?;
    wait_http_ok(admin, "/readyz").await?;
    let mut app =
        redis::Client::open(format!("redis://127.0.0.1:{listen}"))?.get_multiplexed_async_connection().await?;
    done(&format!("the application talks to 127.0.0.1:{listen}; admin and metrics on 127.0.0.1:{admin}"));

    step("Eden copies the data as the source's replica and verifies it");
    wait_phase(&control_plane, "Ready", "120s")?;
    print!("{}", indent(&control_plane.run_kubectl(&["get", "-n", NAMESPACE, "migrations"])?));
    let verified = control_plane.run_kubectl(&[
        "get",
        "-n",
        NAMESPACE,
        "migration/shop",
        "-o",
        "jsonpath={.status.lastVerification.checked} keys verified, {.status.lastVerification.missing} missing, {.status.lastVerification.mismatched} different",
    ])?;
    done(&format!("copied by Eden acting as the source's replica; {verified}"));

    step("The application keeps writing through the sidecar; replication carries every write");
    for i in 0..KEYS {
        let _: () = app.incr(format!("visits:{}", i % 10), 1).await?;
    }
    let _: () = app.set("last-order", "order-1001").await?;
    wait_until("the target to have every write", || async {
        let visits: Option<i64> = on_target.clone().get("visits:3").await?;
        let order: Option<String> = on_target.clone().get("last-order").await?;
        Ok(visits == Some(100) && order.as_deref() == Some("order-1001"))
    })
    .await?;
    done("visits:3 = 100 and last-order = order-1001 on the target, written only through the sidecar");
    let (mut from_target, reads) = (0, 400);
    let before = routed_reads(admin).await?;
    for _ in 0..reads {
        let _: Option<String> = app.get("user:42").await?;
    }
    from_target += routed_reads(admin).await? - before;
    done(&format!("{from_target} of {reads} reads of user:42 were served by the target (readPercentage 25)"));
    print!("    kubectl eden status shop:\n{}", indent(&kubectl_eden(&control_plane, &["status", "shop"])?));

    step("`kubectl eden cutover shop`: the target becomes authoritative; writes are mirrored back to the source");
    done(first_line(&kubectl_eden(&control_plane, &["cutover", "shop"])?));
    wait_phase(&control_plane, "CutOver", "60s")?;
    wait_until("the sidecar to apply the flip", || async {
        Ok(sidecar_generation(admin).await? >= configmap_generation(&control_plane)?)
    })
    .await?;
    let _: () = app.set("last-order", "order-1002").await?;
    wait_until("the write to reach both servers", || async {
        let on_target: Option<String> = on_target.clone().get("last-order").await?;
        let on_source: Option<String> = on_source.clone().get("last-order").await?;
        Ok(on_target.as_deref() == Some("order-1002") && on_source.as_deref() == Some("order-1002"))
    })
    .await?;
    done("last-order = order-1002 answered by the target and mirrored to the source: a rollback would lose nothing");

    step("`kubectl eden complete shop`: the source is detached, every read and write goes to the target");
    done(first_line(&kubectl_eden(&control_plane, &["complete", "shop"])?));
    wait_phase(&control_plane, "Completed", "60s")?;
    let (on_both_source, on_both_target) = (dbsize(&mut on_source).await?, dbsize(&mut on_target).await?);
    if on_both_source != on_both_target {
        return Err(format!("source holds {on_both_source} keys but the target {on_both_target}").into());
    }
    done(&format!("target and source both hold {on_both_target} keys: nothing lost, no Eden bookkeeping left behind"));
    print!("{}", indent(&control_plane.run_kubectl(&["get", "-n", NAMESPACE, "migrations"])?));
    let described = control_plane.run_kubectl(&["describe", "-n", NAMESPACE, "migration", "shop"])?;
    let events = described.split("Events:").nth(1).unwrap_or_default();
    print!("    kubectl describe migration shop (events):{}", indent(events));

    step("Deleting the Migration: Eden removes what it created and leaves the data alone");
    control_plane.run_kubectl(&["delete", "-n", NAMESPACE, "migration", "shop", "--timeout=30s"])?;
    let left = control_plane.run_kubectl(&["get", "-n", NAMESPACE, "configmaps", "-o", "name"])?;
    if left.contains("eden-shop") {
        return Err("the ConfigMap eden-shop outlived its Migration".into());
    }
    done(&format!("ConfigMap eden-shop deleted; the target still holds its {} keys", dbsize(&mut on_target).await?));
    Ok(())
}

const APP_POD: &str = "apiVersion: v1
kind: Pod
metadata:
  name: shop-app-0
  annotations: {eden.io/inject: \"true\", eden.io/migration: shop}
spec:
  containers: [{name: app, image: \"registry.example/shop-api:1.4\"}]
";

/// The injected arguments with the listeners moved to free loopback ports and the pod's name
/// filled in, as the kubelet would from the downward API.
fn on_loopback(injected: &[String], listen: u16, admin: u16, pod: &str) -> Vec<String> {
    let mut args = Vec::with_capacity(injected.len());
    for arg in injected {
        let value = match args.last().map(String::as_str) {
            Some("--listen") => format!("127.0.0.1:{listen}"),
            Some("--admin-listen") => format!("127.0.0.1:{admin}"),
            _ if arg == "$(POD_NAME)" => pod.to_string(),
            _ => arg.clone(),
        };
        args.push(value);
    }
    args
}

const MIGRATION: &str = "apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {name: shop}
spec:
  source: {endpointRef: {name: source}}
  target: {endpointRef: {name: target}}
  strategy:
    readPercentage: 25
    writeMode: {mode: dualWrite, policy: oldAuthoritative}
  data: {type: sync}
";

fn wait_phase(control_plane: &ControlPlane, phase: &str, timeout: &str) -> Result<()> {
    let condition = format!("--for=jsonpath={{.status.phase}}={phase}");
    let timeout = format!("--timeout={timeout}");
    control_plane.run_kubectl(&["wait", "-n", NAMESPACE, "migration/shop", &condition, &timeout])?;
    done(&format!("migration/shop is {phase}"));
    Ok(())
}

async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn dbsize(connection: &mut redis::aio::MultiplexedConnection) -> Result<usize> {
    Ok(redis::cmd("DBSIZE").query_async(connection).await?)
}

/// Reads the sidecar sent to the target, from its metrics.
async fn routed_reads(admin: u16) -> Result<u64> {
    let metrics = http_get(admin, "/metrics").await?;
    Ok(metrics
        .lines()
        .filter(|l| {
            l.starts_with("eden_commands_total") && l.contains("kind=\"read\"") && l.contains("route=\"target\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

async fn sidecar_generation(admin: u16) -> Result<u64> {
    let metrics = http_get(admin, "/metrics").await?;
    let value =
        metrics.lines().find(|l| l.starts_with("eden_config_applied_generation")).and_then(|l| l.rsplit(' ').next());
    Ok(value.and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64)
}

fn configmap_generation(control_plane: &ControlPlane) -> Result<u64> {
    let payload = control_plane.run_kubectl(&[
        "get",
        "-n",
        NAMESPACE,
        "configmap",
        "eden-shop",
        "-o",
        "jsonpath={.data.eden\\.yaml}",
    ])?;
    let generation = payload.lines().find_map(|l| l.strip_prefix("generation:")).map(str::trim).unwrap_or("0");
    Ok(generation.parse()?)
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn done(what: &str) {
    println!("    {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

/// Eden's binaries are built next to this one (`cargo build` puts them in the same directory).
/// `kubectl eden ARGS` in the demo's namespace, the plugin found on PATH beside this binary; its
/// output.
fn kubectl_eden(control_plane: &ControlPlane, args: &[&str]) -> Result<String> {
    let plugin = sibling_binary("kubectl-eden")?;
    let path = format!("{}:{}", plugin.parent().unwrap_or(Path::new(".")).display(), std::env::var("PATH")?);
    let output = Command::new("kubectl")
        .env("KUBECONFIG", control_plane.kubeconfig())
        .env("PATH", path)
        .args(["eden", "-n", NAMESPACE])
        .args(args)
        .output()?;
    if !output.status.success() {
        return Err(format!("kubectl eden {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn sibling_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    if !path.is_file() {
        return Err(format!("{} not built: run `cargo build --bins` (make demo does)", path.display()).into());
    }
    Ok(path)
}

async fn http_get(port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("GET {path}: {}", response.lines().next().unwrap_or("no response")).into());
    }
    Ok(response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
}

async fn wait_http_ok(port: u16, path: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(port, path).await {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() > deadline => return Err(format!("{path} on port {port}: {err}").into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A child process that is killed when the demo ends, however it ends.
struct Process(Child);

impl Process {
    fn spawn(command: &mut Command, log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log)?;
        Ok(Process(command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
