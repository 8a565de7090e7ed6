//! `eden-sidecar`: the RESP proxy's command line. Wires the listener, the upstreams, the
//! strategy's sources (`--configmap` through the Kubernetes API, `--config` from a file), the
//! Lease, the admin endpoint and signal handling together; everything else lives in the library.
//! With neither config flag it is a plain proxy to `--source`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use eden_sidecar::cli::{self, TlsFlags, Verb};
use eden_sidecar::config::{Applier, ConfigStatus, Confirmations, Confirmer};
use eden_sidecar::lease::LeaseReporter;
use eden_sidecar::metrics::ProxyMetrics;
use eden_sidecar::plan::{Routing, UpstreamSettings};
use eden_sidecar::server::{self, Backend, Listener};
use eden_sidecar::telemetry::{LogFormat, init_logging};
use eden_sidecar::upstream::Upstream;
use eden_sidecar::{admin, command_info};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How often `--config` is re-read.
const FILE_POLL: Duration = Duration::from_millis(500);

#[derive(Parser, Debug)]
#[command(name = "eden-sidecar", version, about = "Eden's RESP proxy: applications talk to it on localhost")]
struct Args {
    /// Where clients connect.
    #[arg(long, env = "EDEN_LISTEN", default_value = "127.0.0.1:6379")]
    listen: SocketAddr,
    /// Also (or instead) listen on this Unix socket.
    #[arg(long, env = "EDEN_UNIX_SOCKET")]
    unix_socket: Option<PathBuf>,
    /// Health and metrics (never on the RESP port).
    #[arg(long, env = "EDEN_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// The source Redis: redis://host:port[/db] or rediss://…
    #[arg(long, env = "EDEN_SOURCE")]
    source: String,
    /// The target Redis (used once a migration strategy routes traffic to it); when absent,
    /// the strategy's target URI.
    #[arg(long, env = "EDEN_TARGET")]
    target: Option<String>,
    /// Follow the strategy in this ConfigMap (key `eden.yaml`) through the Kubernetes API
    /// (in-cluster config, or KUBECONFIG), and acknowledge it in a Lease.
    #[arg(long, env = "EDEN_CONFIGMAP", conflicts_with = "config")]
    configmap: Option<String>,
    /// Follow the strategy in this file (a mounted ConfigMap), polled.
    #[arg(long, env = "EDEN_CONFIG")]
    config: Option<PathBuf>,
    /// Namespace of the ConfigMap and the Lease (default: the pod's, or the kubeconfig's).
    #[arg(long, env = "EDEN_NAMESPACE")]
    namespace: Option<String>,
    /// This pod's name: the Lease's holder (default: $HOSTNAME).
    #[arg(long, env = "EDEN_POD_NAME")]
    pod_name: Option<String>,
    /// Longest writes wait in the sidecar (a cutover pause without a decision, or a strategy it
    /// cannot confirm as current) before they are answered with an error, in milliseconds. Set
    /// it above the Migration's maxWritePauseMillis, so the operator decides first.
    #[arg(long, env = "EDEN_MAX_WRITE_PAUSE_MS", default_value_t = 5000)]
    max_write_pause_ms: u64,
    /// With --configmap: how often the ConfigMap is read to confirm the strategy is current, in
    /// milliseconds.
    #[arg(long, env = "EDEN_CONFIRM_EVERY_MS", default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..))]
    confirm_every_ms: u64,
    /// With --configmap: how long a confirmation holds, in milliseconds. A sidecar that cannot
    /// confirm its strategy for this long stops writing; the operator moves writes without a
    /// sidecar that does not acknowledge only this long (declared in its Lease) after the
    /// strategy it had stopped being current. At least twice --confirm-every-ms.
    #[arg(long, env = "EDEN_FENCE_AFTER_MS", default_value_t = 30_000)]
    fence_after_ms: u64,
    /// How each rediss:// upstream is trusted.
    #[command(flatten)]
    tls: TlsFlags,
    /// Connect timeout for upstreams, in milliseconds.
    #[arg(long, env = "EDEN_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    connect_timeout_ms: u64,
    /// Worker threads. One keeps each request and its reply on one core (the lowest added
    /// latency); more serve many busy clients in parallel.
    #[arg(long, env = "EDEN_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    worker_threads: u16,
    #[arg(long, env = "EDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> std::process::ExitCode {
    // The `replicate` and `verify` verbs live in the library's `cli`; without one, this is the proxy.
    let command =
        Verb::augment_subcommands(Args::command()).args_conflicts_with_subcommands(true).subcommand_negates_reqs(true);
    let matches = command.get_matches();
    if matches.subcommand().is_some() {
        init_logging(LogFormat::Text, "info");
        let verb = Verb::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        return runtime(None).block_on(cli::run(verb));
    }
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(args.log_format, "info");
    if let Err(err) = runtime(Some(args.worker_threads.into())).block_on(run(args)) {
        tracing::error!("eden-sidecar: {err}");
        std::process::exit(1);
    }
    std::process::ExitCode::SUCCESS
}

/// The proxy runs on `workers` threads (the verbs on one per core). With one, a request and
/// its reply are handled on the same core: with two, each reply is handed across cores, which
/// costs a plain-proxy's worth of latency per request (BENCHMARKS.md). One is a current-thread
/// runtime, which runs every task on the thread that waits for I/O: no hand-off to a worker,
/// no work-stealing queues to keep in step.
fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(workers) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(workers);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().unwrap_or_else(|err| {
        eprintln!("eden-sidecar: cannot start the async runtime: {err}");
        std::process::exit(1)
    })
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (source_tls, target_tls) = (args.tls.settings("source")?, args.tls.settings("target")?);
    let timeout = Duration::from_millis(args.connect_timeout_ms);
    let source = Upstream::new(&args.source, &source_tls, timeout).map_err(|e| format!("--source: {e}"))?;
    if let Some(target) = &args.target {
        Upstream::new(target, &target_tls, timeout).map_err(|e| format!("--target: {e}"))?;
    }

    let mut metrics = ProxyMetrics::default();
    let strategy = Strategy::start(&args, metrics.registry_mut()).await?;
    let metrics = Arc::new(metrics);
    let backend = match &strategy {
        None => Backend::Plain(source.clone()),
        Some(strategy) => {
            let settings = UpstreamSettings { target_tls, connect_timeout: timeout, target: args.target.clone() };
            let max_pause = Duration::from_millis(args.max_write_pause_ms);
            let (config, confirmations) = (strategy.applier.subscribe(), strategy.confirmations.clone());
            Backend::Routed(Routing::follow(source.clone(), settings, config, confirmations, max_pause))
        }
    };
    let lease = match (&strategy, &backend) {
        (Some(Strategy { lease: Some(reporter), .. }), Backend::Routed(routing)) => {
            let reporter = reporter.clone().with_hold(routing.hold()).with_mirror_losses(metrics.clone());
            Some((tokio::spawn(reporter.clone().run()), reporter))
        }
        _ => None,
    };
    let ready = Arc::new(AtomicBool::new(false));
    let admin_listener =
        TcpListener::bind(args.admin_listen).await.map_err(|e| format!("admin listener {}: {e}", args.admin_listen))?;
    let handler: admin::Handler = {
        let (metrics, ready) = (metrics.clone(), ready.clone());
        Arc::new(move |path| admin::standard(path, ready.load(Ordering::Relaxed), || metrics.render()))
    };

    // Signal handlers first: a SIGTERM while waiting or right after "ready" must not kill.
    let (mut terminate, mut interrupt) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let admin = admin_listener.local_addr()?;
    tokio::spawn(admin::serve(admin_listener, handler));
    if let Some(strategy) = &strategy {
        // No client is served before the strategy is known: in a migration that has cut over,
        // a write routed by default to the source would be lost. Clients are refused until
        // then (the pod is not ready; a native sidecar holds the app's start).
        tokio::select! {
            () = first_config(strategy) => {}
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }

    let (stop, shutdown) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let tcp = TcpListener::bind(args.listen).await.map_err(|e| format!("listener {}: {e}", args.listen))?;
    // The bound addresses, not the flags: port 0 picks a free port.
    let listen = tcp.local_addr()?;
    servers.spawn(server::serve(Listener::Tcp(tcp), backend.clone(), metrics.clone(), shutdown.clone()));
    if let Some(path) = &args.unix_socket {
        let _ = std::fs::remove_file(path);
        let unix = UnixListener::bind(path).map_err(|e| format!("unix socket {}: {e}", path.display()))?;
        servers.spawn(server::serve(Listener::Unix(unix), backend.clone(), metrics.clone(), shutdown.clone()));
    }
    ready.store(true, Ordering::Relaxed);
    let routed = matches!(backend, Backend::Routed(_));
    tracing::info!(%listen, %admin, source = source.addr(), routed, "eden-sidecar ready");
    // After readiness: the built-in table classifies until the source's own table arrives.
    tokio::spawn(command_info::learn_from(source.clone()));

    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    ready.store(false, Ordering::Relaxed);
    let _ = stop.send(true);
    while servers.join_next().await.is_some() {}
    if let Some((renewing, reporter)) = lease {
        renewing.abort();
        reporter.release().await;
    }
    tracing::info!("eden-sidecar stopped");
    Ok(())
}

/// Waits until a valid `eden.yaml` has been applied, saying so every few seconds.
async fn first_config(strategy: &Strategy) {
    let mut current = strategy.applier.subscribe();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), current.wait_for(Option::is_some)).await {
            Ok(_) => return,
            Err(_) => tracing::warn!(
                error = strategy.applier.status().last_error().unwrap_or_default(),
                "no valid eden.yaml yet; clients are refused until one arrives"
            ),
        }
    }
}

/// Where the strategy comes from, when the sidecar follows one.
struct Strategy {
    applier: Applier,
    /// Only with `--configmap`: acks need the API.
    lease: Option<LeaseReporter>,
    /// Only with `--configmap`: a mounted file has no API to confirm it with.
    confirmations: Option<Confirmations>,
}

impl Strategy {
    /// Starts the configured source of `eden.yaml`; `None` for a plain proxy.
    async fn start(args: &Args, registry: &mut Registry) -> Result<Option<Strategy>, Box<dyn std::error::Error>> {
        if args.configmap.is_none() && args.config.is_none() {
            return Ok(None);
        }
        let (applier, _) = Applier::new();
        let status: Arc<ConfigStatus> = applier.status();
        status.register(registry);
        if let Some(path) = &args.config {
            tokio::spawn(applier.clone().watch_file(path.clone(), FILE_POLL));
            return Ok(Some(Strategy { applier, lease: None, confirmations: None }));
        }
        let name = args.configmap.clone().unwrap_or_default();
        let client =
            kube::Client::try_default().await.map_err(|e| format!("--configmap {name}: no Kubernetes API: {e}"))?;
        let namespace = args.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
        let pod = args
            .pod_name
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .ok_or("--pod-name (or HOSTNAME) is needed to name this sidecar's Lease")?;
        let (every, valid_for) =
            (Duration::from_millis(args.confirm_every_ms), Duration::from_millis(args.fence_after_ms));
        if valid_for < 2 * every {
            return Err(format!(
                "--fence-after-ms {} must be at least twice --confirm-every-ms {}: one failed read must not fence",
                args.fence_after_ms, args.confirm_every_ms
            )
            .into());
        }
        let config_maps: kube::Api<_> = kube::Api::namespaced(client.clone(), &namespace);
        tokio::spawn(applier.clone().watch_config_map(config_maps.clone(), name.clone()));
        // The ConfigMap is `eden-<migration>`; the Lease is labelled with the migration.
        let migration = name.strip_prefix("eden-").unwrap_or(&name).to_string();
        let leases = kube::Api::namespaced(client, &namespace);
        let lease = LeaseReporter::new(leases, pod, migration, applier.subscribe(), status).with_fencing(valid_for);
        let confirmer =
            Confirmer { api: config_maps, name, applier: applier.clone(), acked: lease.acked(), every, valid_for };
        Ok(Some(Strategy { applier, lease: Some(lease), confirmations: Some(confirmer.start()) }))
    }
}
