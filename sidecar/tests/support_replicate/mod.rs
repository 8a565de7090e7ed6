//! Shared fixtures for the replication and verifier tests: a source/target pair of real
//! redis-server processes, a client, a dataset covering every type, and the replicate-then-verify
//! step most scenarios end with.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use eden_e2e::{RedisConfig, RedisServer};
use eden_sidecar::replicate::{
    Checkpoint, FRESHNESS_KEY, Mode, Replicator, ReplicatorOptions, ScanOptions, SyncOptions, Verifier, VerifyOptions,
    VerifyReport,
};
use eden_sidecar::upstream::{Server, TlsSettings};
use redis::aio::MultiplexedConnection;
use redis_protocol::resp2::decode::decode_bytes_mut;
use redis_protocol::resp2::encode::extend_encode;
use redis_protocol::resp2::types::BytesFrame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Pair {
    pub source: RedisServer,
    pub target: RedisServer,
    /// How Eden reaches each: its own TLS trust, and credentials if the test sets some.
    pub source_as: Server,
    pub target_as: Server,
}

impl Pair {
    /// Two empty servers; the source has notifications off so the replicator must enable them.
    pub fn start() -> Pair {
        Pair::with_source(RedisConfig::default())
    }

    /// A source with the given configuration (e.g. how it sends snapshots) and a plain target.
    pub fn with_source(config: RedisConfig) -> Pair {
        Pair::of(RedisServer::with_config(config).expect("source"), RedisServer::start().expect("target"))
    }

    /// Two servers reached as plain `redis://` without credentials.
    pub fn of(source: RedisServer, target: RedisServer) -> Pair {
        Pair { source_as: server(&source.url()), target_as: server(&target.url()), source, target }
    }

    pub async fn source(&self) -> MultiplexedConnection {
        connect(&self.source).await
    }

    pub async fn target(&self) -> MultiplexedConnection {
        connect(&self.target).await
    }

    /// A scan-mode replicator.
    pub async fn replicate(&self, options: ScanOptions) -> Replicator {
        self.replicator(Mode::Scan, ReplicatorOptions { scan: options, ..Default::default() }, None).await
    }

    /// A sync-mode replicator, restarting from `checkpoint` when given.
    pub async fn sync(&self, options: SyncOptions, checkpoint: Option<Checkpoint>) -> Replicator {
        self.replicator(Mode::Sync, ReplicatorOptions { sync: options, ..Default::default() }, checkpoint).await
    }

    pub async fn replicator(
        &self,
        mode: Mode,
        options: ReplicatorOptions,
        checkpoint: Option<Checkpoint>,
    ) -> Replicator {
        Replicator::start(&self.source_as, &self.target_as, mode, options, checkpoint).await.expect("replicator starts")
    }

    pub async fn verify(&self) -> VerifyReport {
        self.verify_with(VerifyOptions::default()).await
    }

    pub async fn verify_with(&self, options: VerifyOptions) -> VerifyReport {
        Verifier::connect(&self.source_as, &self.target_as, options)
            .await
            .expect("verifier connects")
            .run()
            .await
            .expect("verification runs")
    }
}

/// The server at `url` (`redis://`, no TLS trust of its own).
pub fn server(url: &str) -> Server {
    Server::parse(url, TlsSettings::default()).expect("server URL")
}

pub async fn connect(server: &RedisServer) -> MultiplexedConnection {
    let client = redis::Client::open(server.url()).expect("url");
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    client.get_multiplexed_async_connection_with_config(&config).await.expect("connect")
}

/// A relay to `upstream` (host:port) on a free port; returns its `redis://` URL. Every command a
/// client sends passes through `command` on its way, which may rewrite it or act first (replies
/// come back untouched): a server that looks older, or a write that lands at a chosen moment.
pub async fn relay(upstream: String, command: impl Fn(BytesFrame) -> BytesFrame + Send + Sync + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let command = Arc::new(command);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
            let command = command.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(64 * 1024);
                while from_client.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
                    let mut out = BytesMut::new();
                    while let Some((frame, _, _)) = decode_bytes_mut(&mut buf).unwrap() {
                        extend_encode(&mut out, &command(frame), false).unwrap();
                    }
                    if to_server.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// Waits for the replicator to have every write made so far on the target.
/// The keys of the connection's database but the freshness record a running replicator keeps
/// on the target (and removes when it ends: a test may see either).
pub async fn data_keys(con: &mut MultiplexedConnection) -> u64 {
    let (size, freshness): (u64, u64) =
        redis::pipe().cmd("DBSIZE").exists(FRESHNESS_KEY).query_async(con).await.unwrap();
    size - freshness
}

pub async fn caught_up(replicator: &mut Replicator) {
    let progress = replicator.caught_up(Duration::from_secs(60)).await.expect("replicator healthy");
    let progress = progress.expect("caught up within 60s");
    assert_eq!(progress.lag_ms, 0);
}

/// Stops the replicator and returns its checkpoint as its owner would have stored it.
pub fn checkpoint_of(replicator: Replicator) -> Checkpoint {
    let checkpoint = replicator.checkpoint();
    drop(replicator);
    Checkpoint::from_json(&checkpoint.to_json()).unwrap()
}

/// Asserts a clean report, printing the samples otherwise.
pub fn assert_clean(report: &VerifyReport) {
    assert!(report.is_clean(), "differences: {report:#?}");
}

/// One key of every type, with TTLs, binary names and values, and a stream consumer group.
pub async fn seed_every_type(con: &mut MultiplexedConnection) {
    let mut p = redis::pipe();
    p.set("str", "hello")
        .set(b"bin\x00\xffkey".as_slice(), b"\x00\x01\xfe\xff".as_slice())
        .set_ex("ttl:str", "soon", 300)
        .rpush("list", &["a", "b", "c", "a"])
        .hset_multiple("hash", &[("f1", "v1"), ("f2", "v2")])
        .sadd("set", &["x", "y", "z"])
        .zadd_multiple("zset", &[(1.5, "one"), (-2.0, "two"), (f64::INFINITY, "inf")])
        .pexpire("hash", 600_000)
        .cmd("XADD")
        .arg("stream")
        .arg("1-1")
        .arg("k")
        .arg("v")
        .cmd("XADD")
        .arg("stream")
        .arg("2-1")
        .arg("k")
        .arg("w")
        .cmd("XGROUP")
        .arg("CREATE")
        .arg("stream")
        .arg("readers")
        .arg("0")
        .cmd("XREADGROUP")
        .arg("GROUP")
        .arg("readers")
        .arg("alice")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg("stream")
        .arg(">");
    p.exec_async(con).await.expect("seed");
}

/// `n` string keys `key:<i>` written in pipelined batches.
pub async fn seed_strings(con: &mut MultiplexedConnection, n: usize) {
    for start in (0..n).step_by(10_000) {
        let mut p = redis::pipe();
        for i in start..(start + 10_000).min(n) {
            p.set(format!("key:{i}"), i).ignore();
        }
        p.exec_async(con).await.expect("seed strings");
    }
}

/// A hash of `n` fields `f<i>` = `i`, with a TTL: big enough to need chunking (scan) and
/// streaming (sync).
pub async fn seed_big_hash(con: &mut MultiplexedConnection, key: &str, n: u32) {
    for start in (0..n).step_by(10_000) {
        let fields: Vec<(String, u32)> = (start..(start + 10_000).min(n)).map(|i| (format!("f{i}"), i)).collect();
        let mut p = redis::pipe();
        p.hset_multiple(key, &fields).ignore();
        p.exec_async(con).await.expect("seed big hash");
    }
    let mut p = redis::pipe();
    p.pexpire(key, 900_000).ignore();
    p.exec_async(con).await.expect("expire big hash");
}

/// `writers` tasks each making `rounds` pipelines of every kind of write on hot keys (INCR,
/// APPEND, LPUSH, HINCRBY, ZINCRBY, XADD, DEL of a seeded `key:<i>` below `keys`, SET, EXPIRE,
/// one-second keys), one millisecond apart.
pub fn spawn_writers(
    source: &MultiplexedConnection,
    writers: u64,
    rounds: u64,
    keys: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let mut con = source.clone();
            tokio::spawn(async move {
                for i in 0..rounds {
                    let hot = format!("key:{}", (i * 7919 + w) % keys);
                    let mut p = redis::pipe();
                    p.incr(format!("counter:{w}"), 1)
                        .append(format!("log:{w}"), "x")
                        .lpush(format!("list:{}", i % 5), i)
                        .hincr("hash", format!("f{}", i % 50), 1)
                        .zincr("zset", format!("m{}", i % 20), 1.5)
                        .cmd("XADD")
                        .arg("stream")
                        .arg("*")
                        .arg("w")
                        .arg(w)
                        .del(&hot)
                        .set(format!("new:{w}:{i}"), i)
                        .expire(format!("new:{w}:{}", i / 2), 600)
                        .set_ex(format!("short:{w}:{i}"), i, 1);
                    p.exec_async(&mut con).await.expect("write");
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect()
}
