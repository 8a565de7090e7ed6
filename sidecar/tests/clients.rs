//! The client matrix: the maintained client of each ecosystem, installed from its own registry at
//! a pinned version, runs its scenario set (`tests/clients/<ecosystem>/`) through a sidecar in
//! each state of a migration and prints one line per result; every line must equal the line
//! the same program printed against Redis itself.
//!
//! A program takes a Redis URL. It loads its scripts and function library and takes its lock,
//! then prints `step change` and waits for a line on its standard input: the driver moves the
//! sidecar into the state under test meanwhile, so what was loaded before a state change runs
//! after it. `step drop-subscribers` asks the driver to close the server side of every
//! subscriber's connection (the client must reconnect and subscribe again). `done` ends the run.

mod support;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use eden_sidecar::replicate::{Mode, Replicator, ReplicatorOptions};
use redis::AsyncCommands;
use support::{Migration, Proxy, direct, eventually};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum State {
    /// Redis itself: the results every other state must give.
    Direct,
    /// The sidecar without a strategy.
    Plain,
    /// Half the reads from a target the sync engine keeps fresh.
    Canary,
    /// Writes answered by the source and mirrored to the target (`data.type: none`).
    DualWrite,
    /// Writes held from the state change on, released 300 ms later by the flip to the target.
    PausedThenReleased,
    /// The target answers everything, writes mirrored back to the source (paused and flipped at
    /// the state change).
    CutOver,
    /// Writes split by key (`cutover` at 50 %): each key written by its owner, target-owned
    /// keys mirrored back to the source, reads from the target. Before it, writes mirrored to
    /// the target (`data.type: none`: the only copy a split runs with); paused at the state
    /// change until the mirror has delivered them, then split.
    Split,
    /// Back to the source after a cutover (paused and flipped back at the state change): what
    /// was written and loaded while the target answered runs on the source.
    RolledBack,
}

const STATES: [State; 7] = [
    State::Plain,
    State::Canary,
    State::DualWrite,
    State::PausedThenReleased,
    State::CutOver,
    State::Split,
    State::RolledBack,
];

/// Before the canary: the engine feeds the target, which serves no reads yet.
const SYNCING: &str = "read_percentage: 0\nmax_lag_ms: 500";
const CANARY: &str = "read_percentage: 50\nmax_lag_ms: 500";
const PAUSED: &str = "read_percentage: 50\nmax_lag_ms: 500\nwrites: paused";
/// The payloads' `max_lag_ms`: how far behind the source a canary read of a connection that
/// wrote nothing itself may find the target.
const MAX_LAG: Duration = Duration::from_millis(500);
const CUT_OVER: &str = "read_percentage: 100\nwrite_policy: new_authoritative\nmirror_writes: true";
/// Writes mirrored to the target, which serves nothing yet (`data.type: none`).
const MIRRORED: &str = "read_percentage: 0\nmirror_writes: true";
const SPLIT: &str = "read_percentage: 100\nwrite_mode: cutover\nwrite_percentage: 50\nmirror_writes: true";

const TARGET_READS: &str = "eden_commands_total{route=\"target\",kind=\"read\"}";

impl State {
    fn replicated(self) -> bool {
        matches!(self, State::Canary | State::PausedThenReleased | State::CutOver)
    }
}

/// A migration in one state, with the engine feeding its target while the state wants one.
struct Setup {
    state: State,
    migration: Migration,
    replicator: Option<Replicator>,
    proxy: Option<Proxy>,
    /// The target reads the driver made itself.
    probe_reads: u64,
}

impl Setup {
    async fn new(state: State) -> Setup {
        let mut migration = Migration::new();
        let replicator = match state.replicated() {
            true => Some(Setup::replicate(&migration).await),
            false => None,
        };
        let proxy = match state {
            State::Direct => None,
            State::Plain => Some(Proxy::start(&migration.source.url()).await),
            _ => {
                let before = match state {
                    State::RolledBack => CUT_OVER,
                    State::Split => MIRRORED,
                    _ if state.replicated() => SYNCING,
                    _ => "read_percentage: 0",
                };
                migration.apply(1, before).await;
                Some(migration.proxy(Duration::from_secs(5)).await)
            }
        };
        Setup { state, migration, replicator, proxy, probe_reads: 0 }
    }

    /// The engine, caught up (the Migration is `Ready`).
    async fn replicate(migration: &Migration) -> Replicator {
        // The source sends its snapshot at once rather than waiting for more replicas.
        let mut source = direct(&migration.source).await;
        let _: () =
            redis::cmd("CONFIG").arg(&["SET", "repl-diskless-sync-delay", "0"]).query_async(&mut source).await.unwrap();
        let [source, target] = migration.servers();
        let mut replicator =
            Replicator::start(&source, &target, Mode::Sync, ReplicatorOptions::default(), None).await.unwrap();
        replicator.caught_up(Duration::from_secs(5)).await.unwrap().expect("caught up");
        replicator
    }

    /// Asserts that the state did what it is there for: the target served reads, the mirror
    /// wrote to the other side.
    fn check(&self) {
        let Some(proxy) = &self.proxy else { return };
        let target_reads = proxy.metric(TARGET_READS);
        let mirrored = |to: &str| proxy.metric(&format!("eden_mirror_writes_total{{to=\"{to}\",outcome=\"applied\"}}"));
        match self.state {
            State::Direct | State::Plain => {}
            State::Canary => assert!(target_reads > self.probe_reads, "the canary read from the target"),
            State::DualWrite => assert!(mirrored("target") > 0, "writes were mirrored to the target"),
            State::RolledBack => assert!(mirrored("source") > 0, "writes were mirrored to the source"),
            State::PausedThenReleased | State::CutOver | State::Split => {
                assert!(
                    target_reads > 0 && mirrored("source") > 0,
                    "{:?}: the target served, the source got the mirror",
                    self.state
                )
            }
        }
    }

    fn url(&self) -> String {
        self.proxy.as_ref().map_or_else(|| self.migration.source.url(), Proxy::url)
    }

    /// Moves into the state under test; `go` lets the program run on, at the moment the state
    /// wants (a paused state lets it run into the pause).
    async fn change(&mut self, go: impl AsyncFnOnce()) {
        match self.state {
            State::Direct | State::Plain => go().await,
            State::Canary => {
                self.settle().await;
                self.migration.apply(2, CANARY).await;
                self.target_serves_reads().await;
                go().await;
            }
            State::DualWrite => {
                self.migration.apply(2, MIRRORED).await;
                go().await;
            }
            State::PausedThenReleased => {
                self.settle().await;
                self.migration.apply(2, PAUSED).await;
                go().await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.cut_over().await;
            }
            State::CutOver => {
                self.migration.apply(2, PAUSED).await;
                self.cut_over().await;
                go().await;
            }
            State::Split => {
                self.migration.apply(2, &format!("{MIRRORED}\nwrites: paused")).await;
                // The operator splits once the mirror has brought the target up to date.
                self.mirrored().await;
                self.migration.apply(3, SPLIT).await;
                go().await;
            }
            State::RolledBack => {
                self.migration.apply(2, &format!("{CUT_OVER}\nwrites: paused")).await;
                // The operator rolls back once the mirror has brought the source up to date.
                self.mirrored().await;
                self.migration.apply(3, "read_percentage: 0").await;
                go().await;
            }
        }
    }

    /// Waits until the mirror, writes paused, has delivered what it carries: both sides hold
    /// the same keys.
    async fn mirrored(&self) {
        let (source, target) = (&self.migration.source, &self.migration.target);
        eventually("both sides hold the same keys", || async {
            let count = |server| async move {
                redis::cmd("DBSIZE").query_async::<i64>(&mut direct(server).await).await.unwrap()
            };
            count(source).await == count(target).await
        })
        .await;
    }

    /// Waits until no canary read can find the target behind what the program wrote before the
    /// change: the engine has it all, and `max_lag_ms` has passed since. (A connection's own
    /// writes it always reads; another connection may read the target up to `max_lag_ms` behind.)
    async fn settle(&mut self) {
        let replicator = self.replicator.as_mut().unwrap();
        replicator.caught_up(Duration::from_secs(5)).await.unwrap().expect("caught up");
        tokio::time::sleep(MAX_LAG).await;
    }

    /// Waits until the canary reads from the target: once the engine's freshness record shows
    /// it current.
    async fn target_serves_reads(&mut self) {
        let proxy = self.proxy.as_ref().unwrap();
        let probe = proxy.client().await;
        eventually("the target serves reads", || async {
            let _: Option<String> = probe.clone().get("probe").await.unwrap();
            proxy.metric(TARGET_READS) > 0
        })
        .await;
        self.probe_reads = proxy.metric(TARGET_READS);
    }

    /// What the operator does while writes are paused: waits for the engine to drain, stops it
    /// and flips writes to the target.
    async fn cut_over(&mut self) {
        let mut replicator = self.replicator.take().expect("a replicated state");
        replicator.caught_up(Duration::from_secs(5)).await.unwrap().expect("caught up");
        replicator.stop().await.unwrap();
        self.migration.apply(3, CUT_OVER).await;
    }

    /// Closes every subscriber's connection on the server that serves subscriptions (the source,
    /// in every state).
    async fn drop_subscribers(&self) {
        let _: i64 = redis::cmd("CLIENT")
            .arg(&["KILL", "TYPE", "pubsub"])
            .query_async(&mut direct(&self.migration.source).await)
            .await
            .unwrap();
    }
}

/// Runs `program` against `state`; returns the lines it printed, steps left out.
async fn run(program: &(PathBuf, Vec<OsString>), state: State) -> Vec<String> {
    let mut setup = Setup::new(state).await;
    // What the program logs (Lettuce's reconnections, a stack trace) is shown when it fails.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(&program.0)
        .args(&program.1)
        .arg(setup.url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut results = Vec::new();
    let next = Duration::from_secs(60);
    while let Some(line) = tokio::time::timeout(next, lines.next_line()).await.expect("a line within 60 s").unwrap() {
        match line.strip_prefix("step ") {
            Some("change") => setup.change(async || stdin.write_all(b"go\n").await.unwrap()).await,
            Some("drop-subscribers") => {
                setup.drop_subscribers().await;
                stdin.write_all(b"go\n").await.unwrap();
            }
            Some(other) => panic!("unknown step {other}"),
            None => results.push(line),
        }
    }
    let status = child.wait().await.unwrap();
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(status.success(), "{state:?}: the program failed after {results:#?}:\n{logged}");
    setup.check();
    results
}

/// Runs `program` against Redis and through the sidecar in every state; fails with every line
/// that differs.
async fn matrix(client: &str, program: (PathBuf, Vec<OsString>)) {
    let expected = run(&program, State::Direct).await;
    assert_eq!(expected.last().map(String::as_str), Some("done"), "{client} ran to its end against Redis");
    let errors: Vec<&String> = expected.iter().filter(|line| line.contains(" error ")).collect();
    assert!(errors.is_empty(), "{client} fails against Redis itself: {errors:#?}");
    let mut differences = Vec::new();
    for state in STATES {
        let got = run(&program, state).await;
        let differs = got != expected;
        println!("{client} {state:?}: {}", if differs { "differs" } else { "same as Redis" });
        if differs {
            differences.push(format!("{state:?}:\n  Redis:   {expected:?}\n  sidecar: {got:?}"));
        }
    }
    assert!(differences.is_empty(), "{client} through the sidecar differs from Redis:\n{}", differences.join("\n"));
}

fn script(name: &str) -> OsString {
    eden_e2e::repo_root().join("sidecar/tests/clients").join(name).into()
}

#[tokio::test]
async fn redis_py() {
    matrix("redis-py", (eden_e2e::python_clients().unwrap(), vec![script("python/matrix.py")])).await;
}

#[tokio::test]
async fn go_redis() {
    matrix("go-redis", (eden_e2e::matrix_client("go").unwrap(), vec![])).await;
}

#[tokio::test]
async fn node_redis() {
    matrix("node-redis", (eden_e2e::matrix_client("node").unwrap(), vec![])).await;
}

fn java(main_class: &str) -> (PathBuf, Vec<OsString>) {
    (eden_e2e::matrix_client("java").unwrap(), vec![main_class.into()])
}

#[tokio::test]
async fn jedis() {
    matrix("Jedis", java("eden.JedisMatrix")).await;
}

#[tokio::test]
async fn lettuce() {
    matrix("Lettuce", java("eden.LettuceMatrix")).await;
}
