//! `eden-operator`: wires the controllers, the admin endpoint and logging together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, ValueEnum};
use eden_operator::{admin, context::Context, endpoint, metrics::Metrics};

#[derive(Parser, Debug)]
#[command(name = "eden-operator", version, about = "Reconciles Eden's Endpoint and Migration resources")]
struct Args {
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "EDEN_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,
    /// Log format: JSON for clusters, text for terminals.
    #[arg(long, env = "EDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// This replica's name, for Events (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => logs.json().flatten_event(true).init(),
        LogFormat::Text => logs.init(),
    }
    if let Err(err) = run(args).await {
        tracing::error!(%err, "eden-operator stopped");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes API: {e}"))?;
    let listener =
        admin::bind(args.admin_listen).await.map_err(|e| format!("admin listener {}: {e}", args.admin_listen))?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    tokio::spawn(admin::serve(listener, metrics.clone(), ready.clone()));

    let ctx = Context::new(client, metrics, args.instance);
    tracing::info!(admin = %args.admin_listen, "eden-operator started");
    ready.store(true, Ordering::Relaxed);
    endpoint::run(ctx).await;
    tracing::info!("eden-operator shut down");
    Ok(())
}
