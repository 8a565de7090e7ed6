//! `eden-operator`: wires the controllers, the admin endpoint and logging together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use eden_operator::leader::{LeaderElector, Timing};
use eden_operator::{context::Context, endpoint, gateway, metrics::Metrics, migration};
use eden_sidecar::admin;
use eden_sidecar::telemetry::{LogFormat, init_logging};
use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(name = "eden-operator", version, about = "Reconciles Eden's Endpoint and Migration resources")]
struct Args {
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "EDEN_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    admin_listen: SocketAddr,
    /// Log format: JSON for clusters, text for terminals.
    #[arg(long, env = "EDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// This replica's name, for Events and leader election (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    instance: Option<String>,
    /// Namespace of the leader-election Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    leader_election_namespace: String,
    /// Reconcile Migrations in this namespace only (all namespaces when absent).
    #[arg(long, env = "EDEN_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// The eden-sidecar image gateways run when their Migration does not name one.
    #[arg(long, env = "EDEN_SIDECAR_IMAGE", default_value = gateway::DEFAULT_IMAGE)]
    sidecar_image: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    init_logging(args.log_format, "info,kube=warn");
    if let Err(err) = run(args).await {
        tracing::error!(%err, "eden-operator stopped");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes API: {e}"))?;
    let listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .map_err(|e| format!("admin listener {}: {e}", args.admin_listen))?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let handler: admin::Handler = {
        let (metrics, ready) = (metrics.clone(), ready.clone());
        Arc::new(move |path| admin::standard(path, ready.load(Ordering::Relaxed), || metrics.render()))
    };
    tokio::spawn(admin::serve(listener, handler));

    let identity = args.instance.clone().unwrap_or_else(|| format!("eden-operator-{}", std::process::id()));
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &args.leader_election_namespace);
    let elector = LeaderElector::new(leases.clone(), "eden-operator-leader", identity.clone(), Timing::default());
    let (leading_tx, mut leading) = watch::channel(false);
    tokio::spawn(elector.run(leading_tx));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(admin = %args.admin_listen, %identity, "eden-operator started; waiting for leadership");
    tokio::select! {
        won = leading.wait_for(|leads| *leads) => { won?; }
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    tracing::info!(%identity, "leading: reconciling");

    let ctx = Context::new(client, metrics, Some(identity.clone()), args.sidecar_image.clone());
    tokio::select! {
        ((), ()) = futures::future::join(endpoint::run(ctx.clone()), migration::run(ctx, args.watch_namespace.clone())) => {}
        // Another replica may take over once our lease expires: stop before it does.
        lost = leading.wait_for(|leads| !*leads) => {
            lost?;
            return Err("lost leadership; exiting so that only the new leader acts".into());
        }
    }
    LeaderElector::new(leases, "eden-operator-leader", identity, Timing::default()).release().await?;
    tracing::info!("eden-operator shut down");
    Ok(())
}
