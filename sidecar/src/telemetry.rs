//! Logging set-up shared by Eden's binaries: `tracing` to stderr, JSON in clusters, text on a
//! terminal (colour only when stderr is one), filtered by `RUST_LOG`.
//!
//! A JSON line carries the fields of every span it was logged in (`spans`, outermost first)
//! besides the innermost one (`span`): the operator's reconcile span names the migration, and
//! work nested deeper (a replication engine's own span, a verification) keeps that name on
//! every line it logs.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Installs the global subscriber; `default_filter` applies when `RUST_LOG` is unset.
pub fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    subscriber(format, filter, ansi, std::io::stderr).init();
}

fn subscriber<W>(format: LogFormat, filter: EnvFilter, ansi: bool, writer: W) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // A log line that cannot be written is lost, and nothing else: by default the subscriber
    // reports the failure with `eprintln!`, which panics when stderr itself is what failed
    // (closed), and that took the proxy and every client connection down with it.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => {
            Box::new(logs.json().flatten_event(true).with_current_span(true).with_span_list(true).finish())
        }
        LogFormat::Text => Box::new(logs.finish()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn every_json_line_inside_a_reconcile_names_the_migration() {
        let captured = Captured::default();
        let subscriber = subscriber(LogFormat::Json, "info".into(), false, captured.clone());
        tracing::subscriber::with_default(subscriber, || {
            // As `#[tracing::instrument(fields(migration = %…))]` records it on reconcile.
            let reconcile = tracing::info_span!("reconcile", migration = %"shop-cache", namespace = "shop");
            let _entered = reconcile.enter();
            tracing::info!("strategy pushed to the sidecars");
            tracing::info_span!("sync_replicator", source = "redis://old").in_scope(|| {
                tracing::warn!(error = "connection reset", "replication failed");
            });
        });
        let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = output.lines().map(|line| serde_json::from_str(line).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{output}");
        for line in &lines {
            let spans = line["spans"].as_array().unwrap_or_else(|| panic!("no span list: {line}"));
            assert_eq!(spans[0]["name"], "reconcile", "{line}");
            assert_eq!(spans[0]["migration"], "shop-cache", "{line}");
            assert_eq!(spans[0]["namespace"], "shop", "{line}");
        }
        assert_eq!(lines[1]["span"]["name"], "sync_replicator", "the innermost span is `span`");
        assert_eq!(lines[1]["error"], "connection reset", "event fields stay at the top level");
    }
}
