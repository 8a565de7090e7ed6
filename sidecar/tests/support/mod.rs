//! Shared set-up for the proxy tests: an in-process proxy in front of a real redis-server, and
//! a raw RESP client for exchanges where the exact bytes matter.

#![allow(dead_code)] // each test binary uses its own subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{RedisConfig, RedisServer};
use eden_sidecar::config::{Applier, CurrentConfig};
use eden_sidecar::metrics::ProxyMetrics;
use eden_sidecar::plan::{Routing, UpstreamSettings};
use eden_sidecar::server::{self, Backend, Listener};
use eden_sidecar::upstream::{Server, TlsSettings, Upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// An in-process eden-sidecar on a free loopback port.
pub struct Proxy {
    pub addr: SocketAddr,
    pub metrics: Arc<ProxyMetrics>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: &str) -> Proxy {
        Proxy::with_tls(upstream, TlsSettings::default()).await
    }

    pub async fn with_tls(upstream: &str, tls: TlsSettings) -> Proxy {
        let upstream = Upstream::new(upstream, &tls, Duration::from_millis(500)).expect("valid upstream");
        Proxy::serve(Backend::Plain(upstream)).await
    }

    /// A proxy routing between `source` and the target the configuration names, following
    /// `config`; a write pause lasts at most `max_pause`. Also returns the routing, whose hold
    /// the Lease reports.
    pub async fn routed(source: &str, config: CurrentConfig, max_pause: Duration) -> (Proxy, Routing) {
        let timeout = Duration::from_millis(500);
        let source = Upstream::new(source, &TlsSettings::default(), timeout).expect("valid upstream");
        let settings = UpstreamSettings { target_tls: TlsSettings::default(), connect_timeout: timeout, target: None };
        let routing = Routing::follow(source, settings, config, None, max_pause);
        (Proxy::serve(Backend::Routed(routing.clone())).await, routing)
    }

    async fn serve(backend: Backend) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(ProxyMetrics::default());
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(server::serve(Listener::Tcp(listener), backend, metrics.clone(), shutdown));
        Proxy { addr, metrics, stop, task }
    }

    /// The value of one metric line (`name{labels}`), 0 when absent.
    pub fn metric(&self, series: &str) -> u64 {
        let rendered = self.metrics.render();
        let value = rendered.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' '));
        value.map_or(0, |v| v.parse().unwrap())
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
    }

    pub async fn raw(&self) -> RawClient {
        RawClient::connect(self.addr).await
    }

    /// Signals shutdown and waits for the server to finish draining.
    pub async fn shutdown(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.expect("drained in time").unwrap();
    }
}

/// Two servers and a strategy fed straight to an [`Applier`].
pub struct Migration {
    pub source: RedisServer,
    pub target: RedisServer,
    /// The target's `credentials_file`, when Eden authenticates to it itself.
    pub target_secret: Option<std::path::PathBuf>,
    pub applier: Applier,
    pub config: CurrentConfig,
}

impl Migration {
    pub fn new() -> Migration {
        Migration::with_target(RedisServer::start().unwrap())
    }

    /// The source and the target as the replication engine reaches them.
    pub fn servers(&self) -> [Server; 2] {
        [&self.source, &self.target].map(|s| Server::parse(&s.url(), TlsSettings::default()).expect("server URL"))
    }

    pub fn with_target(target: RedisServer) -> Migration {
        let (applier, config) = Applier::new();
        Migration { source: RedisServer::start().unwrap(), target, target_secret: None, applier, config }
    }

    /// A target that wants a password, which Eden reads from a file in `dir`.
    pub fn with_target_secret(dir: &std::path::Path) -> Migration {
        std::fs::write(dir.join("password"), "t0p\n").unwrap();
        let target = RedisServer::with_config(RedisConfig::default().directive("requirepass", "t0p")).unwrap();
        Migration { target_secret: Some(dir.join("password")), ..Migration::with_target(target) }
    }

    /// An `eden.yaml` naming these servers, with `fields` (YAML lines) on top.
    pub fn payload(&self, generation: u64, fields: &str) -> String {
        let secret = self.target_secret.as_ref().map(|file| format!(", credentials_file: '{}'", file.display()));
        format!(
            "generation: {generation}\nmigration: shop/cache\nsource: {{uri: '{}'}}\ntarget: {{uri: '{}'{}}}\n{fields}\n",
            self.source.url(),
            self.target.url(),
            secret.unwrap_or_default(),
        )
    }

    /// Applies a payload and waits until routing uses it.
    pub async fn apply(&mut self, generation: u64, fields: &str) {
        assert!(self.applier.offer(&self.payload(generation, fields), "test"), "a valid payload");
        let applied = self.config.wait_for(|c| c.as_ref().is_some_and(|c| c.generation == generation));
        tokio::time::timeout(Duration::from_secs(5), applied).await.unwrap().unwrap();
        // The plan is rebuilt from the configuration by its own task.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    pub async fn proxy(&self, max_pause: Duration) -> Proxy {
        Proxy::routed(&self.source.url(), self.config.clone(), max_pause).await.0
    }
}

/// A connection straight to `server`.
pub async fn direct(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Waits until `probe` holds (mirrors are asynchronous), for 5 s.
pub async fn eventually<F: std::future::Future<Output = bool>>(what: &str, probe: impl FnMut() -> F) {
    eventually_within(what, Duration::from_secs(5), probe).await
}

/// Waits until `probe` holds, for `limit`: a replication engine's first beats follow its copy
/// and the end of its expiry hold, which a loaded machine can take a while to reach.
pub async fn eventually_within<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> F,
) {
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never: {what}");
}

/// A client that speaks RESP by hand.
pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        RawClient { stream: TcpStream::connect(addr).await.unwrap(), buffer: Vec::new() }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until the bytes received so far (since the last call) equal `expected`.
    pub async fn expect(&mut self, expected: &[u8]) {
        let read = async {
            while self.buffer.len() < expected.len() {
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&self.buffer));
                self.buffer.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| panic!("timed out; got {:?}", String::from_utf8_lossy(&self.buffer)));
        let got: Vec<u8> = self.buffer.drain(..expected.len()).collect();
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(expected));
    }

    /// Reads until `needle` arrives; returns everything up to and including it.
    pub async fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        let found = |buffer: &[u8]| buffer.windows(needle.len()).position(|w| w == needle);
        let read = async {
            while found(&self.buffer).is_none() {
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&self.buffer));
                self.buffer.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read).await.unwrap_or_else(|_| {
            panic!(
                "no {:?} within 5s; got {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&self.buffer)
            )
        });
        let end = found(&self.buffer).unwrap() + needle.len();
        self.buffer.drain(..end).collect()
    }

    /// Reads one line (without its CRLF).
    pub async fn read_line(&mut self) -> String {
        let read = async {
            while !self.buffer.windows(2).any(|w| w == b"\r\n") {
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed after {:?}", String::from_utf8_lossy(&self.buffer));
                self.buffer.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read).await.expect("a line within 5s");
        let end = self.buffer.windows(2).position(|w| w == b"\r\n").unwrap();
        let line: Vec<u8> = self.buffer.drain(..end + 2).collect();
        String::from_utf8_lossy(&line[..end]).into_owned()
    }

    /// Reads until the server closes the connection; returns everything received.
    pub async fn read_to_close(&mut self) -> String {
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), self.stream.read_to_end(&mut rest)).await.expect("closed").ok();
        self.buffer.extend_from_slice(&rest);
        String::from_utf8_lossy(&std::mem::take(&mut self.buffer)).into_owned()
    }
}

/// The RESP encoding of a command.
pub fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

/// Polls the Lease `name` until its annotations satisfy `done`.
pub async fn wait_for_lease(
    leases: &kube::Api<k8s_openapi::api::coordination::v1::Lease>,
    name: &str,
    done: impl Fn(&std::collections::BTreeMap<String, String>) -> bool,
) -> k8s_openapi::api::coordination::v1::Lease {
    let mut last = None;
    for _ in 0..200 {
        if let Some(lease) = leases.get_opt(name).await.unwrap() {
            if lease.metadata.annotations.as_ref().is_some_and(&done) {
                return lease;
            }
            last = Some(lease);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("Lease {name} never matched: {:?}", last.map(|l| l.metadata.annotations));
}
