//! `eden-sidecar`: the RESP proxy's command line. Wires the listener, the upstream, the admin
//! endpoint and signal handling together; everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use eden_sidecar::admin;
use eden_sidecar::cli::{self, Verb};
use eden_sidecar::metrics::ProxyMetrics;
use eden_sidecar::server::{self, Listener};
use eden_sidecar::telemetry::{LogFormat, init_logging};
use eden_sidecar::upstream::{TlsSettings, Upstream};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

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
    /// The target Redis (used once a migration strategy routes traffic to it).
    #[arg(long, env = "EDEN_TARGET")]
    target: Option<String>,
    /// PEM CA bundle for rediss:// upstreams (system roots when absent).
    #[arg(long, env = "EDEN_UPSTREAM_CA_FILE")]
    upstream_ca_file: Option<PathBuf>,
    /// Name to verify upstream certificates against, when it is not the URI's host.
    #[arg(long, env = "EDEN_UPSTREAM_SERVER_NAME")]
    upstream_server_name: Option<String>,
    /// Accept any upstream certificate (testing only).
    #[arg(long, env = "EDEN_UPSTREAM_INSECURE_SKIP_VERIFY")]
    upstream_insecure_skip_verify: bool,
    /// Connect timeout for upstreams, in milliseconds.
    #[arg(long, env = "EDEN_CONNECT_TIMEOUT_MS", default_value_t = 1000)]
    connect_timeout_ms: u64,
    #[arg(long, env = "EDEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The `replicate` and `verify` verbs live in the library's `cli`; without one, this is the proxy.
    let command =
        Verb::augment_subcommands(Args::command()).args_conflicts_with_subcommands(true).subcommand_negates_reqs(true);
    let matches = command.get_matches();
    if matches.subcommand().is_some() {
        init_logging(LogFormat::Text, "info");
        return cli::run(Verb::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())).await;
    }
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(args.log_format, "info");
    if let Err(err) = run(args).await {
        tracing::error!("eden-sidecar: {err}");
        std::process::exit(1);
    }
    std::process::ExitCode::SUCCESS
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let tls = TlsSettings {
        ca_pem: match &args.upstream_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| format!("--upstream-ca-file {}: {e}", path.display()))?),
            None => None,
        },
        server_name: args.upstream_server_name.clone(),
        insecure_skip_verify: args.upstream_insecure_skip_verify,
    };
    let timeout = Duration::from_millis(args.connect_timeout_ms);
    let source = Upstream::new(&args.source, &tls, timeout).map_err(|e| format!("--source: {e}"))?;
    if let Some(target) = &args.target {
        Upstream::new(target, &tls, timeout).map_err(|e| format!("--target: {e}"))?;
    }

    let metrics = Arc::new(ProxyMetrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let admin_listener =
        TcpListener::bind(args.admin_listen).await.map_err(|e| format!("admin listener {}: {e}", args.admin_listen))?;
    let handler: admin::Handler = {
        let (metrics, ready) = (metrics.clone(), ready.clone());
        Arc::new(move |path| admin::standard(path, ready.load(Ordering::Relaxed), || metrics.render()))
    };

    let (stop, shutdown) = watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    let tcp = TcpListener::bind(args.listen).await.map_err(|e| format!("listener {}: {e}", args.listen))?;
    // The bound addresses, not the flags: port 0 picks a free port.
    let (listen, admin) = (tcp.local_addr()?, admin_listener.local_addr()?);
    servers.spawn(server::serve(Listener::Tcp(tcp), source.clone(), metrics.clone(), shutdown.clone()));
    if let Some(path) = &args.unix_socket {
        let _ = std::fs::remove_file(path);
        let unix = UnixListener::bind(path).map_err(|e| format!("unix socket {}: {e}", path.display()))?;
        servers.spawn(server::serve(Listener::Unix(unix), source.clone(), metrics.clone(), shutdown.clone()));
    }
    // Handlers before readiness: a SIGTERM right after "ready" must drain, not kill.
    let (mut terminate, mut interrupt) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    tokio::spawn(admin::serve(admin_listener, handler));
    ready.store(true, Ordering::Relaxed);
    tracing::info!(%listen, %admin, source = source.addr(), "eden-sidecar ready");

    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    ready.store(false, Ordering::Relaxed);
    let _ = stop.send(true);
    while servers.join_next().await.is_some() {}
    tracing::info!("eden-sidecar stopped");
    Ok(())
}
