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

    step("Starting eden-operator; waiting for both Endpoints to become Ready");
    let operator_admin = free_port()?;
    let _operator = Process::spawn(
        Command::new(sibling_binary("eden-operator")?)
            .args(["--admin-listen", &format!("127.0.0.1:{operator_admin}"), "--log-format", "text"])
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

    step("Starting eden-sidecar as a proxy to the source");
    let (listen, admin) = (free_port()?, free_port()?);
    let _sidecar = Process::spawn(
        Command::new(sibling_binary("eden-sidecar")?).args([
            "--listen",
            &format!("127.0.0.1:{listen}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--source",
            &source.url(),
            "--target",
            &target.url(),
        ]),
        &logs.join("sidecar.log"),
    )?;
    wait_http_ok(admin, "/readyz").await?;
    done(&format!("listening on 127.0.0.1:{listen}, admin on 127.0.0.1:{admin}"));

    step(&format!("An application writes {KEYS} keys through the sidecar"));
    let mut app =
        redis::Client::open(format!("redis://127.0.0.1:{listen}"))?.get_multiplexed_async_connection().await?;
    let mut pipeline = redis::pipe();
    for i in 0..KEYS {
        pipeline.set(format!("user:{i}"), format!("profile-{i}")).ignore();
    }
    pipeline.query_async::<()>(&mut app).await?;
    let mut direct = redis::Client::open(source.url())?.get_multiplexed_async_connection().await?;
    let on_source: usize = redis::cmd("DBSIZE").query_async(&mut direct).await?;
    let sample: String = direct.get("user:42").await?;
    if on_source != KEYS || sample != "profile-42" {
        return Err(format!("expected {KEYS} keys on the source, found {on_source} (user:42 = {sample:?})").into());
    }
    done(&format!("source holds {on_source} keys; user:42 = {sample:?}, read directly from the source"));
    let mut target_conn = redis::Client::open(target.url())?.get_multiplexed_async_connection().await?;
    let on_target: usize = redis::cmd("DBSIZE").query_async(&mut target_conn).await?;
    if on_target != 0 {
        return Err(format!("a plain proxy must not touch the target, which holds {on_target} keys").into());
    }
    done("target untouched (0 keys): with no Migration the sidecar is a plain proxy to the source");

    step("The sidecar's metrics");
    let metrics = http_get(admin, "/metrics").await?;
    for line in
        metrics.lines().filter(|l| l.starts_with("eden_commands_total") || l.starts_with("eden_connections_active"))
    {
        println!("    {line}");
    }
    Ok(())
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
