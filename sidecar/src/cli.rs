//! The `replicate` and `verify` verbs of the `eden-sidecar` binary: the replication engine and
//! the verifier without Kubernetes.
//!
//! `replicate` prints progress once a second (keys copied of total, rate, lag), writes the
//! checkpoint to `--checkpoint FILE` as it goes and resumes from that file when it exists, and
//! runs until interrupted (SIGINT/SIGTERM), or with `--once` until the target has caught up.
//! `verify` prints a summary and the first differences, and exits 1 when there are any.

use std::io::IsTerminal;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

use crate::human;
use crate::replicate::{
    Checkpoint, Mode, OpsLimits, Progress, ReplacePolicy, Replicator, ReplicatorOptions, Verifier, VerifyOptions,
};
use crate::upstream::{Credentials, Server, TlsSettings};

// The verbs; without one, `eden-sidecar` is the proxy. (No doc comment: clap would make it
// the binary's description.)
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Copy the source's data into the target and keep it current.
    Replicate(ReplicateArgs),
    /// Compare the source and the target key by key.
    Verify(VerifyArgs),
}

/// How Eden trusts each `rediss://` server: each server its own CA, name and verification, as
/// an Endpoint says for itself, since a source and a target at different providers rarely share
/// a CA. The proxy and the verbs take the same flags.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsFlags {
    /// PEM CA bundle the source's certificate is verified with (system roots when absent).
    #[arg(long, env = "EDEN_SOURCE_CA_FILE")]
    source_ca_file: Option<PathBuf>,
    /// Name to verify the source's certificate against, when it is not the URI's host.
    #[arg(long, env = "EDEN_SOURCE_SERVER_NAME")]
    source_server_name: Option<String>,
    /// Accept any certificate from the source (testing only).
    #[arg(long, env = "EDEN_SOURCE_INSECURE_SKIP_VERIFY")]
    source_insecure_skip_verify: bool,
    /// PEM CA bundle the target's certificate is verified with (system roots when absent).
    #[arg(long, env = "EDEN_TARGET_CA_FILE")]
    target_ca_file: Option<PathBuf>,
    /// Name to verify the target's certificate against, when it is not the URI's host.
    #[arg(long, env = "EDEN_TARGET_SERVER_NAME")]
    target_server_name: Option<String>,
    /// Accept any certificate from the target (testing only).
    #[arg(long, env = "EDEN_TARGET_INSECURE_SKIP_VERIFY")]
    target_insecure_skip_verify: bool,
}

impl TlsFlags {
    /// The settings of `role` ("source" or "target"), its CA file read.
    pub fn settings(&self, role: &str) -> Result<TlsSettings, String> {
        let (ca_file, server_name, insecure_skip_verify) = match role {
            "source" => (&self.source_ca_file, &self.source_server_name, self.source_insecure_skip_verify),
            _ => (&self.target_ca_file, &self.target_server_name, self.target_insecure_skip_verify),
        };
        let ca_pem = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| format!("--{role}-ca-file {}: {e}", path.display()))?),
            None => None,
        };
        Ok(TlsSettings { ca_pem, server_name: server_name.clone(), insecure_skip_verify })
    }
}

/// The two servers and how to trust them.
#[derive(Args, Debug)]
pub struct Servers {
    /// The source Redis: redis[s]://[[user]:password@]host:port[/db], the user and password
    /// percent-encoded (`p%40ss` for `p@ss`)
    #[arg(long)]
    source: String,
    /// The target Redis, same form.
    #[arg(long)]
    target: String,
    #[command(flatten)]
    tls: TlsFlags,
    /// A file holding the source's password (a `username` file beside it names the user),
    /// instead of credentials in the URI, which any process list shows.
    #[arg(long)]
    source_credentials_file: Option<PathBuf>,
    /// The same for the target.
    #[arg(long)]
    target_credentials_file: Option<PathBuf>,
}

impl Servers {
    /// The source and the target, each with its own TLS flags.
    fn parse(&self) -> Result<(Server, Server), String> {
        let server = |role: &str, uri: &str, file: &Option<PathBuf>| {
            let credentials = match file {
                Some(path) => Some(
                    Credentials::from_file(path)
                        .map_err(|e| format!("--{role}-credentials-file {}: {e}", path.display()))?,
                ),
                None => None,
            };
            let tls = self.tls.settings(role)?;
            Ok::<_, String>(
                Server::parse(uri, tls).map_err(|e| format!("--{role}: {e}"))?.with_credentials(credentials),
            )
        };
        let source = server("source", &self.source, &self.source_credentials_file)?;
        let target = server("target", &self.target, &self.target_credentials_file)?;
        Ok((source, target))
    }
}

#[derive(Args, Debug)]
pub struct ReplicateArgs {
    #[command(flatten)]
    servers: Servers,
    /// sync: act as the source's replica (PSYNC); scan: SCAN + DUMP/RESTORE with keyspace
    /// notifications, for servers that refuse PSYNC.
    #[arg(long, default_value_t = Mode::Sync)]
    mode: Mode,
    /// What to do with keys that already exist on the target.
    #[arg(long, default_value = "replace", value_parser = parse_policy)]
    replace: ReplacePolicy,
    /// Commands per second to the source at most (scan mode; sync mode reads one stream).
    #[arg(long)]
    source_ops_per_sec: Option<NonZeroU32>,
    /// Commands per second to the target at most.
    #[arg(long)]
    target_ops_per_sec: Option<NonZeroU32>,
    /// Values bigger than this many bytes (16 MiB by default; at most half the target's
    /// `proto-max-bulk-len`) are copied in pieces into a temporary key, then renamed over the
    /// key, so memory stays bounded whatever the biggest value.
    #[arg(long)]
    big_value_bytes: Option<NonZeroU32>,
    /// Where to keep the checkpoint; an existing file resumes the run it came from.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Stop once the target has caught up with the source, instead of running until interrupted.
    #[arg(long)]
    once: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    servers: Servers,
    /// Keys per second at most.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// TTLs differing by more than this many milliseconds are reported.
    #[arg(long, default_value_t = 1000)]
    ttl_tolerance_ms: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_policy(s: &str) -> Result<ReplacePolicy, String> {
    match s {
        "replace" => Ok(ReplacePolicy::Replace),
        "skip" => Ok(ReplacePolicy::Skip),
        "fail" => Ok(ReplacePolicy::Fail),
        other => Err(format!("unknown policy `{other}`: use replace, skip or fail")),
    }
}

/// Runs a verb: 0 on success, 1 when verify found differences, 2 when the verb failed.
pub async fn run(verb: Verb) -> ExitCode {
    let result = match verb {
        Verb::Replicate(args) => replicate(args).await,
        Verb::Verify(args) => verify(args).await,
    };
    result.unwrap_or_else(|err| {
        eprintln!("eden-sidecar: {err}");
        ExitCode::from(2)
    })
}

async fn replicate(args: ReplicateArgs) -> Result<ExitCode, String> {
    let limits = OpsLimits { source: args.source_ops_per_sec, target: args.target_ops_per_sec };
    let (source, target) = args.servers.parse()?;
    let mut options = ReplicatorOptions::new(args.replace).with_limits(limits);
    if let Some(bytes) = args.big_value_bytes {
        options = options.with_big_value_bytes(bytes.get().into());
    }
    let checkpoint = match &args.checkpoint {
        Some(path) if path.exists() => Some(read_checkpoint(path)?),
        _ => None,
    };
    if checkpoint.is_some() {
        eprintln!("resuming from the checkpoint in {}", args.checkpoint.as_deref().unwrap_or(Path::new("")).display());
    }
    let mut replicator =
        Replicator::start(&source, &target, args.mode, options, checkpoint).await.map_err(|e| e.to_string())?;
    let mut terminate = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // On a terminal one line redrawn in place, with a bar; otherwise a line a second, for logs.
    let terminal = std::io::stderr().is_terminal();
    let outcome = loop {
        tokio::select! {
            _ = terminate.recv() => break Ok(()),
            _ = interrupt.recv() => break Ok(()),
            _ = tick.tick() => {
                let progress = replicator.progress().borrow().clone();
                if terminal {
                    eprint!("\r\x1b[K{}", draw(args.mode, &progress));
                } else {
                    eprintln!("{}", describe(args.mode, &progress));
                }
                save(&args.checkpoint, &progress.checkpoint)?;
                if args.once {
                    match replicator.caught_up(Duration::from_millis(500)).await {
                        Ok(Some(progress)) => {
                            if terminal {
                                eprintln!();
                            }
                            eprintln!("{}\ncaught up", describe(args.mode, &progress));
                            break Ok(());
                        }
                        Ok(None) => {}
                        Err(err) => break Err(err.to_string()),
                    }
                }
            }
        }
    };
    save(&args.checkpoint, &replicator.checkpoint())?;
    let stopped = replicator.stop().await.map_err(|e| e.to_string());
    outcome.and(stopped).map(|()| ExitCode::SUCCESS)
}

/// One progress line: `sync: 1200/5000 keys (24%), 830 keys/s, lag 15 ms / 0 bytes`.
fn describe(mode: Mode, progress: &Progress) -> String {
    let checkpoint = &progress.checkpoint;
    let percent = (checkpoint.copied * 100).checked_div(checkpoint.total).unwrap_or(100).min(100);
    let phase = if checkpoint.backfill_done() { "following" } else { "copying" };
    format!(
        "{mode} ({phase}): {}/{} keys ({percent}%), {:.0} keys/s, lag {} ms / {} bytes",
        checkpoint.copied, checkpoint.total, progress.rate, progress.lag_ms, progress.lag_bytes
    )
}

/// The terminal's line: `sync (copying) ████░░… 21%  1,200 / 5,000 keys  830 keys/s  ETA 5s,
/// lag 15 ms`.
fn draw(mode: Mode, progress: &Progress) -> String {
    let checkpoint = &progress.checkpoint;
    let copying = !checkpoint.backfill_done();
    let (copied, total) = (checkpoint.copied as i64, checkpoint.total as i64);
    let rate = copying.then_some(progress.rate);
    let phase = if copying { "copying" } else { "following" };
    format!("{mode} ({phase}) {}, lag {} ms", human::copy_progress(copied, total, rate), progress.lag_ms)
}

fn read_checkpoint(path: &Path) -> Result<Checkpoint, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("--checkpoint {}: {e}", path.display()))?;
    Checkpoint::from_json(&text).map_err(|e| format!("--checkpoint {}: not a checkpoint: {e}", path.display()))
}

/// Writes the checkpoint beside the file, then renames it over, so a crash mid-write never
/// leaves half a checkpoint.
fn save(path: &Option<PathBuf>, checkpoint: &Checkpoint) -> Result<(), String> {
    let Some(path) = path else { return Ok(()) };
    let partial = path.with_extension("partial");
    std::fs::write(&partial, checkpoint.to_json())
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| format!("--checkpoint {}: {e}", path.display()))
}

async fn verify(args: VerifyArgs) -> Result<ExitCode, String> {
    let options =
        VerifyOptions { rate_limit: args.rate_limit, ttl_tolerance_ms: args.ttl_tolerance_ms, ..Default::default() };
    let (source, target) = args.servers.parse()?;
    let verifier = Verifier::connect(&source, &target, options).await.map_err(|e| e.to_string())?;
    let report = verifier.run().await.map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
    } else {
        println!(
            "checked {} keys: {} missing, {} extra, {} type, {} value, {} TTL differences",
            report.checked,
            report.missing,
            report.extra,
            report.type_mismatch,
            report.value_mismatch,
            report.ttl_mismatch
        );
        for difference in &report.samples {
            println!("  {:?} {}: {}", difference.kind, difference.key, difference.detail);
        }
    }
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicate::Checkpoint;

    #[test]
    fn a_terminal_sees_a_bar_with_rate_and_time_left_while_copying_and_the_lag_after() {
        let mut progress = Progress { rate: 1000.0, lag_ms: 40, ..Default::default() };
        progress.checkpoint = Checkpoint { copied: 600_000, total: 1_000_000, ..Checkpoint::fresh() };
        assert_eq!(
            draw(Mode::Scan, &progress),
            "scan (copying) ████████████░░░░░░░░ 60%  600,000 / 1,000,000 keys  1,000 keys/s  ETA 6m40s, lag 40 ms"
        );
        progress.checkpoint.passes.clear();
        progress.checkpoint.copied = 1_000_000;
        assert_eq!(
            draw(Mode::Scan, &progress),
            "scan (following) ████████████████████ 100%  1,000,000 / 1,000,000 keys, lag 40 ms"
        );
    }
}
