//! The accept loop: one [`session`](crate::session) per client, on TCP or a Unix socket, until
//! shutdown. Shutdown stops accepting at once, then waits for every session to let the replies
//! it owes arrive (each bounded by [`DRAIN_TIMEOUT`](crate::session::DRAIN_TIMEOUT)).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::ProxyMetrics;
use crate::session;
use crate::upstream::Upstream;

/// Where clients connect.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Client {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Client> {
        Ok(match self {
            Listener::Tcp(listener) => {
                let (client, _) = listener.accept().await?;
                client.set_nodelay(true)?;
                Client::Tcp(client)
            }
            Listener::Unix(listener) => Client::Unix(listener.accept().await?.0),
        })
    }
}

/// Serves clients on `listener`, forwarding to `upstream`, until `shutdown` turns true.
pub async fn serve(
    listener: Listener,
    upstream: Upstream,
    metrics: Arc<ProxyMetrics>,
    shutdown: watch::Receiver<bool>,
) {
    let mut sessions = JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (upstream, metrics, shutdown) = (upstream.clone(), metrics.clone(), shutdown.clone());
                match accepted {
                    Ok(Client::Tcp(client)) => sessions.spawn(session::serve(client, upstream, metrics, shutdown)),
                    Ok(Client::Unix(client)) => sessions.spawn(session::serve(client, upstream, metrics, shutdown)),
                    Err(err) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
            }
            Some(_) = sessions.join_next() => {}
            () = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    tracing::info!(sessions = sessions.len(), "shutting down: no new connections; draining replies");
    while sessions.join_next().await.is_some() {}
}

/// Resolves once shutdown has been signalled (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
