//! `eden-operator`: wires the controllers, the admin endpoint and logging together.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use eden_operator::leader::{LeaderElector, Timing};
use eden_operator::webhook::{self, CallTarget, Certificates, FailurePolicy, Lifetimes, WebhookOptions};
use eden_operator::{context::Context, endpoint, metrics::Metrics, migration, proxy};
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
    /// The eden-sidecar image the webhook injects, and gateways run when their Migration does
    /// not name one.
    #[arg(long, env = "EDEN_SIDECAR_IMAGE", default_value = proxy::DEFAULT_IMAGE)]
    sidecar_image: String,
    /// Serve the injection webhook here (HTTPS) and write the caBundle of its configuration
    /// (the chart installs it); no webhook when absent.
    #[arg(long, env = "EDEN_WEBHOOK_LISTEN")]
    webhook_listen: Option<SocketAddr>,
    /// The Service in the operator's namespace through which the API server calls the webhook.
    #[arg(long, env = "EDEN_WEBHOOK_SERVICE", default_value = "eden-operator-webhook")]
    webhook_service: String,
    /// That Service's port.
    #[arg(long, env = "EDEN_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    webhook_service_port: i32,
    /// Call the webhook at this `https://host:port` instead of through the Service (an API
    /// server with no Service network, such as a local one, with no chart): the operator then
    /// registers the whole configuration itself.
    #[arg(long, env = "EDEN_WEBHOOK_URL")]
    webhook_url: Option<String>,
    /// With `--webhook-url` (the chart sets it in its configuration otherwise): when the webhook
    /// cannot be reached, `ignore` creates opted-in pods without a sidecar, `fail` refuses them.
    #[arg(long, env = "EDEN_WEBHOOK_FAILURE_POLICY", value_enum, default_value_t = FailurePolicy::Ignore)]
    webhook_failure_policy: FailurePolicy,
    /// Serve the certificate in this directory (`tls.crt`, `tls.key`, and `ca.crt` for the
    /// caBundle: a cert-manager Secret, mounted), read again every minute, instead of the
    /// operator's own rotating CA.
    #[arg(long, env = "EDEN_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<PathBuf>,
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
    // Every replica answers the webhook, leader or not.
    if let Some(listen) = args.webhook_listen {
        let call = match &args.webhook_url {
            Some(url) => CallTarget::Url(url.clone()),
            None => CallTarget::Service {
                namespace: args.leader_election_namespace.clone(),
                name: args.webhook_service.clone(),
                port: args.webhook_service_port,
            },
        };
        let options = WebhookOptions {
            listen,
            call,
            failure_policy: args.webhook_failure_policy,
            namespace: args.leader_election_namespace.clone(),
            image: args.sidecar_image.clone(),
            instance: Some(identity.clone()),
            metrics: metrics.clone(),
            certificates: match &args.webhook_cert_dir {
                // cert-manager renews its Secret in place; the kubelet updates the mounted files.
                Some(dir) => Certificates::Mounted { dir: dir.clone(), check_every: Duration::from_secs(60) },
                None => Certificates::Managed(Lifetimes::default()),
            },
        };
        webhook::start(client.clone(), options).await?;
    }
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
