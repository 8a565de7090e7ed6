//! The strategy in action, on real source and target redis-servers: the read share follows
//! ConfigMap patches on a live connection, each write mode answers from the right side and
//! mirrors exactly once, a dead mirror never fails a client, writes the source misses after the
//! flip are reported in the Lease, held writes survive a cutover pause in order, and shadow reads count what differs.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use eden_e2e::{ControlPlane, RedisConfig, RedisServer};
use eden_sidecar::config::{Applier, CurrentConfig, PAYLOAD_KEY};
use eden_sidecar::hold::{HoldReason, HoldState};
use eden_sidecar::lease::{
    ANNOTATION_CONFIG_ERROR, ANNOTATION_GENERATION, ANNOTATION_LOST_SOURCE_WRITES, ANNOTATION_LOST_TARGET_WRITES,
    ANNOTATION_WRITES, LeaseReporter,
};
use eden_sidecar::replicate::{Mode, Replicator, ReplicatorOptions};
use eden_sidecar::route::key_bucket;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use redis::AsyncCommands;
use support::{Proxy, resp, wait_for_lease};

/// Two servers and a strategy fed straight to an [`Applier`].
struct Migration {
    source: RedisServer,
    target: RedisServer,
    applier: Applier,
    config: CurrentConfig,
}

impl Migration {
    fn new() -> Migration {
        Migration::with_target(RedisServer::start().unwrap())
    }

    fn with_target(target: RedisServer) -> Migration {
        let (applier, config) = Applier::new();
        Migration { source: RedisServer::start().unwrap(), target, applier, config }
    }

    /// An `eden.yaml` naming these servers, with `fields` (YAML lines) on top.
    fn payload(&self, generation: u64, fields: &str) -> String {
        format!(
            "generation: {generation}\nmigration: shop/cache\nsource: {{uri: '{}'}}\ntarget: {{uri: '{}'}}\n{fields}\n",
            self.source.url(),
            self.target.url()
        )
    }

    /// Applies a payload and waits until routing uses it.
    async fn apply(&mut self, generation: u64, fields: &str) {
        assert!(self.applier.offer(&self.payload(generation, fields), "test"), "a valid payload");
        let applied = self.config.wait_for(|c| c.as_ref().is_some_and(|c| c.generation == generation));
        tokio::time::timeout(Duration::from_secs(5), applied).await.unwrap().unwrap();
        // The plan is rebuilt from the configuration by its own task.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    async fn proxy(&self, max_pause: Duration) -> Proxy {
        Proxy::routed(&self.source.url(), self.config.clone(), max_pause).await.0
    }

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

async fn direct(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Waits until `probe` holds (mirrors are asynchronous).
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut probe: impl FnMut() -> F) {
    for _ in 0..250 {
        if probe().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never: {what}");
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
    std::fs::write(dir.path().join("password"), "t0p\n").unwrap();
    let target = RedisServer::with_config(RedisConfig::default().directive("requirepass", "t0p")).unwrap();
    let mut migration = Migration::with_target(target);
    let secret = dir.path().join("password").display().to_string();
    let fields = "read_percentage: 100\nwrite_policy: new_authoritative";
    let payload = migration.payload(1, fields).replace(
        &format!("target: {{uri: '{}'}}", migration.target.url()),
        &format!("target: {{uri: '{}', credentials_file: '{secret}'}}", migration.target.url()),
    );
    assert!(migration.applier.offer(&payload, "test"));
    migration.config.wait_for(|c| c.is_some()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
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

#[tokio::test]
async fn canary_reads_reach_the_target_only_while_replication_keeps_it_fresh_and_each_client_reads_its_writes() {
    let mut migration = Migration::new();
    let (source, target) = (migration.source.url(), migration.target.url());
    let replicator = Replicator::start(&source, &target, Mode::Sync, ReplicatorOptions::default(), None).await.unwrap();
    let proxy = migration.proxy(Duration::from_secs(5)).await;
    migration.apply(1, "read_percentage: 100\nmax_lag_ms: 100").await;
    let target_reads = || proxy.metric("eden_commands_total{route=\"target\",kind=\"read\"}");

    // A client that only reads is served by the target once the engine's beats show it fresh.
    let reader = proxy.client().await;
    eventually("the target serves reads", || async {
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
