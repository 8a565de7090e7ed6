//! The strategy in action, on real source and target redis-servers: the read share follows
//! ConfigMap patches on a live connection, each write mode answers from the right side and
//! mirrors exactly once, a dead mirror never fails a client, writes the source misses after the
//! flip are reported in the Lease, held writes survive a cutover pause in order, and shadow reads count what differs.
//! A routed session answers as the server that serves it would, when it would: MULTI at once in
//! every state, a replica's SYNC from the source, scripts and functions wherever they run,
//! admin commands from the owner of the client's data.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use eden_e2e::{ControlPlane, RedisServer};
use eden_sidecar::config::PAYLOAD_KEY;
use eden_sidecar::hold::{HoldReason, HoldState};
use eden_sidecar::lease::{
    ANNOTATION_CONFIG_ERROR, ANNOTATION_GENERATION, ANNOTATION_LOST_SOURCE_WRITES, ANNOTATION_LOST_TARGET_WRITES,
    ANNOTATION_WRITES, LeaseReporter,
};
use eden_sidecar::replicate::{Mode, Replicator, ReplicatorOptions};
use eden_sidecar::route::key_bucket;
use eden_sidecar::upstream::{Server, TlsSettings, Upstream};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use redis::AsyncCommands;
use support::{Migration, Proxy, direct, eventually, eventually_within, resp, wait_for_lease};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

impl Migration {
    /// The Lease reporter of sidecar `pod`, in a fresh namespace, counting `proxy`'s lost
    /// mirrored writes; the caller runs it.
    async fn lease_reporter(&self, pod: &str, proxy: &Proxy) -> (Api<Lease>, LeaseReporter) {
        let control_plane = ControlPlane::shared();
        let namespace = control_plane.namespace("sidecar-losses").await.unwrap();
        let leases: Api<Lease> = Api::namespaced(control_plane.client().await.unwrap(), &namespace);
        let reporter = LeaseReporter::new(
            leases.clone(),
            pod.into(),
            "cache".into(),
            self.applier.subscribe(),
            self.applier.status(),
        )
        .with_mirror_losses(proxy.metrics.clone());
        (leases, reporter)
    }
}

#[tokio::test]
async fn config_map_patches_move_the_read_share_on_a_live_connection() {
    let control_plane = ControlPlane::shared();
    let namespace = control_plane.namespace("sidecar-routing").await.unwrap();
    let client = control_plane.client().await.unwrap();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let migration = Migration::new();
    let config_map = ConfigMap {
        metadata: ObjectMeta { name: Some("eden-cache".into()), ..Default::default() },
        data: Some(BTreeMap::from([(PAYLOAD_KEY.to_string(), migration.payload(1, "read_percentage: 0"))])),
        ..Default::default()
    };
    config_maps.create(&PostParams::default(), &config_map).await.unwrap();
    tokio::spawn(migration.applier.clone().watch_config_map(config_maps.clone(), "eden-cache".into()));
    let (proxy, routing) =
        Proxy::routed(&migration.source.url(), migration.config.clone(), Duration::from_secs(5)).await;
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let reporter = LeaseReporter::new(
        leases.clone(),
        "app-1".into(),
        "cache".into(),
        migration.applier.subscribe(),
        migration.applier.status(),
    )
    .with_hold(routing.hold());
    tokio::spawn(reporter.clone().run());

    let _: () = direct(&migration.source).await.set("where", "source").await.unwrap();
    let _: () = direct(&migration.target).await.set("where", "target").await.unwrap();
    let mut app = proxy.client().await;
    let set_payload = |text: String| {
        let config_maps = config_maps.clone();
        async move {
            let patch = serde_json::json!({"data": {PAYLOAD_KEY: text}});
            config_maps.patch("eden-cache", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
        }
    };
    let reads = 10_000;
    for (generation, percentage) in [(1, 0), (2, 5), (3, 25), (4, 75), (5, 100)] {
        set_payload(migration.payload(generation, &format!("read_percentage: {percentage}"))).await;
        wait_for_lease(&leases, &reporter.lease_name(), |a| a[ANNOTATION_GENERATION] == generation.to_string()).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let target = target_share(&mut app, reads).await;
        // Binomial: five standard deviations either side (exact at 0 and 100%).
        let expected = reads as f64 * f64::from(percentage) / 100.0;
        let spread = 5.0 * (expected * (1.0 - f64::from(percentage) / 100.0)).sqrt();
        assert!((target as f64 - expected).abs() <= spread, "{percentage}%: {target} of {reads} reads from the target");
    }

    for (broken, error) in [
        ("generation: [unclosed\n".to_string(), "not valid"),
        (migration.payload(6, "read_percentage: 150"), "read_percentage is 150"),
    ] {
        set_payload(broken).await;
        let lease = wait_for_lease(&leases, &reporter.lease_name(), |a| {
            a.get(ANNOTATION_CONFIG_ERROR).is_some_and(|e| e.contains(error))
        })
        .await;
        let annotations = lease.metadata.annotations.unwrap();
        assert_eq!(
            (annotations[ANNOTATION_GENERATION].as_str(), annotations[ANNOTATION_WRITES].as_str()),
            ("5", "flowing")
        );
        assert_eq!(target_share(&mut app, 1000).await, 1000, "the last good routing continues");
    }
    assert_eq!(proxy.metric("eden_connections_active"), 1, "one client connection throughout");
}

/// How many of `reads` GETs of `where` the target answered, in one pipeline.
async fn target_share(app: &mut redis::aio::MultiplexedConnection, reads: usize) -> usize {
    let mut pipeline = redis::pipe();
    for _ in 0..reads {
        pipeline.get("where");
    }
    let answers: Vec<String> = pipeline.query_async(app).await.unwrap();
    assert_eq!(answers.len(), reads);
    answers.iter().filter(|answer| *answer == "target").count()
}

#[tokio::test]
async fn each_write_mode_answers_from_its_side_and_mirrors_exactly_once() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let (mut source, mut target) = (direct(&migration.source).await, direct(&migration.target).await);
    let mut app = proxy.client().await;
    let _: () = source.set("counter", 100).await.unwrap();
    let _: () = target.set("counter", 1000).await.unwrap();

    // Before cutover, data.type none: the source answers, the target gets each write once.
    migration.apply(1, "mirror_writes: true").await;
    for expected in 101..=103 {
        assert_eq!(app.incr::<_, _, i64>("counter", 1).await.unwrap(), expected);
        let _: i64 = app.rpush("log", expected).await.unwrap();
    }
    eventually("the target has every write once", || async {
        target.clone().get::<_, i64>("counter").await.unwrap() == 1003
    })
    .await;
    assert_eq!(target.lrange::<_, Vec<i64>>("log", 0, -1).await.unwrap(), vec![101, 102, 103], "once each, in order");

    // With replication feeding the target, nothing is mirrored.
    migration.apply(2, "").await;
    assert_eq!(app.incr::<_, _, i64>("counter", 1).await.unwrap(), 104);

    // After cutover: the target answers, the source gets each write once.
    migration.apply(3, "write_policy: new_authoritative\nmirror_writes: true").await;
    assert_eq!(app.incr::<_, _, i64>("counter", 1).await.unwrap(), 1004);
    eventually("the source has the write", || async { source.clone().get::<_, i64>("counter").await.unwrap() == 105 })
        .await;

    // A split: each key written on its owner only; target-owned keys mirrored back to the source.
    migration.apply(4, "write_mode: cutover\nwrite_percentage: 50\nmirror_writes: true").await;
    let keys: Vec<String> = (0..200).map(|i| format!("split:{i}")).collect();
    for key in &keys {
        let _: i64 = app.incr(key, 1).await.unwrap();
    }
    let target_owned: Vec<&String> = keys.iter().filter(|k| key_bucket(k.as_bytes()) < 50).collect();
    assert!((60..140).contains(&target_owned.len()), "about half: {}", target_owned.len());
    eventually("every write reached its owner, and the source", || async {
        let on_source: Vec<Option<i64>> = source.clone().mget(&keys).await.unwrap();
        on_source.iter().all(|v| *v == Some(1))
    })
    .await;
    let on_target: Vec<Option<i64>> = target.mget(&keys).await.unwrap();
    for (key, value) in keys.iter().zip(on_target) {
        let expected = target_owned.contains(&key).then_some(1);
        assert_eq!(value, expected, "{key} on the target");
    }
    let mirrored = 3 * 2 + 1 + target_owned.len() as u64;
    eventually("mirrors counted", || async {
        proxy.metric("eden_mirror_writes_total{to=\"target\",outcome=\"applied\"}")
            + proxy.metric("eden_mirror_writes_total{to=\"source\",outcome=\"applied\"}")
            == mirrored
    })
    .await;
}

#[tokio::test]
async fn a_dead_mirror_target_counts_failures_in_the_lease_and_never_fails_clients() {
    let mut dead = RedisServer::start().unwrap();
    dead.stop();
    let mut migration = Migration::with_target(dead);
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let (leases, reporter) = migration.lease_reporter("app-3", &proxy).await;
    let renewing = tokio::spawn(reporter.clone().run());
    migration.apply(1, "mirror_writes: true").await;
    let mut app = proxy.client().await;
    for expected in 1..=50 {
        assert_eq!(app.incr::<_, _, i64>("counter", 1).await.unwrap(), expected);
    }
    eventually("every mirrored write counted as failed", || async {
        proxy.metric("eden_mirror_writes_total{to=\"target\",outcome=\"failed\"}")
            + proxy.metric("eden_mirror_writes_total{to=\"target\",outcome=\"dropped\"}")
            == 50
    })
    .await;
    assert_eq!(direct(&migration.source).await.get::<_, i64>("counter").await.unwrap(), 50);
    // The operator holds a pure dual-write cutover on this count.
    losses_outlive_the_sidecar(&leases, &reporter, renewing, ("0", "50")).await;
}

/// Waits until the Lease reports these lost writes (source, target), then shuts the reporter
/// down cleanly: the Lease stays, with the counts, so the operator still sees them.
async fn losses_outlive_the_sidecar(
    leases: &Api<Lease>,
    reporter: &LeaseReporter,
    renewing: tokio::task::JoinHandle<()>,
    (source, target): (&str, &str),
) {
    let reports = |a: &BTreeMap<String, String>| {
        a[ANNOTATION_LOST_SOURCE_WRITES] == source && a[ANNOTATION_LOST_TARGET_WRITES] == target
    };
    wait_for_lease(leases, &reporter.lease_name(), reports).await;
    renewing.abort();
    reporter.release().await;
    let kept = leases.get_opt(&reporter.lease_name()).await.unwrap().expect("the Lease outlives the sidecar");
    assert!(reports(&kept.metadata.annotations.unwrap()));
}

#[tokio::test]
async fn mirrored_writes_the_target_refuses_inside_a_pipeline_are_counted_one_by_one() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "mirror_writes: true").await;
    let _: () = direct(&migration.target).await.set("list", "a string on the target").await.unwrap();
    let mut raw = proxy.raw().await;
    // Runs of +OK and integers with an error from the target now and then, in one pipeline.
    let (mut requests, mut replies) = (Vec::new(), Vec::new());
    for i in 1..=100 {
        requests.extend(resp(&["SET", &format!("k{i}"), "v"]));
        requests.extend(resp(&["INCR", "n"]));
        replies.extend(format!("+OK\r\n:{i}\r\n").into_bytes());
        if i % 10 == 0 {
            requests.extend(resp(&["RPUSH", "list", &i.to_string()]));
            replies.extend(format!(":{}\r\n", i / 10).into_bytes());
        }
    }
    raw.send(&requests).await;
    raw.expect(&replies).await;
    eventually("every mirrored write counted", || async {
        proxy.metric("eden_mirror_writes_total{to=\"target\",outcome=\"applied\"}") == 200
            && proxy.metric("eden_mirror_writes_total{to=\"target\",outcome=\"failed\"}") == 10
    })
    .await;
    assert_eq!(direct(&migration.target).await.get::<_, i64>("n").await.unwrap(), 100);
}

#[tokio::test]
async fn writes_the_source_refused_after_the_flip_are_reported_in_the_lease_and_outlive_the_sidecar() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let (leases, reporter) = migration.lease_reporter("app-2", &proxy).await;
    let renewing = tokio::spawn(reporter.clone().run());
    migration.apply(1, "write_policy: new_authoritative\nmirror_writes: true").await;
    let mut app = proxy.client().await;
    assert_eq!(app.incr::<_, _, i64>("counter", 1).await.unwrap(), 1);
    eventually("the first write reached the source", || async {
        direct(&migration.source).await.get::<_, Option<i64>>("counter").await.unwrap() == Some(1)
    })
    .await;
    wait_for_lease(&leases, &reporter.lease_name(), |a| a[ANNOTATION_LOST_SOURCE_WRITES] == "0").await;

    // The source now refuses writes (it wants a replica it does not have); the client's own
    // connection to it stays up.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "min-replicas-to-write", "1"])
        .query_async(&mut direct(&migration.source).await)
        .await
        .unwrap();
    for expected in 2..=21 {
        assert_eq!(app.incr::<_, _, i64>("counter", 1).await.unwrap(), expected, "the target answers");
    }
    losses_outlive_the_sidecar(&leases, &reporter, renewing, ("20", "0")).await;
}

#[tokio::test]
async fn a_session_that_changes_its_connection_state_keeps_its_mirrored_writes_in_order() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "mirror_writes: true").await;
    let (mut other, mut raw) = (proxy.client().await, proxy.raw().await);
    // Its first writes share a mirror connection with other clients' writes; SELECT moves it to
    // a connection of its own, which must not overtake what the shared one still has queued.
    let _: i64 = other.rpush("other", "x").await.unwrap();
    let first: Vec<u8> = (1..=200).flat_map(|i| resp(&["RPUSH", "log", &i.to_string()])).collect();
    raw.send(&[first, resp(&["SELECT", "0"]), resp(&["RPUSH", "log", "201"]), resp(&["SELECT", "1"])].concat()).await;
    raw.send(&resp(&["RPUSH", "log", "in-db-1"])).await;
    let mut replies: Vec<u8> = (1..=200).flat_map(|i| format!(":{i}\r\n").into_bytes()).collect();
    replies.extend_from_slice(b"+OK\r\n:201\r\n+OK\r\n:1\r\n");
    raw.expect(&replies).await;
    let mut target = direct(&migration.target).await;
    eventually("every write mirrored", || async {
        proxy.metric("eden_mirror_writes_total{to=\"target\",outcome=\"applied\"}") == 203
    })
    .await;
    let log: Vec<i64> = target.lrange("log", 0, -1).await.unwrap();
    assert_eq!(log, (1..=201).collect::<Vec<i64>>(), "once each, in the client's order");
    let mut target_db1 = redis::Client::open(format!("{}/1", migration.target.url()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(
        target_db1.lrange::<_, Vec<String>>("log", 0, -1).await.unwrap(),
        ["in-db-1"],
        "in the client's database"
    );
}

/// Three connections pipelining writes while writes are held; returns their join handles.
fn held_writers(proxy: &Proxy) -> Vec<tokio::task::JoinHandle<Vec<u8>>> {
    (0..3)
        .map(|connection| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut raw = support::RawClient::connect(addr).await;
                let mut requests = Vec::new();
                for i in 0..50 {
                    requests.extend(resp(&["RPUSH", &format!("held:{connection}"), &i.to_string()]));
                    requests.extend(resp(&["GET", "k"]));
                }
                raw.send(&requests).await;
                let mut expected = Vec::new();
                for i in 1..=50 {
                    expected.extend(format!(":{i}\r\n$1\r\nv\r\n").into_bytes());
                }
                raw.expect(&expected).await;
                expected
            })
        })
        .collect()
}

#[tokio::test]
async fn held_writes_wait_for_the_flip_then_reach_the_new_owner_in_order() {
    let mut migration = Migration::new();
    for server in [&migration.source, &migration.target] {
        let _: () = direct(server).await.set("k", "v").await.unwrap();
    }
    let proxy = migration.proxy(Duration::from_secs(10)).await;
    migration.apply(1, "writes: paused").await;
    let writers = held_writers(&proxy);
    eventually("three connections held", || async { proxy.metric("eden_writes_holding") == 3 }).await;
    let mut reader = proxy.client().await;
    assert_eq!(reader.get::<_, String>("k").await.unwrap(), "v", "reads continue during the pause");
    let mut target = direct(&migration.target).await;
    let mut source = direct(&migration.source).await;
    assert_eq!(source.exists::<_, i64>(&["held:0", "held:1", "held:2"]).await.unwrap(), 0, "nothing written yet");

    migration.apply(2, "write_policy: new_authoritative").await;
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(5), writer).await.unwrap().unwrap();
    }
    for connection in 0..3 {
        let list: Vec<i64> = target.lrange(format!("held:{connection}"), 0, -1).await.unwrap();
        assert_eq!(list, (0..50).collect::<Vec<_>>(), "connection {connection}: every write, in order, on the target");
    }
    assert_eq!(source.exists::<_, i64>(&["held:0", "held:1", "held:2"]).await.unwrap(), 0);
    assert_eq!(proxy.metric("eden_writes_holding"), 0);
}

#[tokio::test]
async fn held_writes_are_refused_in_order_when_the_pause_times_out_and_reach_no_server() {
    let mut migration = Migration::new();
    for server in [&migration.source, &migration.target] {
        let _: () = direct(server).await.set("k", "v").await.unwrap();
    }
    let proxy = migration.proxy(Duration::from_millis(400)).await;
    // The operator may flip at any moment: an expired pause must not pick a side on its own.
    migration.apply(1, "writes: paused\nwrite_policy: new_authoritative").await;
    let started = std::time::Instant::now();
    let (mut requests, mut expected) = (Vec::new(), Vec::new());
    for i in 0..50 {
        requests.extend(resp(&["RPUSH", "held", &i.to_string()]));
        requests.extend(resp(&["GET", "k"]));
        expected.extend_from_slice(HoldState::refusal(HoldReason::Paused));
        expected.extend_from_slice(b"$1\r\nv\r\n");
    }
    let mut raw = support::RawClient::connect(proxy.addr).await;
    raw.send(&requests).await;
    raw.expect(&expected).await;
    assert!(started.elapsed() >= Duration::from_millis(350), "held until the deadline: {:?}", started.elapsed());
    for server in [&migration.source, &migration.target] {
        let written: i64 = direct(server).await.exists("held").await.unwrap();
        assert_eq!(written, 0, "a refused write reaches no server");
    }
    assert_eq!(proxy.metric("eden_writes_refused_total"), 50);

    // A decision ends the refusal: writes flow to the new owner.
    migration.apply(2, "write_policy: new_authoritative").await;
    let app = proxy.client().await;
    eventually("writes flow again", || async { app.clone().rpush::<_, _, i64>("held", "after").await.is_ok() }).await;
    let on_target: Vec<String> = direct(&migration.target).await.lrange("held", 0, -1).await.unwrap();
    assert_eq!(on_target, ["after"]);
}

#[tokio::test]
async fn a_transaction_whose_first_write_is_refused_is_aborted_and_leaves_no_multi_open() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_millis(300)).await;
    migration.apply(1, "writes: paused").await;
    let mut raw = proxy.raw().await;
    raw.send(&resp(&["MULTI"])).await;
    raw.expect(b"+OK\r\n").await;
    raw.send(&[resp(&["SET", "k", "v"]), resp(&["GET", "k"]), resp(&["EXEC"])].concat()).await;
    let refused = HoldState::refusal(HoldReason::Paused);
    raw.expect(&[refused, b"+QUEUED\r\n-EXECABORT Transaction discarded because of previous errors.\r\n"].concat())
        .await;
    // The MULTI the source answered was discarded there: once writes flow, they run at once.
    migration.apply(2, "").await;
    raw.send(&resp(&["SET", "k", "after"])).await;
    raw.expect(b"+OK\r\n").await;
    assert_eq!(direct(&migration.source).await.get::<_, String>("k").await.unwrap(), "after");
}

#[tokio::test]
async fn shadow_reads_are_answered_by_the_owner_and_mismatches_counted() {
    let mut migration = Migration::new();
    let (mut source, mut target) = (direct(&migration.source).await, direct(&migration.target).await);
    let _: () = source.mset(&[("same", "1"), ("differs", "source")]).await.unwrap();
    let _: () = target.mset(&[("same", "1"), ("differs", "target")]).await.unwrap();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 100\nshadow_read_percentage: 100").await;
    let mut app = proxy.client().await;
    for _ in 0..10 {
        assert_eq!(app.get::<_, String>("same").await.unwrap(), "1");
        assert_eq!(app.get::<_, String>("differs").await.unwrap(), "source", "the owner answers a shadowed read");
    }
    eventually("every comparison counted", || async {
        proxy.metric("eden_shadow_reads_total{outcome=\"match\"}") == 10
            && proxy.metric("eden_shadow_reads_total{outcome=\"mismatch\"}") == 10
    })
    .await;
}

#[tokio::test]
async fn the_target_uses_its_secret_and_connection_state_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let mut migration = Migration::with_target_secret(dir.path());
    migration.apply(1, "read_percentage: 100\nwrite_policy: new_authoritative").await;
    let proxy = migration.proxy(Duration::from_secs(5)).await;

    let mut raw = proxy.raw().await;
    // SELECT is answered by the source and replayed on the target connection, opened after it.
    raw.send(&[resp(&["SELECT", "2"]), resp(&["SET", "k", "in-db-2"]), resp(&["GET", "k"]), resp(&["PING"])].concat())
        .await;
    raw.expect(b"+OK\r\n+OK\r\n$7\r\nin-db-2\r\n+PONG\r\n").await;
    let mut target_db2 = redis::Client::open(format!("redis://:t0p@{}/2", migration.target.addr()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert_eq!(target_db2.get::<_, String>("k").await.unwrap(), "in-db-2", "written by Eden's credentials, in db 2");
}

#[tokio::test]
async fn transactions_run_whole_on_one_side() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 100\nwrite_policy: new_authoritative\nmirror_writes: true").await;
    let mut raw = proxy.raw().await;
    raw.send(&[resp(&["WATCH", "balance"]), resp(&["GET", "balance"])].concat()).await;
    raw.expect(b"+OK\r\n$-1\r\n").await;
    raw.send(
        &[resp(&["MULTI"]), resp(&["INCRBY", "balance", "5"]), resp(&["GET", "balance"]), resp(&["EXEC"])].concat(),
    )
    .await;
    raw.expect(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*2\r\n:5\r\n$1\r\n5\r\n").await;
    assert_eq!(direct(&migration.target).await.get::<_, i64>("balance").await.unwrap(), 5);
    let mut source = direct(&migration.source).await;
    eventually("the mirror ran the same transaction once", || async {
        source.clone().get::<_, Option<i64>>("balance").await.unwrap() == Some(5)
    })
    .await;
    // Subscribing pins the connection to the source: its messages are bytes from then on.
    raw.send(&resp(&["SUBSCRIBE", "news"])).await;
    raw.expect(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n").await;
    let _: i64 = source.publish("news", "hi").await.unwrap();
    raw.expect(b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n").await;
}

/// The strategy after a cutover: the target answers reads and writes, which are mirrored back.
const CUT_OVER: &str = "read_percentage: 100\nwrite_policy: new_authoritative\nmirror_writes: true";

#[tokio::test]
async fn an_interactive_multi_is_answered_at_once_and_runs_whole_on_the_owner_in_every_state() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let (source, target) = (direct(&migration.source).await, direct(&migration.target).await);
    let split = "write_mode: cutover\nwrite_percentage: 50\nmirror_writes: true";
    let owned_by = |on_target: bool| {
        (0..).map(|i| format!("txn:split:{i}")).find(|key| (key_bucket(key.as_bytes()) < 50) == on_target).unwrap()
    };
    // (strategy, key, answered by the target, mirrored to the other side)
    let states = [
        ("read_percentage: 50", "txn:canary".to_string(), false, false),
        ("read_percentage: 50\nmirror_writes: true", "txn:dual".to_string(), false, true),
        ("write_policy: new_authoritative", "txn:new".to_string(), true, false),
        (CUT_OVER, "txn:cut-over".to_string(), true, true),
        (split, owned_by(true), true, true),
        (split, owned_by(false), false, false),
    ];
    // One client through every state, waiting for each reply before it sends on.
    let mut app = proxy.raw().await;
    for (generation, (strategy, key, on_target, mirrored)) in (1..).zip(states) {
        migration.apply(generation, strategy).await;
        let value = generation.to_string();
        app.send(&resp(&["MULTI"])).await;
        app.expect(b"+OK\r\n").await;
        app.send(&resp(&["SET", &key, &value])).await;
        app.expect(b"+QUEUED\r\n").await;
        app.send(&resp(&["GET", &key])).await;
        app.expect(b"+QUEUED\r\n").await;
        app.send(&resp(&["EXEC"])).await;
        app.expect(format!("*2\r\n+OK\r\n${}\r\n{value}\r\n", value.len()).as_bytes()).await;

        let (mut owner, mut other) =
            if on_target { (target.clone(), source.clone()) } else { (source.clone(), target.clone()) };
        assert_eq!(owner.get::<_, Option<String>>(&key).await.unwrap(), Some(value.clone()), "{key} on its owner");
        if mirrored {
            eventually("the mirror ran the transaction", || {
                let (mut other, key, value) = (other.clone(), key.clone(), value.clone());
                async move { other.get::<_, Option<String>>(&key).await.unwrap() == Some(value) }
            })
            .await;
        } else {
            assert_eq!(other.get::<_, Option<String>>(&key).await.unwrap(), None, "{key} only on its owner");
        }
    }

    // WATCH still guards a transaction on the side that owns the watched key.
    let watched = owned_by(true);
    app.send(&resp(&["WATCH", &watched])).await;
    app.expect(b"+OK\r\n").await;
    let _: () = target.clone().set(&watched, "changed by another client").await.unwrap();
    app.send(&resp(&["MULTI"])).await;
    app.expect(b"+OK\r\n").await;
    app.send(&resp(&["SET", &watched, "mine"])).await;
    app.expect(b"+QUEUED\r\n").await;
    app.send(&resp(&["EXEC"])).await;
    app.expect(b"*-1\r\n").await;
    assert_eq!(target.clone().get::<_, String>(&watched).await.unwrap(), "changed by another client");
}

#[tokio::test]
async fn a_multi_during_the_cutover_pause_is_answered_at_once_and_its_writes_reach_the_new_owner() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(10)).await;
    migration.apply(1, "writes: paused").await;
    let mut app = proxy.raw().await;
    app.send(&resp(&["MULTI"])).await;
    app.expect(b"+OK\r\n").await;
    // The first write inside is held until the flip, then queued on the new owner.
    app.send(&resp(&["INCR", "held"])).await;
    eventually("the write is held", || async { proxy.metric("eden_writes_holding") == 1 }).await;
    migration.apply(2, "write_policy: new_authoritative").await;
    app.expect(b"+QUEUED\r\n").await;
    app.send(&resp(&["EXEC"])).await;
    app.expect(b"*1\r\n:1\r\n").await;
    assert_eq!(direct(&migration.target).await.get::<_, Option<i64>>("held").await.unwrap(), Some(1));
    assert_eq!(direct(&migration.source).await.get::<_, Option<i64>>("held").await.unwrap(), None);
}

#[tokio::test]
async fn a_replica_syncs_from_the_source_through_a_routed_session() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, CUT_OVER).await;
    let mut source = direct(&migration.source).await;
    let _: () = source.set("in-snapshot", "snapshot-value").await.unwrap();
    for (handshake, first) in [(resp(&["SYNC"]), &b"$"[..]), (resp(&["PSYNC", "?", "-1"]), b"+FULLRESYNC ")] {
        let mut replica = proxy.raw().await;
        replica.send(&handshake).await;
        let before: Vec<u8> = replica.read_until(b"REDIS0").await.into_iter().filter(|&b| b != b'\n').collect();
        assert!(before.starts_with(first), "{:?}", String::from_utf8_lossy(&before));
        replica.read_until(b"snapshot-value").await;
        // Then the stream of the source's writes, as bytes.
        let streamed = format!("streamed-{}", first.len());
        let _: () = source.set("after-snapshot", &streamed).await.unwrap();
        replica.read_until(streamed.as_bytes()).await;
    }
}

/// redis-py 8.1.0's `Lock` scripts, verbatim: `extend()` and `release()` run them with EVALSHA,
/// loading them with SCRIPT LOAD after a NOSCRIPT.
const LOCK_EXTEND: &str = "\n        local token = redis.call('get', KEYS[1])\n        if not token or token ~= ARGV[1] then\n            return 0\n        end\n        local expiration = redis.call('pttl', KEYS[1])\n        if not expiration then\n            expiration = 0\n        end\n        if expiration < 0 then\n            return 0\n        end\n\n        local newttl = ARGV[2]\n        if ARGV[3] == \"0\" then\n            newttl = ARGV[2] + expiration\n        end\n        redis.call('pexpire', KEYS[1], newttl)\n        return 1\n    ";
const LOCK_RELEASE: &str = "\n        local token = redis.call('get', KEYS[1])\n        if not token or token ~= ARGV[1] then\n            return 0\n        end\n        redis.call('del', KEYS[1])\n        return 1\n    ";
const LIBRARY: &str =
    "#!lua name=eden\nredis.register_function('bump', function(keys) return redis.call('INCR', keys[1]) end)";

async fn load_script(connection: &mut redis::aio::MultiplexedConnection, script: &str) -> String {
    redis::cmd("SCRIPT").arg("LOAD").arg(script).query_async(connection).await.unwrap()
}

async fn script_exists(server: &RedisServer, sha: &str) -> bool {
    let exists: Vec<bool> =
        redis::cmd("SCRIPT").arg("EXISTS").arg(sha).query_async(&mut direct(server).await).await.unwrap();
    exists == [true]
}

#[tokio::test]
async fn scripts_and_functions_loaded_on_one_side_of_a_cutover_run_on_the_other() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let mut target = direct(&migration.target).await;
    migration.apply(1, "read_percentage: 0").await;
    let mut app = proxy.client().await;

    // The target already has the library (replication brought it): it refuses it again, and
    // the client gets the source's answer.
    let load = || redis::cmd("FUNCTION").arg("LOAD").arg(LIBRARY).clone();
    let _: String = load().query_async(&mut target).await.unwrap();
    assert_eq!(load().query_async::<String>(&mut app).await.unwrap(), "eden");
    // A lock acquired before the cutover, as redis-py does (SET NX PX); replication copies it.
    let (extend, release) = (load_script(&mut app, LOCK_EXTEND).await, load_script(&mut app, LOCK_RELEASE).await);
    assert!(script_exists(&migration.target, &extend).await, "loaded on the target too");
    let acquired: Option<String> =
        redis::cmd("SET").arg(&["lock", "token", "NX", "PX", "10000"]).query_async(&mut app).await.unwrap();
    assert_eq!(acquired.as_deref(), Some("OK"));
    let _: () = redis::cmd("SET").arg(&["lock", "token", "PX", "10000"]).query_async(&mut target).await.unwrap();

    // After the cutover the target runs them.
    migration.apply(2, CUT_OVER).await;
    let evalsha = |sha: &str, args: &[&str]| redis::cmd("EVALSHA").arg(sha).arg(1).arg("lock").arg(args).clone();
    assert_eq!(evalsha(&extend, &["token", "60000", "0"]).query_async::<i64>(&mut app).await.unwrap(), 1, "extended");
    assert!(target.pttl::<_, i64>("lock").await.unwrap() > 60_000);
    let bumped: i64 = redis::cmd("FCALL").arg(&["bump", "1", "calls"]).query_async(&mut app).await.unwrap();
    assert_eq!((bumped, target.get::<_, i64>("calls").await.unwrap()), (1, 1));
    assert_eq!(evalsha(&release, &["token"]).query_async::<i64>(&mut app).await.unwrap(), 1, "released");
    assert_eq!(target.exists::<_, i64>("lock").await.unwrap(), 0);

    // Loaded after the cutover, run after a rollback, on the source.
    let after = load_script(&mut app, "return 'loaded after the cutover'").await;
    migration.apply(3, "read_percentage: 0").await;
    let ran: String = redis::cmd("EVALSHA").arg(&after).arg(0).query_async(&mut app).await.unwrap();
    assert_eq!(ran, "loaded after the cutover");

    // Flushed everywhere.
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query_async(&mut app).await.unwrap();
    for server in [&migration.source, &migration.target] {
        assert!(!script_exists(server, &after).await, "flushed on {}", server.url());
    }
}

async fn config_get(connection: &mut redis::aio::MultiplexedConnection, name: &str) -> String {
    let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query_async(connection).await.unwrap();
    pair[1].clone()
}

#[tokio::test]
async fn admin_commands_answer_for_the_server_that_serves_the_clients_data() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let (mut source, mut target) = (direct(&migration.source).await, direct(&migration.target).await);
    migration.apply(1, CUT_OVER).await;
    let mut app = proxy.client().await;

    // The setting, the write and the question about it all reach the target.
    let _: () =
        redis::cmd("CONFIG").arg(&["SET", "hash-max-listpack-value", "1000"]).query_async(&mut app).await.unwrap();
    let _: i64 = app.hset("hash", "field", "x".repeat(200)).await.unwrap();
    let encoding = || redis::cmd("OBJECT").arg(&["ENCODING", "hash"]).clone();
    assert_eq!(encoding().query_async::<String>(&mut app).await.unwrap(), "listpack");
    assert_eq!(config_get(&mut target, "hash-max-listpack-value").await, "1000");
    assert_eq!(config_get(&mut source, "hash-max-listpack-value").await, "64", "the source keeps its own");

    // A client blocked through the sidecar waits on the target: that is the server INFO and
    // CLIENT LIST describe.
    let mut blocked = proxy.raw().await;
    blocked.send(&resp(&["BLPOP", "queue", "0"])).await;
    eventually("INFO counts the blocked client", || {
        let mut app = app.clone();
        async move {
            let info: String = redis::cmd("INFO").arg("clients").query_async(&mut app).await.unwrap();
            info.contains("blocked_clients:1\r\n")
        }
    })
    .await;
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut app).await.unwrap();
    assert!(clients.contains("cmd=blpop"), "{clients}");
    let _: i64 = app.lpush("queue", "item").await.unwrap();
    blocked.expect(b"*2\r\n$5\r\nqueue\r\n$4\r\nitem\r\n").await;

    // Before the cutover it is the source, whatever share of reads the target serves.
    eventually("the hash mirrored to the source", || {
        let mut source = source.clone();
        async move { source.exists::<_, bool>("hash").await.unwrap() }
    })
    .await;
    migration.apply(2, "read_percentage: 100").await;
    for _ in 0..20 {
        assert_eq!(encoding().query_async::<String>(&mut app).await.unwrap(), "hashtable", "the source's encoding");
    }
}

#[tokio::test]
async fn a_redis_py_lock_taken_before_the_cutover_is_extended_and_released_after_it() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 0").await;
    let script = eden_e2e::repo_root().join("sidecar/tests/clients/redis_py_lock.py");
    let mut python = tokio::process::Command::new(eden_e2e::python_clients().unwrap())
        .arg(script)
        .arg(proxy.url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(python.stdout.take().unwrap()).lines();
    let mut step = async || tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await.unwrap().unwrap();
    assert_eq!(step().await.as_deref(), Some("acquired"));

    // Replication copies the lock to the target; then the cutover.
    let mut source = direct(&migration.source).await;
    let (token, ttl): (String, i64) = (source.get("lock").await.unwrap(), source.pttl("lock").await.unwrap());
    let _: () = direct(&migration.target).await.pset_ex("lock", token, ttl as u64).await.unwrap();
    migration.apply(2, CUT_OVER).await;
    python.stdin.take().unwrap().write_all(b"go\n").await.unwrap();
    let released = step().await.unwrap();
    let extended_ttl: i64 = released.strip_prefix("released ").unwrap().parse().unwrap();
    assert!(extended_ttl > 50_000, "extended on the target: {released}");
    assert_eq!(direct(&migration.target).await.exists::<_, i64>("lock").await.unwrap(), 0, "released on the target");
    assert!(python.wait().await.unwrap().success());
}

async fn blocked_clients(server: &RedisServer) -> String {
    let info: String = redis::cmd("INFO").arg("clients").query_async(&mut direct(server).await).await.unwrap();
    info.lines().find_map(|line| line.strip_prefix("blocked_clients:")).unwrap().to_string()
}

#[tokio::test]
async fn a_client_that_disconnects_while_blocked_leaves_no_pop_waiting_on_either_side() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "write_mode: cutover\nwrite_percentage: 50").await;
    let owned_by = |on_target: bool| {
        (0..).map(|i| format!("queue:{i}")).find(|key| (key_bucket(key.as_bytes()) < 50) == on_target).unwrap()
    };
    let mut app = proxy.client().await;
    for (key, owner) in [(owned_by(true), &migration.target), (owned_by(false), &migration.source)] {
        let mut waiting = proxy.raw().await;
        waiting.send(&resp(&["BLPOP", &key, "0"])).await;
        eventually("the pop waits on the key's owner", || async { blocked_clients(owner).await == "1" }).await;
        drop(waiting);
        eventually("the pop is gone with its client", || async { blocked_clients(owner).await == "0" }).await;
        let _: i64 = app.lpush(&key, "item").await.unwrap();
        assert_eq!(direct(owner).await.llen::<_, i64>(&key).await.unwrap(), 1, "{key}: nobody took the item");
    }
}

/// `HELLO <version>`, read up to the end of its reply (the last field is an empty module list).
async fn hello(raw: &mut support::RawClient, version: &str) {
    raw.send(&resp(&["HELLO", version])).await;
    raw.read_until(b"$7\r\nmodules\r\n*0\r\n").await;
}

#[tokio::test]
async fn hello_switches_the_protocol_on_both_sides() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    for server in [&migration.source, &migration.target] {
        let _: i64 = direct(server).await.hset("hash", "f", "v").await.unwrap();
    }
    migration.apply(1, "read_percentage: 50").await;
    let mut raw = proxy.raw().await;
    for (version, reply) in [("3", &b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"[..]), ("2", b"*2\r\n$1\r\nf\r\n$1\r\nv\r\n")] {
        hello(&mut raw, version).await;
        for _ in 0..20 {
            raw.send(&resp(&["HGETALL", "hash"])).await;
            raw.expect(reply).await;
        }
    }
    assert!(proxy.metric("eden_commands_total{route=\"target\",kind=\"read\"}") > 0, "the target answered some");
}

#[tokio::test]
async fn reset_ends_a_transaction_on_whichever_side_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    // The target is authenticated by Eden: the client's RESET never reaches it.
    let mut migration = Migration::with_target_secret(dir.path());
    migration.apply(1, CUT_OVER).await;
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let mut raw = proxy.raw().await;
    raw.send(&[resp(&["MULTI"]), resp(&["RESET"]), resp(&["SET", "k", "v"]), resp(&["EXEC"])].concat()).await;
    raw.expect(b"+OK\r\n+RESET\r\n+OK\r\n-ERR EXEC without MULTI\r\n").await;

    raw.send(&[resp(&["WATCH", "k"]), resp(&["RESET"])].concat()).await;
    raw.expect(b"+OK\r\n+RESET\r\n").await;
    let mut target = redis::Client::open(format!("redis://:t0p@{}", migration.target.addr()))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = target.set("k", "changed by another client").await.unwrap();
    raw.send(&[resp(&["MULTI"]), resp(&["SET", "k", "mine"]), resp(&["EXEC"])].concat()).await;
    raw.expect(b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n").await;
    assert_eq!(target.get::<_, String>("k").await.unwrap(), "mine", "no longer watched");
}

#[tokio::test]
async fn client_side_caching_hears_of_writes_on_either_side() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    for server in [&migration.source, &migration.target] {
        let _: () = direct(server).await.set("cached", "v").await.unwrap();
    }
    migration.apply(1, "read_percentage: 50").await;
    let mut raw = proxy.raw().await;
    hello(&mut raw, "3").await;
    raw.send(&resp(&["CLIENT", "TRACKING", "ON"])).await;
    raw.expect(b"+OK\r\n").await;
    for _ in 0..20 {
        raw.send(&resp(&["GET", "cached"])).await;
        raw.expect(b"$1\r\nv\r\n").await;
    }
    // The value changes on both sides (replication brings the source's write to the target):
    // each side that served it says so.
    let invalidate = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$6\r\ncached\r\n";
    for server in [&migration.source, &migration.target] {
        let _: () = direct(server).await.set("cached", "new").await.unwrap();
        raw.expect(invalidate).await;
    }
}

#[tokio::test]
async fn client_settings_follow_the_client_to_every_side() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 0").await;
    let mut raw = proxy.raw().await;
    let settings = [resp(&["CLIENT", "SETNAME", "checkout"]), resp(&["CLIENT", "NO-EVICT", "ON"])];
    raw.send(&settings.concat()).await;
    raw.expect(b"+OK\r\n+OK\r\n").await;

    // After the cutover the target serves the client, on a connection opened since.
    migration.apply(2, CUT_OVER).await;
    raw.send(&resp(&["CLIENT", "GETNAME"])).await;
    raw.expect(b"$8\r\ncheckout\r\n").await;
    let clients: String =
        redis::cmd("CLIENT").arg("LIST").query_async(&mut direct(&migration.target).await).await.unwrap();
    let named = |line: &&str| line.contains(" name=checkout ") && line.contains(" flags=e ");
    assert_eq!(clients.lines().filter(named).count(), 1, "{clients}");
}

#[tokio::test]
async fn a_transaction_whose_target_connection_closes_closes_the_client_instead_of_running_outside_it() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, CUT_OVER).await;
    let mut raw = proxy.raw().await;
    raw.send(&[resp(&["MULTI"]), resp(&["SET", "a", "1"])].concat()).await;
    raw.expect(b"+OK\r\n+QUEUED\r\n").await;
    let mut target = direct(&migration.target).await;
    let killed: i64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "normal"]).query_async(&mut target).await.unwrap();
    assert!(killed >= 1, "the session's connection to the target");

    // The next request finds the connection gone, or is written to it and its reply never
    // comes: either way it must not run on a new connection, outside the transaction.
    raw.send(&resp(&["SET", "b", "2"])).await;
    assert_eq!(raw.read_to_close().await, "", "closed without a reply");
    let written: i64 = target.exists(&["a", "b"]).await.unwrap();
    assert_eq!(written, 0, "nothing of the transaction ran");
}

#[tokio::test]
async fn a_request_whose_server_goes_before_it_answers_closes_the_client_as_the_server_would() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, CUT_OVER).await;
    let mut raw = proxy.raw().await;
    // A reply the target owes (it blocks until it is killed), behind one it gave: an error
    // reply would tell the client that a request the target may have run did not run.
    raw.send(&[resp(&["SET", "before", "1"]), resp(&["BLPOP", "queue", "0"])].concat()).await;
    raw.expect(b"+OK\r\n").await;
    eventually("the pop waits on the target", || async { blocked_clients(&migration.target).await == "1" }).await;
    let mut target = direct(&migration.target).await;
    let killed: i64 = redis::cmd("CLIENT").arg(&["KILL", "TYPE", "normal"]).query_async(&mut target).await.unwrap();
    assert!(killed >= 1, "the session's connection to the target");
    assert_eq!(raw.read_to_close().await, "", "closed without a reply, as by Redis");
    // The sidecar stays up, and a new connection is served by the target again.
    let mut app = proxy.client().await;
    assert_eq!(app.get::<_, Option<String>>("before").await.unwrap().as_deref(), Some("1"));
}

#[tokio::test]
async fn hello_with_the_clients_credentials_switches_the_protocol_of_a_target_eden_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let mut migration = Migration::with_target_secret(dir.path());
    migration.apply(1, CUT_OVER).await;
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let mut raw = proxy.raw().await;
    // As Lettuce and redis-py (protocol 3) greet a server when given a password; the source
    // has none, so any password passes there.
    raw.send(&resp(&["HELLO", "3", "AUTH", "default", "the-source-password"])).await;
    raw.read_until(b"$7\r\nmodules\r\n*0\r\n").await;
    raw.send(&[resp(&["HSET", "hash", "f", "v"]), resp(&["HGETALL", "hash"])].concat()).await;
    raw.expect(b":1\r\n%1\r\n$1\r\nf\r\n$1\r\nv\r\n").await;
}

#[tokio::test]
async fn a_connection_pinned_to_the_source_is_closed_rather_than_write_there_after_the_flip() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 0").await;
    // A pooled connection that once subscribed, as Jedis hands it out again.
    let mut raw = proxy.raw().await;
    raw.send(&resp(&["SUBSCRIBE", "news"])).await;
    raw.expect(b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n").await;
    raw.send(&resp(&["UNSUBSCRIBE", "news"])).await;
    raw.expect(b"*3\r\n$11\r\nunsubscribe\r\n$4\r\nnews\r\n:0\r\n").await;
    raw.send(&resp(&["SET", "before", "1"])).await;
    raw.expect(b"+OK\r\n").await;

    // Its writes wait out the cutover pause like any others, then find the target owning them.
    migration.apply(2, "writes: paused").await;
    raw.send(&resp(&["SET", "after", "1"])).await;
    eventually("the write is held", || async { proxy.metric("eden_writes_holding") == 1 }).await;
    migration.apply(3, CUT_OVER).await;
    assert_eq!(raw.read_to_close().await, "", "closed, without a reply");
    for server in [&migration.source, &migration.target] {
        assert_eq!(direct(server).await.exists::<_, i64>("after").await.unwrap(), 0, "{}", server.url());
    }
    assert_eq!(direct(&migration.source).await.get::<_, String>("before").await.unwrap(), "1");
}

#[tokio::test]
async fn canary_reads_reach_the_target_only_while_replication_keeps_it_fresh_and_each_client_reads_its_writes() {
    let mut migration = Migration::new();
    let [source, target] = migration.servers();
    let replicator = Replicator::start(&source, &target, Mode::Sync, ReplicatorOptions::default(), None).await.unwrap();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 100\nmax_lag_ms: 100").await;
    let target_reads = || proxy.metric("eden_commands_total{route=\"target\",kind=\"read\"}");

    // A client that only reads is served by the target once the engine's beats show it fresh.
    let reader = proxy.client().await;
    eventually_within("the target serves reads", Duration::from_secs(30), || async {
        let _: Option<i64> = reader.clone().get("k").await.unwrap();
        target_reads() > 0
    })
    .await;

    // A client that writes always reads what it wrote, whichever side serves it.
    let mut writer = proxy.client().await;
    for n in 1..=200 {
        let _: () = writer.set("k", n).await.unwrap();
        let read: i64 = writer.get("k").await.unwrap();
        assert_eq!(read, n, "read-your-writes");
        let _: () = writer.incr("log", 1).await.unwrap();
    }

    // The engine stops, as when its operator crashes: past the lag guard nobody reads the
    // target, though nothing told the sidecar.
    replicator.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = target_reads();
    let mut on_source = direct(&migration.source).await;
    for n in 1_000..1_050 {
        let _: () = on_source.set("k", n).await.unwrap();
        let read: i64 = reader.clone().get("k").await.unwrap();
        assert_eq!(read, n, "a stale target serves no read");
    }
    assert_eq!(target_reads(), before, "no read reached the target once it went stale");
}

/// The freshness argument's claim, checked directly in both modes: whenever a sidecar's follower
/// publishes a covered instant, the target holds every write the source acknowledged before it.
/// The engine reaches the source over a slow link (every chunk held 30 ms), so the source
/// acknowledges writes long before the engine can see them: a claim made from what the engine
/// has received would be false here. The writer never pauses: the engine must beat under a key
/// that is always being written.
#[tokio::test]
async fn every_covered_instant_holds_on_the_target_even_when_the_engine_hears_the_source_late() {
    for mode in [Mode::Sync, Mode::Scan] {
        let migration = Migration::new();
        let [_, target] = migration.servers();
        let slow = eden_e2e::Relay::start(migration.source.addr()).await.unwrap();
        slow.delay(Duration::from_millis(30));
        let slow_source = Server::parse(&format!("redis://{}", slow.addr()), TlsSettings::default()).unwrap();
        let replicator =
            Replicator::start(&slow_source, &target, mode, ReplicatorOptions::default(), None).await.unwrap();
        let upstream = Upstream::new(&migration.target.url(), &TlsSettings::default(), Duration::from_secs(1)).unwrap();
        let mut covered = eden_sidecar::freshness::follow(upstream);
        eventually_within("the engine beats", Duration::from_secs(30), || async { covered.borrow().is_some() }).await;

        // Writes acknowledged by the source, each with the instant its reply was in hand.
        let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(tokio::time::Instant, i64)>::new()));
        let writer = {
            let (acknowledged, mut source) = (acknowledged.clone(), direct(&migration.source).await);
            tokio::spawn(async move {
                let until = tokio::time::Instant::now() + Duration::from_secs(3);
                while tokio::time::Instant::now() < until {
                    let n: i64 = source.incr("counter", 1).await.unwrap();
                    acknowledged.lock().unwrap().push((tokio::time::Instant::now(), n));
                }
            })
        };
        let mut on_target = direct(&migration.target).await;
        let (mut checked, mut last) = (0, None);
        while !writer.is_finished() {
            let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(100), covered.changed()).await else {
                continue;
            };
            let Some(fresh) = *covered.borrow_and_update() else { continue };
            if last == Some(fresh.covered) {
                continue; // only confirmed again
            }
            last = Some(fresh.covered);
            let held: Option<i64> = on_target.get("counter").await.unwrap();
            let owed =
                acknowledged.lock().unwrap().iter().rev().find(|(at, _)| *at < fresh.covered).map_or(0, |(_, n)| *n);
            assert!(
                held.unwrap_or(0) >= owed,
                "{mode:?}: the target holds {held:?}, but {owed} was acknowledged before the covered instant"
            );
            checked += 1;
        }
        eprintln!("{mode:?}: {checked} covered instants held on the target");
        assert!(checked >= 10, "{mode:?}: only {checked} covered instants to check");
        replicator.stop().await.unwrap();
    }
}

/// The edge where a claim stops being true: a restarted engine that must copy everything again
/// empties the target first. It removes the freshness record and waits before it flushes, so a
/// sidecar has stopped trusting the target by then, however long its lag guard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sidecar_trusts_the_target_once_a_restart_empties_it() {
    let migration = Migration::new();
    let [source, target] = migration.servers();
    let mut on_source = direct(&migration.source).await;
    for i in 0..2_000 {
        let _: () = on_source.set(format!("key:{i}"), i).await.unwrap();
    }
    let replicator = Replicator::start(&source, &target, Mode::Sync, ReplicatorOptions::default(), None).await.unwrap();
    let upstream = Upstream::new(&migration.target.url(), &TlsSettings::default(), Duration::from_secs(1)).unwrap();
    let covered = eden_sidecar::freshness::follow(upstream);
    let guard = Duration::from_secs(60); // a lag guard that would not end the trust by itself
    let trusted = move || covered.borrow().and_then(|fresh| fresh.covered_within(guard)).is_some();
    eventually_within("the target is trusted", Duration::from_secs(30), || async { trusted() }).await;

    // The restart cannot continue the stream: the target lost its position record. A key of
    // the target's own shows when it is emptied: nothing copies it back.
    let checkpoint = replicator.checkpoint();
    drop(replicator);
    let mut on_target = direct(&migration.target).await;
    let _: () = on_target.del(eden_sidecar::replicate::POSITION_KEY).await.unwrap();
    let _: () = on_target.set("only-on-the-target", 1).await.unwrap();
    let restarted = tokio::spawn(async move {
        Replicator::start(&source, &target, Mode::Sync, ReplicatorOptions::default(), Some(checkpoint)).await.unwrap()
    });
    // Sampled every millisecond: the last instant the sidecar trusted the target, and the first
    // the target was seen emptied.
    let mut last_trusted = None;
    let sampling = async {
        loop {
            if trusted() {
                last_trusted = Some(tokio::time::Instant::now());
            }
            if !on_target.exists::<_, bool>("only-on-the-target").await.unwrap() {
                break tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let emptied =
        tokio::time::timeout(Duration::from_secs(30), sampling).await.expect("the restart empties the target");
    let last_trusted = last_trusted.expect("trusted until the restart began");
    assert!(last_trusted < emptied, "trusted {:?} after the target was emptied", last_trusted - emptied);
    assert!(!trusted(), "and not since");
    restarted.await.unwrap().stop().await.unwrap();
}

#[tokio::test]
async fn a_pause_is_reported_only_once_every_earlier_write_was_answered() {
    let mut migration = Migration::new();
    let (proxy, routing) =
        Proxy::routed(&migration.source.url(), migration.config.clone(), Duration::from_secs(30)).await;
    let (leases, reporter) = migration.lease_reporter("app-4", &proxy).await;
    let reporter = reporter.with_hold(routing.hold());
    tokio::spawn(reporter.clone().run());
    migration.apply(1, "").await;
    wait_for_lease(&leases, &reporter.lease_name(), |a| a[ANNOTATION_WRITES] == "flowing").await;

    // A write on its way to a source that does not answer yet, when the pause arrives.
    let mut app = proxy.client().await;
    migration.source.freeze().unwrap();
    let write = tokio::spawn(async move { app.set::<_, _, ()>("k", "v").await });
    eventually("the write is in flight", || async { proxy.metric("eden_writes_in_flight") == 1 }).await;
    migration.apply(2, "writes: paused").await;
    wait_for_lease(&leases, &reporter.lease_name(), |a| a[ANNOTATION_GENERATION] == "2").await;
    let lease = wait_for_lease(&leases, &reporter.lease_name(), |a| a[ANNOTATION_WRITES] == "pausing").await;
    assert_eq!(lease.metadata.annotations.unwrap()[ANNOTATION_WRITES], "pausing", "not yet holding everything");

    // Answered: now every write this sidecar routed is on the source, and it says so.
    migration.source.thaw().unwrap();
    write.await.unwrap().unwrap();
    wait_for_lease(&leases, &reporter.lease_name(), |a| a[ANNOTATION_WRITES] == "paused").await;
}

#[tokio::test]
async fn a_scan_through_a_read_canary_sees_every_key_once() {
    let mut migration = Migration::new();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    let keys: Vec<String> = (0..2000).map(|i| format!("key:{i}")).collect();
    for server in [&migration.source, &migration.target] {
        let mut pipeline = redis::pipe();
        for key in &keys {
            pipeline.set(key, 1).ignore();
            pipeline.hset("hash", key, 1).ignore();
        }
        let _: () = pipeline.query_async(&mut direct(server).await).await.unwrap();
    }
    migration.apply(1, "read_percentage: 50").await;
    let mut app = proxy.client().await;
    for (command, key) in [("SCAN", None), ("HSCAN", Some("hash"))] {
        let (mut cursor, mut seen) = (0u64, Vec::new());
        loop {
            let mut call = redis::cmd(command);
            call.arg(key).arg(cursor).arg("COUNT").arg(20);
            let (next, batch): (u64, Vec<String>) = call.query_async(&mut app).await.unwrap();
            // HSCAN returns fields and values.
            seen.extend(batch.into_iter().step_by(if key.is_some() { 2 } else { 1 }));
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        seen.sort();
        seen.dedup();
        let mut expected = keys.clone();
        if key.is_none() {
            expected.push("hash".into());
        }
        expected.sort();
        assert_eq!(seen, expected, "{command}: every key, from one server's cursor");
    }
}

#[tokio::test]
async fn a_frozen_target_holds_no_canary_read_past_its_deadline_and_its_late_replies_are_dropped() {
    let mut migration = Migration::new();
    let _: () = direct(&migration.source).await.set("k", "source").await.unwrap();
    let _: () = direct(&migration.target).await.set("k", "target").await.unwrap();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 100\ntarget_read_deadline_ms: 50").await;
    let mut raw = support::RawClient::connect(proxy.addr).await;
    let get = resp(&["GET", "k"]);
    raw.send(&get).await;
    raw.expect(b"$6\r\ntarget\r\n").await;

    // Frozen: a pipeline of canary reads is answered by the source, in order, the first after
    // the deadline and the rest without waiting for the target at all.
    migration.target.freeze().unwrap();
    let started = std::time::Instant::now();
    raw.send(&get.repeat(20)).await;
    raw.expect(&b"$6\r\nsource\r\n".repeat(20)).await;
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(1_000), "answered within the deadline, not the freeze: {waited:?}");
    assert!(proxy.metric("eden_target_reads_late_total") >= 1);

    // Back: the replies the target owed those reads are dropped, and it answers its own again.
    migration.target.thaw().unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await; // past the session's cooldown
    for _ in 0..3 {
        raw.send(&get.repeat(5)).await;
        raw.expect(&b"$6\r\ntarget\r\n".repeat(5)).await;
    }
}
