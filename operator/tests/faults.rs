//! Faults during a migration, caused for real while writers run through eden-sidecar processes
//! (the command line the webhook injects): a sidecar cut off from the API server, the operator
//! killed mid-cutover, the ConfigMap deleted or corrupted. Each scenario ends by checking, on the
//! server that is authoritative then, that every write a client saw acknowledged is there exactly
//! once, and how long the writers waited (DESIGN §9, "Fencing").

mod support;

use std::time::Duration;

use eden_e2e::writers::{Acknowledged, Client, write_and_read_until};
use eden_e2e::{ControlPlane, RedisServer, Relay};
use eden_operator::crd::Phase;
use eden_sidecar::config::{EdenConfig, PAYLOAD_KEY, WritePolicy, WritesState};
use eden_sidecar::route::Side;
use futures::StreamExt;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use redis::AsyncCommands;
use support::*;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// An `eden-sidecar` process with the command line the webhook injects, on free loopback
/// ports, reaching the API server through `kubeconfig`. Short fencing bounds keep the test
/// quick; the argument does not depend on their size.
struct SidecarProcess {
    child: std::process::Child,
    port: u16,
    admin: u16,
    command: std::process::Command,
}

impl SidecarProcess {
    fn spawn(
        files: &Files,
        namespace: &str,
        pod: &Pod,
        source: &RedisServer,
        kubeconfig: &std::path::Path,
        target: Option<&Relay>,
    ) -> SidecarProcess {
        let (port, admin) = (eden_e2e::free_port().unwrap(), eden_e2e::free_port().unwrap());
        let log = std::fs::File::create(files.path(&format!("{}.log", pod.name))).unwrap();
        let mut command = std::process::Command::new(eden_e2e::workspace_binary("sidecar", "eden-sidecar").unwrap());
        command
            .args(["--listen", &format!("127.0.0.1:{port}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--source", &source.url(), "--configmap", "eden-shop", "--namespace", namespace])
            .args(["--pod-name", pod.name, "--confirm-every-ms", "200"])
            .args(["--fence-after-ms", &pod.fenced_after_ms.to_string(), "--max-write-pause-ms", "3000"]);
        if let Some(relay) = target {
            command.args(["--target", &format!("redis://{}", relay.addr())]);
        }
        command.env("KUBECONFIG", kubeconfig).stdout(std::process::Stdio::null()).stderr(log);
        let child = command.spawn().unwrap();
        SidecarProcess { child, port, admin, command }
    }

    /// Kills the process (SIGKILL: no clean shutdown, replies in flight are lost) and starts
    /// it again with the same command line, as the kubelet restarts a container.
    fn restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = self.command.spawn().unwrap();
    }

    /// Reads the target has served for this sidecar so far.
    fn target_reads(&self) -> u64 {
        eden_e2e::writers::target_reads(("127.0.0.1", self.admin))
    }

    /// A client of this sidecar.
    fn client(&self) -> Client {
        Client { address: format!("127.0.0.1:{}", self.port), drops: false }
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One sidecar of a scenario: its pod name, the relay through which it reaches the API server
/// (to cut), whether it reaches the target through a relay of its own (to cut), and its bound.
#[derive(Clone, Copy)]
struct Pod<'a> {
    name: &'static str,
    api: Option<&'a Relay>,
    relayed_target: bool,
    fenced_after_ms: u64,
    restarted: bool,
}

impl<'a> Pod<'a> {
    fn new(name: &'static str) -> Pod<'a> {
        Pod { name, api: None, relayed_target: false, fenced_after_ms: 2_000, restarted: false }
    }

    fn api_via(self, relay: &'a Relay) -> Pod<'a> {
        Pod { api: Some(relay), ..self }
    }

    fn target_via_relay(self) -> Pod<'a> {
        Pod { relayed_target: true, ..self }
    }

    fn fenced_after(self, fenced_after_ms: u64) -> Pod<'a> {
        Pod { fenced_after_ms, ..self }
    }

    /// Its sidecar will be restarted: its clients connect again when it drops them (as they do
    /// when its target is cut off, with requests in flight there).
    fn restarted(self) -> Pod<'a> {
        Pod { restarted: true, ..self }
    }
}

/// A migration `shop` whose clients write through eden-sidecar processes.
struct Scenario {
    harness: Harness,
    source: RedisServer,
    target: RedisServer,
    sidecars: Vec<SidecarProcess>,
    /// The relays to the target, of the sidecars that asked for one.
    target_relays: Vec<Relay>,
    stop: watch::Sender<bool>,
    /// A writer per sidecar, each with a client of its sidecar that only reads (so its reads
    /// may go to the target).
    writers: Vec<(&'static str, JoinHandle<Acknowledged>)>,
    /// Held for its `Drop`: removed after the sidecars are stopped.
    _files: Files,
}

/// The sidecars' logs and kubeconfigs of one scenario: removed with it, kept (and named) when
/// it fails.
struct Files(Option<tempfile::TempDir>);

impl Files {
    fn new(namespace: &str) -> Files {
        Files(Some(tempfile::Builder::new().prefix(&format!("{namespace}-")).tempdir().unwrap()))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.as_ref().unwrap().path().join(name)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.0.take()
        {
            eprintln!("the sidecars' logs are kept in {}", dir.keep().display());
        }
    }
}

impl Scenario {
    /// Writers start once the migration is Ready.
    async fn start(prefix: &str, pods: &[Pod<'_>]) -> Scenario {
        let harness = Harness::start(prefix).await;
        let (source, target) = (RedisServer::start().unwrap(), RedisServer::start().unwrap());
        harness.apply(&endpoints(&source, &target));
        harness.apply(&migration("shop", "sync", 0, "oldAuthoritative"));
        harness.wait_phase("shop", Phase::Ready).await;
        Scenario::with_writers(harness, source, target, pods).await
    }

    /// Writers start before the copy of `source` (the Migration's `data`): the target Endpoint
    /// names a port nothing listens on until every sidecar serves.
    async fn copying(prefix: &str, pods: &[Pod<'_>], source: RedisServer, data: &str) -> Scenario {
        let harness = Harness::start(prefix).await;
        let target = RedisServer::start().unwrap();
        let nowhere = format!("redis://127.0.0.1:{}", eden_e2e::free_port().unwrap());
        harness.apply(&endpoints_at(&source.url(), &nowhere));
        harness.apply(&migration("shop", data, 0, "oldAuthoritative"));
        let scenario = Scenario::with_writers(harness, source, target, pods).await;
        scenario.harness.apply(&endpoints(&scenario.source, &scenario.target));
        scenario
    }

    async fn with_writers(harness: Harness, source: RedisServer, target: RedisServer, pods: &[Pod<'_>]) -> Scenario {
        let files = Files::new(&harness.namespace);
        let (stop, stopped) = watch::channel(false);
        let (mut processes, mut writers, mut target_relays) = (Vec::new(), Vec::new(), Vec::new());
        for pod in pods {
            let kubeconfig = match pod.api {
                Some(relay) => {
                    let path = files.path(&format!("{}.kubeconfig", pod.name));
                    harness.control_plane.kubeconfig_via(relay.addr(), &path).unwrap();
                    path
                }
                None => harness.control_plane.kubeconfig().to_path_buf(),
            };
            let relay = match pod.relayed_target {
                true => Some(Relay::start(target.addr()).await.unwrap()),
                false => None,
            };
            let process = SidecarProcess::spawn(&files, &harness.namespace, pod, &source, &kubeconfig, relay.as_ref());
            target_relays.extend(relay);
            let client = Client { drops: pod.restarted || pod.relayed_target, ..process.client() };
            writers.push((pod.name, tokio::spawn(write_and_read_until(client, pod.name, stopped.clone()))));
            processes.push(process);
        }
        harness
            .wait("shop", "every sidecar acknowledged", |m| {
                m.status.as_ref().and_then(|s| s.sidecars.as_ref()).is_some_and(|s| s.acknowledged == pods.len() as i32)
            })
            .await;
        Scenario { harness, source, target, sidecars: processes, target_relays, stop, writers, _files: files }
    }

    /// Stops the writers and checks that every write a client saw acknowledged is on the
    /// `authoritative` side exactly once (counters) and in order (sequences); returns what each
    /// writer was told.
    async fn finish(self, authoritative: Side) -> Vec<(&'static str, Acknowledged)> {
        self.stop.send_replace(true);
        let mut server = connect(match authoritative {
            Side::Source => &self.source,
            Side::Target => &self.target,
        })
        .await;
        let mut outcomes = Vec::new();
        for (name, writer) in self.writers {
            let acknowledged = writer.await.unwrap();
            acknowledged.assert_exact_on(name, &mut server).await;
            outcomes.push((name, acknowledged));
        }
        outcomes
    }
}

fn sidecar_counts(migration: &eden_operator::crd::Migration) -> Option<&eden_operator::crd::SidecarCounts> {
    migration.status.as_ref()?.sidecars.as_ref()
}

/// Applies `manifest` and returns as soon as the ConfigMap's payload satisfies `pushed`:
/// watched, not polled, so that the fault that follows lands right after that push.
async fn apply_and_wait_for_push(harness: &Harness, manifest: &str, pushed: impl Fn(&EdenConfig) -> bool) {
    let watch = watcher(harness.config_maps(), watcher::Config::default().fields("metadata.name=eden-shop"));
    let mut payloads = watch.applied_objects().boxed();
    harness.apply(manifest);
    let seen = async {
        while let Some(config_map) = payloads.next().await {
            let text = config_map.unwrap().data.and_then(|mut data| data.remove(PAYLOAD_KEY));
            if text.and_then(|text| EdenConfig::from_yaml(&text).ok()).is_some_and(|p| pushed(&p)) {
                return;
            }
        }
        panic!("the ConfigMap watch ended");
    };
    tokio::time::timeout(Duration::from_secs(60), seen).await.expect("the awaited payload was never pushed");
}

/// [`apply_and_wait_for_push`] until writes pause.
async fn apply_and_wait_for_pause(harness: &Harness, manifest: &str) {
    apply_and_wait_for_push(harness, manifest, |p| p.writes == WritesState::Paused).await;
}

// Several workers: the harness runs kubectl and the operator in this process, and a client's
// wait must measure the sidecar, not this runtime.
/// Two sidecars: one talks to the API server directly, the other through a relay that is cut
/// while writes move (the cutover, or with `rollback` the rollback after it) and its path to
/// Redis stays up. The move completes with that sidecar fenced; cut off for longer than its
/// pause bound (3 s), it refuses its held writes; back in touch, it applies the move.
async fn cut_off_while_writes_move(prefix: &str, rollback: bool) {
    let relay = Relay::start(ControlPlane::shared().api_addr().unwrap()).await.unwrap();
    let scenario = Scenario::start(prefix, &[Pod::new("direct"), Pod::new("cut-off").api_via(&relay)]).await;
    let harness = &scenario.harness;
    let (policy, moved, authoritative) = match rollback {
        // Cut off while it writes to the target (mirrored to the source): after the rollback,
        // its writes would land on a target nothing reads back from.
        true => {
            harness.apply(&migration("shop", "sync", 0, "newAuthoritative"));
            harness.wait_phase("shop", Phase::CutOver).await;
            ("oldAuthoritative", Phase::RolledBack, Side::Source)
        }
        false => ("newAuthoritative", Phase::CutOver, Side::Target),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut();
    harness.apply(&migration("shop", "sync", 0, policy));
    let sidecars = sidecar_counts(&harness.wait_phase("shop", moved).await).cloned().unwrap();
    assert_eq!((sidecars.acknowledged, sidecars.fenced), (1, 1), "{sidecars:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    relay.heal();
    harness
        .wait("shop", "the fenced sidecar acknowledged the move", |m| {
            sidecar_counts(m).is_some_and(|s| s.acknowledged == 2)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, acknowledged) in scenario.finish(authoritative).await {
        if name == "cut-off" {
            assert!(acknowledged.refused > 0, "the cut-off sidecar was fenced: it refused writes");
        } else {
            assert_eq!(acknowledged.refused, 0, "a sidecar in touch only ever held writes");
            assert!(acknowledged.longest < Duration::from_secs(3), "held past the pause bound");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_cut_off_from_the_api_server_during_a_cutover_loses_no_acknowledged_write() {
    cut_off_while_writes_move("cut-off", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_cut_off_from_the_api_server_during_a_rollback_loses_no_acknowledged_write() {
    cut_off_while_writes_move("cut-rollback", true).await;
}

/// Two sidecars; one reaches the target through a relay that is cut for 3 s as soon as writes
/// start to move (the cutover's pause, or with `rollback` the rollback after it, which has no
/// pause), its path to the API server and the source up. Its clients see what Redis's own clients see of a server that goes
/// away (a request in flight there ends with its connection, a new one fails), nothing
/// acknowledged is lost, no read goes back in time, and the other sidecar sees nothing of it.
async fn target_cut_while_writes_move(prefix: &str, rollback: bool) {
    let scenario = Scenario::start(prefix, &[Pod::new("cut-off").target_via_relay(), Pod::new("app-1")]).await;
    let harness = &scenario.harness;
    let (moved, authoritative) = match rollback {
        true => {
            harness.apply(&migration("shop", "sync", 25, "newAuthoritative"));
            harness.wait_phase("shop", Phase::CutOver).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let manifest = migration("shop", "sync", 25, "oldAuthoritative");
            apply_and_wait_for_push(harness, &manifest, |p| p.write_policy == WritePolicy::OldAuthoritative).await;
            (Phase::RolledBack, Side::Source)
        }
        false => {
            tokio::time::sleep(Duration::from_millis(500)).await;
            apply_and_wait_for_pause(harness, &migration("shop", "sync", 25, "newAuthoritative")).await;
            (Phase::CutOver, Side::Target)
        }
    };
    scenario.target_relays[0].cut();
    let sidecars = sidecar_counts(&harness.wait_phase("shop", moved).await).cloned().unwrap();
    assert_eq!((sidecars.acknowledged, sidecars.fenced), (2, 0), "the API server heard from both: {sidecars:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    scenario.target_relays[0].heal();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, acknowledged) in scenario.finish(authoritative).await {
        assert!(acknowledged.longest < Duration::from_secs(3), "{name}: no write waited past the pause bound");
        let failed = acknowledged.refused + acknowledged.refused_reads + u64::from(acknowledged.reconnects);
        match (name, rollback) {
            // Its writes and its own key's reads were the unreachable target's.
            ("cut-off", false) => assert!(failed > 0, "{name}: the target was out of reach: {acknowledged:?}"),
            // Back on the source: the target serves it nothing a deadline does not cover.
            ("cut-off", true) => assert_eq!(failed, 0, "{name}: nothing of it needed the target"),
            _ => assert_eq!(failed, 0, "{name}: a sidecar that reaches both sides never failed a client"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_cut_off_from_the_target_during_a_cutover_loses_no_acknowledged_write() {
    target_cut_while_writes_move("target-cut-cutover", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_cut_off_from_the_target_during_a_rollback_loses_no_acknowledged_write() {
    target_cut_while_writes_move("target-cut-rollback", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_killed_while_writes_are_paused_loses_no_write_and_the_cutover_completes_after_it() {
    let mut scenario = Scenario::start("operator-killed", &[Pod::new("app-0"), Pod::new("app-1")]).await;
    // The operator is killed as soon as it has paused writes, well before the reconcile that
    // could flip them (200 ms later at the soonest).
    apply_and_wait_for_pause(&scenario.harness, &migration("shop", "sync", 0, "newAuthoritative")).await;
    scenario.harness.stop_operator().await;
    assert_eq!(scenario.harness.payload("shop").await.writes, WritesState::Paused, "killed during the pause");
    // Nothing decides: the sidecars hold writes for their bound (3 s), then refuse them; none
    // goes back to the source on a sidecar's own timer.
    tokio::time::sleep(Duration::from_secs(4)).await;
    scenario.harness.start_operator();
    scenario.harness.wait_phase("shop", Phase::CutOver).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, acknowledged) in scenario.finish(Side::Target).await {
        assert!(acknowledged.refused > 0, "{name}: writes were refused while no operator decided");
        assert!(acknowledged.longest < Duration::from_secs(4), "{name}: no write waited past the bound");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_killed_mid_copy_loses_no_write_and_a_cutover_at_a_quarter_of_reads_reads_nothing_older() {
    // 20,000 hashes (a command each, where small strings would share an MSET) written to the
    // target at 4,000 a second: the copy takes about 5 s, and the operator dies in it, with
    // writers running through the sidecars all along.
    const KEYS: usize = 20_000;
    let source = RedisServer::start().unwrap();
    let fill = "for i = 1, ARGV[1] do redis.call('HSET', 'key:' .. i, 'field', i) end";
    let _: () = redis::cmd("EVAL").arg(fill).arg(0).arg(KEYS).query_async(&mut connect(&source).await).await.unwrap();
    let data = "sync, targetOpsPerSecond: 4000";
    let mut scenario =
        Scenario::copying("operator-mid-copy", &[Pod::new("app-0"), Pod::new("app-1")], source, data).await;
    let copying = scenario
        .harness
        .wait("shop", "the copy under way", |m| {
            let progress = m.status.as_ref().and_then(|s| s.progress.as_ref());
            phase_of(m) == Some(Phase::Syncing) && progress.is_some_and(|p| p.keys_copied > 0)
        })
        .await;
    scenario.harness.stop_operator().await;
    let progress = copying.status.and_then(|s| s.progress).unwrap().summary;
    let mut on_target = connect(&scenario.target).await;
    let copied: usize = redis::cmd("DBSIZE").query_async(&mut on_target).await.unwrap();
    assert!(copied < KEYS, "killed mid-copy: the target holds {copied} keys (status said {progress})");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The new operator copies again from what the source holds now: the keys, and every write
    // the sidecars acknowledged meanwhile.
    scenario.harness.start_operator();
    scenario.harness.wait_phase("shop", Phase::Ready).await;
    // After the cutover each writer's key is the target's: its reads go there whatever the read
    // share, so no read comes from the source, which has the write only through the mirror.
    scenario.harness.apply(&migration("shop", data, 25, "newAuthoritative"));
    scenario.harness.wait_phase("shop", Phase::CutOver).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let copied: usize =
        redis::cmd("EVAL").arg("return #redis.call('KEYS', 'key:*')").arg(0).query_async(&mut on_target).await.unwrap();
    assert_eq!(copied, KEYS, "every key of the copy is on the target");
    for (name, acknowledged) in scenario.finish(Side::Target).await {
        assert_eq!(acknowledged.refused, 0, "{name}: the operator's death refused no write before the cutover");
        assert!(acknowledged.reads > 0, "{name} read back throughout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_or_corrupted_config_map_is_rewritten_above_every_generation_and_writes_go_on() {
    let scenario = Scenario::start("config-map-lost", &[Pod::new("app-0")]).await;
    let harness = &scenario.harness;
    let config_maps = harness.config_maps();
    let generation = |config_map: Option<k8s_openapi::api::core::v1::ConfigMap>| {
        let text = config_map?.data?.remove(PAYLOAD_KEY)?;
        EdenConfig::from_yaml(&text).ok().map(|payload| payload.generation)
    };
    let mut last = generation(config_maps.get_opt("eden-shop").await.unwrap()).unwrap();
    for fault in ["deleted", "corrupted"] {
        match fault {
            "deleted" => {
                config_maps.delete("eden-shop", &DeleteParams::default()).await.unwrap();
            }
            _ => {
                let patch = serde_json::json!({"data": {PAYLOAD_KEY: "generation: [corrupt"}});
                config_maps.patch("eden-shop", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
            }
        }
        let mut rewritten = None;
        for _ in 0..100 {
            rewritten = generation(config_maps.get_opt("eden-shop").await.unwrap()).filter(|g| *g > last);
            if rewritten.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let rewritten = rewritten.unwrap_or_else(|| panic!("the {fault} ConfigMap was never rewritten above {last}"));
        harness
            .wait("shop", "the sidecar acknowledged the rewritten generation", |m| {
                sidecar_counts(m).is_some_and(|s| s.configured_generation == rewritten as i64 && s.acknowledged == 1)
            })
            .await;
        last = rewritten;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let outcomes = scenario.finish(Side::Source).await;
    assert_eq!(outcomes[0].1.refused, 0, "rewritten within the sidecar's bound: nothing refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn canary_reads_leave_the_target_when_the_operator_dies_and_no_client_reads_back_in_time() {
    let mut scenario = Scenario::start("canary-operator-killed", &[Pod::new("app-0"), Pod::new("app-1")]).await;
    scenario.harness.apply(&migration("shop", "sync", 50, "oldAuthoritative"));
    scenario.harness.wait_payload("shop", |p| p.read_percentage == 50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The canary works: the target's beats show it fresh, and it serves reads.
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut target_reads = 0;
        for sidecar in &scenario.sidecars {
            target_reads += sidecar.target_reads();
        }
        if target_reads > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "the target served no canary read while replication fed it");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The replication engine runs in the operator: killed, nothing feeds the target any more,
    // and no sidecar is told.
    scenario.harness.stop_operator().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut on_target = connect(&scenario.target).await;
    let left_behind: Option<i64> = on_target.get("last:app-0").await.unwrap();
    let mut on_source = connect(&scenario.source).await;
    let latest: Option<i64> = on_source.get("last:app-0").await.unwrap();
    assert!(left_behind < latest, "the target went stale: {left_behind:?} against {latest:?}");
    for (name, acknowledged) in scenario.finish(Side::Source).await {
        assert!(acknowledged.reads > 0, "{name} read throughout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecars_cut_off_from_the_api_server_for_20_seconds_shorter_than_their_bound_lose_nothing_and_stall_nothing() {
    // The default bound (30 s) against an outage of 20 s, for every sidecar.
    let relay = Relay::start(ControlPlane::shared().api_addr().unwrap()).await.unwrap();
    let pods = [
        Pod::new("app-0").api_via(&relay).fenced_after(30_000),
        Pod::new("app-1").api_via(&relay).fenced_after(30_000),
    ];
    let scenario = Scenario::start("api-outage", &pods).await;
    scenario.harness.apply(&migration("shop", "sync", 50, "oldAuthoritative"));
    scenario.harness.wait_payload("shop", |p| p.read_percentage == 50).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut();
    tokio::time::sleep(Duration::from_secs(20)).await;
    relay.heal();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, acknowledged) in scenario.finish(Side::Source).await {
        assert_eq!(acknowledged.refused, 0, "{name}: nothing refused within the bound");
        assert!(acknowledged.longest < Duration::from_secs(1), "{name}: writes never waited on the API server");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_cut_off_from_the_target_during_a_canary_serves_every_read_from_the_source_in_time() {
    let scenario = Scenario::start("target-cut", &[Pod::new("app-0").target_via_relay(), Pod::new("app-1")]).await;
    scenario.harness.apply(&migration("shop", "sync", 100, "oldAuthoritative"));
    scenario.harness.wait_payload("shop", |p| p.read_percentage == 100).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    scenario.target_relays[0].cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    scenario.target_relays[0].heal();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, acknowledged) in scenario.finish(Side::Source).await {
        assert_eq!(acknowledged.refused, 0, "{name}: the target's loss costs no write");
        assert!(acknowledged.longest < Duration::from_secs(1), "{name}: no write waited on the lost target");
        assert!(acknowledged.longest_read < Duration::from_secs(1), "{name}: no read waited on the lost target");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_cut_off_during_the_pause_aborts_the_cutover_which_then_completes_with_it_fenced() {
    // The cut-off sidecar answered the barrier and the pause, then lost the API server: the
    // operator cannot prove it will not write to the source, so it cannot flip. The pause ends
    // at maxWritePauseMillis (writes resume on the source), and the retry's barrier fences it.
    let relay = Relay::start(ControlPlane::shared().api_addr().unwrap()).await.unwrap();
    let scenario = Scenario::start("cut-in-pause", &[Pod::new("direct"), Pod::new("cut-off").api_via(&relay)]).await;
    let harness = &scenario.harness;
    tokio::time::sleep(Duration::from_millis(500)).await;
    apply_and_wait_for_pause(harness, &migration("shop", "sync", 0, "newAuthoritative")).await;
    relay.cut();
    let cut_over = harness.wait_phase("shop", Phase::CutOver).await;
    let sidecars = sidecar_counts(&cut_over).unwrap();
    assert_eq!((sidecars.acknowledged, sidecars.fenced), (1, 1), "{sidecars:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.heal();
    harness
        .wait("shop", "the fenced sidecar acknowledged the flip", |m| {
            sidecar_counts(m).is_some_and(|s| s.acknowledged == 2)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, acknowledged) in scenario.finish(Side::Target).await {
        if name == "direct" {
            assert_eq!(acknowledged.refused, 0, "a sidecar in touch only ever held writes");
            assert!(acknowledged.longest < Duration::from_secs(3), "{name}: held past the pause bound");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_killed_after_the_cutover_and_again_mid_rollback_loses_no_write() {
    let mut scenario = Scenario::start("operator-rollback", &[Pod::new("app-0"), Pod::new("app-1")]).await;
    // A quarter of the reads of source-owned keys go to the target; each writer's own key is
    // the target's after the cutover and the source's after the rollback, and its reads must
    // follow it.
    scenario.harness.apply(&migration("shop", "sync", 25, "newAuthoritative"));
    scenario.harness.wait_phase("shop", Phase::CutOver).await;
    // Killed in CutOver: writes go on to the target, mirrored to the source, with no operator.
    scenario.harness.stop_operator().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scenario.harness.start_operator();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(phase_of(&scenario.harness.migrations().get("shop").await.unwrap()), Some(Phase::CutOver));
    // Killed again as soon as it has pushed the rollback (writes back to the source), before it
    // knows that every sidecar applied it: the next operator finishes the rollback.
    let rollback = migration("shop", "sync", 25, "oldAuthoritative");
    apply_and_wait_for_push(&scenario.harness, &rollback, |p| p.write_policy == WritePolicy::OldAuthoritative).await;
    scenario.harness.stop_operator().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    scenario.harness.start_operator();
    scenario.harness.wait_phase("shop", Phase::RolledBack).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, acknowledged) in scenario.finish(Side::Source).await {
        assert!(acknowledged.longest < Duration::from_secs(4), "{name}: no write waited past the bound");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_frozen_during_a_canary_costs_no_read_more_than_its_deadline() {
    let scenario = Scenario::start("target-frozen", &[Pod::new("app-0"), Pod::new("app-1")]).await;
    scenario.harness.apply(&migration("shop", "sync", 50, "oldAuthoritative"));
    scenario.harness.wait_payload("shop", |p| p.read_percentage == 50).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    scenario.target.freeze().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    scenario.target.thaw().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (name, acknowledged) in scenario.finish(Side::Source).await {
        assert_eq!(acknowledged.refused, 0, "{name}: the target's stall costs no write");
        assert!(acknowledged.longest < Duration::from_secs(1), "{name}: no write waited on the frozen target");
        assert!(acknowledged.longest_read < Duration::from_secs(1), "{name}: no read waited on the frozen target");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_frozen_as_the_cutover_starts_aborts_the_pause_and_the_retry_loses_nothing() {
    // Writes sent before the pause are stuck in the frozen source: the sidecars say `pausing`
    // until they are answered, so the operator cannot drain past them and must not flip.
    let scenario = Scenario::start("source-frozen", &[Pod::new("app-0"), Pod::new("app-1")]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    scenario.source.freeze().unwrap();
    scenario.harness.apply(&migration("shop", "sync", 0, "newAuthoritative"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let migration = scenario.harness.migrations().get("shop").await.unwrap();
    assert_ne!(phase_of(&migration), Some(Phase::CutOver), "flipped over writes the source had not answered");
    scenario.source.thaw().unwrap();
    scenario.harness.wait_phase("shop", Phase::CutOver).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, acknowledged) in scenario.finish(Side::Target).await {
        assert!(acknowledged.longest < Duration::from_secs(6), "{name}: waited past the freeze and one pause");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_killed_and_restarted_mid_migration_loses_no_acknowledged_write() {
    let mut scenario = Scenario::start("sidecar-restart", &[Pod::new("app-0").restarted(), Pod::new("app-1")]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Killed with writes in flight, started again with the same command line: it must confirm
    // the strategy again before it writes, and the cutover that follows must count it.
    scenario.sidecars[0].restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    scenario.harness.apply(&migration("shop", "sync", 0, "newAuthoritative"));
    let cut_over = scenario.harness.wait_phase("shop", Phase::CutOver).await;
    assert_eq!(sidecar_counts(&cut_over).unwrap().fenced, 0, "the restarted sidecar answered");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (name, acknowledged) in scenario.finish(Side::Target).await {
        if name == "app-0" {
            assert!(acknowledged.reconnects > 0, "the restart dropped the writer's connection");
        }
        assert_eq!(acknowledged.refused, 0, "{name}: nothing refused");
    }
}
