//! Shared fixtures for the replication and verifier tests: a source/target pair of real
//! redis-server processes, a client, a dataset covering every type, and the replicate-then-verify
//! step most scenarios end with.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use eden_e2e::RedisServer;
use eden_sidecar::replicate::{ScanOptions, ScanReplicator, Verifier, VerifyOptions, VerifyReport};
use redis::aio::MultiplexedConnection;

pub struct Pair {
    pub source: RedisServer,
    pub target: RedisServer,
}

impl Pair {
    /// Two empty servers; the source has notifications off so the replicator must enable them.
    pub fn start() -> Pair {
        Pair { source: RedisServer::start().expect("source"), target: RedisServer::start().expect("target") }
    }

    pub async fn source(&self) -> MultiplexedConnection {
        connect(&self.source).await
    }

    pub async fn target(&self) -> MultiplexedConnection {
        connect(&self.target).await
    }

    pub async fn replicate(&self, options: ScanOptions) -> ScanReplicator {
        ScanReplicator::start(&self.source.url(), &self.target.url(), options).await.expect("replicator starts")
    }

    pub async fn verify(&self) -> VerifyReport {
        Verifier::connect(&self.source.url(), &self.target.url(), VerifyOptions::default())
            .await
            .expect("verifier connects")
            .run()
            .await
            .expect("verification runs")
    }
}

pub async fn connect(server: &RedisServer) -> MultiplexedConnection {
    let client = redis::Client::open(server.url()).expect("url");
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    client.get_multiplexed_async_connection_with_config(&config).await.expect("connect")
}

/// Waits for the replicator to have every write made so far on the target.
pub async fn caught_up(replicator: &mut ScanReplicator) {
    let progress = replicator.caught_up(Duration::from_secs(60)).await.expect("replicator healthy");
    let progress = progress.expect("caught up within 60s");
    assert_eq!(progress.lag_ms, 0);
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
