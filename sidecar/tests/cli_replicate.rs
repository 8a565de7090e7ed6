//! The `replicate` and `verify` verbs of the `eden-sidecar` binary, run as a user would.

mod support_replicate;

use std::process::Output;

use eden_sidecar::replicate::Checkpoint;
use redis::AsyncCommands;
use support_replicate::{Pair, seed_every_type, seed_strings};
use tokio::process::Command;

async fn eden(args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eden-sidecar"));
    command.args(args).env_remove("EDEN_SOURCE").env_remove("RUST_LOG").kill_on_drop(true);
    command.output().await.expect("eden-sidecar runs")
}

/// `replicate --once` copies, shows progress, keeps a checkpoint and exits 0; `verify` agrees,
/// then finds a difference and exits 1; a second `replicate` resumes from the checkpoint file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_then_verify_from_the_command_line() {
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_every_type(&mut source).await;
    seed_strings(&mut source, 1_000).await;
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("checkpoint.json");
    let (src, dst, file) = (pair.source.url(), pair.target.url(), checkpoint.display().to_string());
    let replicate =
        ["replicate", "--source", &src, "--target", &dst, "--mode", "sync", "--checkpoint", &file, "--once"];

    let run = eden(&replicate).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("1008/1008 keys (100%)") && stderr.contains("caught up"), "{stderr}");
    let saved = Checkpoint::from_json(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
    assert!(saved.sync.is_some_and(|s| !s.loading && !s.replid.is_empty()), "a loaded sync position");

    let verify = ["verify", "--source", &src, "--target", &dst];
    let clean = eden(&verify).await;
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{stdout}");
    assert!(stdout.contains("checked 1008 keys: 0 missing, 0 extra, 0 type, 0 value, 0 TTL"), "{stdout}");

    let _: () = pair.target().await.del("key:7").await.unwrap();
    let dirty = eden(&verify).await;
    assert_eq!(dirty.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&dirty.stdout).contains("Missing key:7"));

    let _: () = source.set("key:7", "again").await.unwrap();
    let resumed = eden(&replicate).await;
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success() && stderr.contains("resuming from the checkpoint"), "{stderr}");
    assert!(eden(&verify).await.status.success());
}

/// `--target-ops-per-sec` and `--source-ops-per-sec` bound the copy's commands per second; sync
/// mode refuses a source limit with a usage error, before touching either server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_per_second_limits_slow_the_copy_down() {
    let pair = Pair::start();
    seed_strings(&mut pair.source().await, 6_000).await;
    let (src, dst) = (pair.source.url(), pair.target.url());

    let refused = eden(&["replicate", "--source", &src, "--target", &dst, "--source-ops-per-sec", "100"]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("use scan mode to limit the source"));

    // 6,000 keys are at least 6,000 RESTOREs: at 2,000 per second, three seconds at the very
    // least, whatever the machine. Unlimited, the same run (with `--once`'s one-second progress
    // tick) ends in about one.
    let started = std::time::Instant::now();
    let args = ["replicate", "--source", &src, "--target", &dst, "--mode", "scan", "--once"];
    let limited = eden(&[&args[..], &["--target-ops-per-sec", "2000"]].concat()).await;
    assert!(limited.status.success(), "{}", String::from_utf8_lossy(&limited.stderr));
    assert!(started.elapsed() >= std::time::Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(eden(&["verify", "--source", &src, "--target", &dst]).await.status.success());
}

/// A password any characters long, from a file (nothing secret on the command line) or
/// percent-encoded in the URI, works for `replicate` in both modes and for `verify`; a wrong
/// one is reported naming the server, without the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_come_from_a_file_or_an_encoded_uri() {
    const PASSWORD: &str = "p@ss:w/rd %#+=?ü✓ Zm9v+/==";
    let pair = Pair::start();
    let mut source = pair.source().await;
    seed_strings(&mut source, 500).await;
    for mut con in [source, pair.target().await] {
        let _: () =
            redis::cmd("CONFIG").arg("SET").arg("requirepass").arg(PASSWORD).query_async(&mut con).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let file = file.display().to_string();
    let encoded: String = percent_encoding::utf8_percent_encode(PASSWORD, percent_encoding::NON_ALPHANUMERIC).collect();
    let (src, dst) = (pair.source.url(), pair.target.url());
    let dst_in_uri = dst.replace("redis://", &format!("redis://:{encoded}@"));
    let from_files =
        ["--source", &src, "--source-credentials-file", &file, "--target", &dst, "--target-credentials-file", &file];
    let mixed = ["--source", &src, "--source-credentials-file", &file, "--target", &dst_in_uri];

    for (mode, servers) in [("sync", &from_files[..]), ("scan", &mixed[..])] {
        let run = eden(&[&["replicate", "--mode", mode, "--once"], servers].concat()).await;
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success() && stderr.contains("500/500 keys"), "{mode}: {stderr}");
        let verified = eden(&[&["verify"], servers].concat()).await;
        assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));
    }

    let wrong = dst.replace("redis://", "redis://:wr0ng%40pass@");
    let run =
        eden(&["replicate", "--source", &src, "--source-credentials-file", &file, "--target", &wrong, "--once"]).await;
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("target {}", pair.target.addr())) && !stderr.contains("wr0ng"), "{stderr}");
}

/// `--big-value-bytes` sets the size past which a value is copied in pieces, in both modes: a
/// sorted set of a few hundred kB (restored whole at the default 16 MiB) goes through a
/// temporary key, and arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_value_bytes_sets_where_values_go_in_pieces() {
    for mode in ["sync", "scan"] {
        let pair = Pair::start();
        let members: Vec<(u32, String)> = (0..20_000).map(|i| (i, format!("member:{i}"))).collect();
        let _: () = pair.source().await.zadd_multiple("leaderboard", &members).await.unwrap();
        let (src, dst) = (pair.source.url(), pair.target.url());
        let args = ["replicate", "--source", &src, "--target", &dst, "--mode", mode, "--big-value-bytes", "65536"];
        let run = eden(&[&args[..], &["--once"]].concat()).await;
        assert!(run.status.success(), "{mode}: {}", String::from_utf8_lossy(&run.stderr));
        let mut target = pair.target().await;
        let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut target).await.unwrap();
        assert!(stats.contains("cmdstat_rename:"), "{mode}: no temporary key was renamed: {stats}");
        let copied: Vec<(String, u32)> = target.zrange_withscores("leaderboard", 0, -1).await.unwrap();
        assert_eq!(copied, members.into_iter().map(|(score, member)| (member, score)).collect::<Vec<_>>(), "{mode}");
    }
}
