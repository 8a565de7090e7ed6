//! The `eden-sidecar` binary as Kubernetes runs it: flags, the ready log line, the admin port,
//! and SIGTERM draining in-flight replies before a clean exit.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use eden_e2e::{RedisConfig, RedisServer, TestPki};
use eden_sidecar::upstream::{TlsSettings, Upstream};
use support::{RawClient, resp};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{ChildStderr, Command};

fn sidecar() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eden-sidecar"));
    for var in
        ["EDEN_LISTEN", "EDEN_ADMIN_LISTEN", "EDEN_SOURCE", "EDEN_TARGET", "EDEN_CONFIG", "EDEN_CONFIGMAP", "RUST_LOG"]
    {
        command.env_remove(var);
    }
    command.kill_on_drop(true);
    command
}

/// One HTTP/1.1 GET; the status code and body.
async fn get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (head[9..12].parse().unwrap(), body.to_string())
}

/// The JSON log line a sidecar started with `--log-format json` writes once it is ready, and
/// the rest of its log, to hold open while it runs.
async fn ready_line(child: &mut tokio::process::Child) -> (serde_json::Value, Lines<BufReader<ChildStderr>>) {
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let line = logs.next_line().await.unwrap().expect("a ready line before exit");
            let line: serde_json::Value = serde_json::from_str(&line).expect("JSON logs");
            if line["message"] == "eden-sidecar ready" {
                return line;
            }
        }
    })
    .await
    .expect("ready within 10 s");
    (ready, logs)
}

#[tokio::test]
async fn bad_flags_are_explained_and_exit_2() {
    for args in [&["--source", "redis://127.0.0.1:1", "--listen", "not-an-address"][..], &["--listen", "127.0.0.1:0"]] {
        let output = sidecar().args(args).output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--listen") || stderr.contains("--source"), "names the flag: {stderr}");
    }
}

#[tokio::test]
async fn the_binary_proxies_reports_on_its_admin_port_and_drains_on_sigterm() {
    let server = RedisServer::start().unwrap();
    let started = Instant::now();
    let mut child = sidecar()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--source", &server.url()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its log reader goes away: the logs are lost, the proxy is not.
    let (ready, logs) = ready_line(&mut child).await;
    drop(logs);
    // Debug build on a shared machine: generous, but still catches a start-up that blocks.
    assert!(started.elapsed() < Duration::from_secs(2), "ready after {:?}", started.elapsed());
    let (listen, admin) = (ready["listen"].as_str().unwrap(), ready["admin"].as_str().unwrap());

    assert_eq!(get(admin, "/healthz").await.0, 200);
    assert_eq!(get(admin, "/readyz").await.0, 200);
    let mut client = RawClient::connect(listen.parse().unwrap()).await;
    client.send(&[resp(&["SET", "k", "v"]), resp(&["GET", "k"])].concat()).await;
    client.expect(b"+OK\r\n$1\r\nv\r\n").await;
    let (status, metrics) = get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "eden_connections_active 1",
        "eden_commands_total{route=\"source\",kind=\"read\"} 1",
        "eden_commands_total{route=\"source\",kind=\"write\"} 1",
        "eden_proxy_latency_seconds_count 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    client.send(&resp(&["BLPOP", "nothing", "0.5"])).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status().unwrap();
    assert!(kill.success());
    assert_eq!(client.read_to_close().await, "*-1\r\n", "the blocked command's reply was delivered");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await.expect("exits").unwrap();
    assert_eq!(status.code(), Some(0), "a drained shutdown is a clean exit");
}

#[tokio::test]
async fn with_a_config_file_the_binary_routes_by_its_strategy() {
    let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
    for (server, value) in [(&source, "source"), (&target, "target")] {
        let mut direct = RawClient::connect(server.addr()).await;
        direct.send(&resp(&["SET", "where", value])).await;
        direct.expect(b"+OK\r\n").await;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eden.yaml");
    let mut child = sidecar()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--source", &source.url(), "--config", config.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut next_message = async || {
        let line = logs.next_line().await.unwrap().expect("logs before exit");
        serde_json::from_str::<serde_json::Value>(&line).expect("JSON logs")
    };
    // No strategy yet, so no client is served: a default route could send writes to the
    // wrong server.
    let early = tokio::time::timeout(Duration::from_millis(700), async {
        loop {
            if next_message().await["message"] == "eden-sidecar ready" {
                break;
            }
        }
    })
    .await;
    assert!(early.is_err(), "the sidecar became ready before it had a strategy");
    std::fs::write(
        &config,
        format!(
            "generation: 3\nmigration: shop/cache\nsource: {{uri: '{}'}}\ntarget: {{uri: '{}'}}\nread_percentage: 100\n",
            source.url(),
            target.url()
        ),
    )
    .unwrap();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        let mut applied = false;
        loop {
            let line = next_message().await;
            applied |= line["message"] == "applied configuration";
            if line["message"] == "eden-sidecar ready" {
                assert!(applied, "ready only once the strategy is applied");
                assert_eq!(line["routed"], true);
                return line;
            }
        }
    })
    .await
    .expect("ready and configured within 10 s");
    let (listen, admin) = (ready["listen"].as_str().unwrap(), ready["admin"].as_str().unwrap());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut client = RawClient::connect(listen.parse().unwrap()).await;
    client.send(&resp(&["GET", "where"])).await;
    client.expect(b"$6\r\ntarget\r\n").await;
    let metrics = get(admin, "/metrics").await.1;
    for line in ["eden_config_applied_generation 3", "eden_commands_total{route=\"target\",kind=\"read\"} 1"] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

/// The binary's container image (`images/build.py`, what `make images` runs), named as the chart's
/// default values name it: umoci unpacks it
/// as an OCI runtime bundle (digests checked) that runs the sidecar as user 65532, and its root
/// filesystem alone, entered with `unshare --root`, runs a proxy serving a real redis-server.
#[tokio::test]
async fn the_image_unpacks_and_its_root_filesystem_alone_runs_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        let output = std::process::Command::new(program).args(args).output().unwrap();
        assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    let script = eden_e2e::repo_root().join("images/build.py");
    let binary = env!("CARGO_BIN_EXE_eden-sidecar");
    run(
        "python3",
        &[
            script.as_os_str(),
            "--out".as_ref(),
            dir.path().as_os_str(),
            "--chart".as_ref(),
            eden_e2e::repo_root().join("charts/eden").as_os_str(),
            "--tag".as_ref(),
            "test".as_ref(),
            binary.as_ref(),
        ],
    );
    let (layout, bundle) = (dir.path().join("layout"), dir.path().join("bundle"));
    std::fs::create_dir(&layout).unwrap();
    let archive = dir.path().join("eden-sidecar-test.oci.tar");
    run("tar", &["xf".as_ref(), archive.as_os_str(), "-C".as_ref(), layout.as_os_str()]);
    // Named as the chart names the image it runs, registry included: containerd's CRI looks a
    // short name up as docker.io/library/..., which an imported short name never matches.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let values = std::fs::read_to_string(eden_e2e::repo_root().join("charts/eden/values.yaml")).unwrap();
    let values: serde_json::Value = serde_yaml::from_str(&values).unwrap();
    let repository = values["sidecar"]["image"]["repository"].as_str().unwrap();
    assert!(repository.split('/').next().unwrap().contains('.'), "{repository} names its registry");
    let annotations = &index["manifests"][0]["annotations"];
    assert_eq!(annotations["io.containerd.image.name"], format!("{repository}:test"));
    let image = format!("{}:test", layout.display());
    run("umoci", &["unpack".as_ref(), "--rootless".as_ref(), "--image".as_ref(), image.as_ref(), bundle.as_os_str()]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["user"]["uid"], 65532, "the chart's non-root user");
    assert_eq!(config["process"]["args"], serde_json::json!(["/usr/local/bin/eden-sidecar"]));

    let server = RedisServer::start().unwrap();
    let root = format!("--root={}", bundle.join("rootfs").display());
    let mut child = Command::new("unshare")
        .args(["--map-root-user", &root, "/usr/local/bin/eden-sidecar"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--source", &server.url()])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (ready, _logs) = ready_line(&mut child).await;
    let mut client = RawClient::connect(ready["listen"].as_str().unwrap().parse().unwrap()).await;
    client.send(&[resp(&["SET", "k", "from the image"]), resp(&["GET", "k"])].concat()).await;
    client.expect(b"+OK\r\n$14\r\nfrom the image\r\n").await;
}

/// The proxy trusts each `rediss://` upstream on its own terms: a CA and a server name for the
/// source, another CA and name for the target, neither certificate valid for the address dialled.
#[tokio::test]
async fn each_tls_upstream_is_verified_with_its_own_ca_and_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["source.redis.test", "target.redis.test"];
    let [source, target] = [0, 1].map(|i| {
        let pki = TestPki::new(&[names[i]]).unwrap();
        let pki_dir = dir.path().join(names[i]);
        std::fs::create_dir(&pki_dir).unwrap();
        let files = pki.write_to(&pki_dir).unwrap();
        (RedisServer::with_config(RedisConfig::default().tls(&files.ca, &files.cert, &files.key)).unwrap(), files, pki)
    });
    for ((server, _, pki), name) in [&source, &target].into_iter().zip(names) {
        let tls = TlsSettings {
            ca_pem: Some(pki.ca_pem.clone().into_bytes()),
            server_name: Some(name.into()),
            ..Default::default()
        };
        let mut direct = Upstream::new(&server.url(), &tls, Duration::from_secs(5)).unwrap().connect().await.unwrap();
        direct.write_all(&resp(&["SET", "where", name.split('.').next().unwrap()])).await.unwrap();
        let mut reply = [0; 5];
        direct.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"+OK\r\n");
    }
    let config = dir.path().join("eden.yaml");
    std::fs::write(
        &config,
        format!(
            "generation: 1\nmigration: shop/cache\nsource: {{uri: '{}'}}\ntarget: {{uri: '{}'}}\nread_percentage: 100\n",
            source.0.url(),
            target.0.url()
        ),
    )
    .unwrap();
    let mut child = sidecar()
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--source", &source.0.url(), "--config", config.to_str().unwrap()])
        .args(["--source-ca-file", source.1.ca.to_str().unwrap(), "--source-server-name", names[0]])
        .args(["--target-ca-file", target.1.ca.to_str().unwrap(), "--target-server-name", names[1]])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (ready, _logs) = ready_line(&mut child).await;
    let mut client = RawClient::connect(ready["listen"].as_str().unwrap().parse().unwrap()).await;
    client.send(&resp(&["GET", "where"])).await;
    client.expect(b"$6\r\ntarget\r\n").await;
    client.send(&resp(&["SET", "written", "through"])).await;
    client.expect(b"+OK\r\n").await;
}
