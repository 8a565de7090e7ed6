//! The accept loop: one [`session`](crate::session) per client, on TCP or a Unix socket, until
//! shutdown. A [`Backend`] says whether sessions are plain (one upstream, bytes copied) or
//! routed by a migration strategy; the choice is made once, so the plain proxy pays nothing
//! for routing. Shutdown stops accepting at once, then waits for every session to let the replies
//! it owes arrive (each bounded by [`DRAIN_TIMEOUT`](crate::session::DRAIN_TIMEOUT)).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::metrics::ProxyMetrics;
use crate::plan::Routing;
use crate::session;
use crate::upstream::Upstream;

/// What sessions forward to.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A plain proxy to one server.
    Plain(Upstream),
    /// Source and target, command by command, as the strategy says.
    Routed(Routing),
}

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

/// Serves clients on `listener`, forwarding to `backend`, until `shutdown` turns true.
pub async fn serve(listener: Listener, backend: Backend, metrics: Arc<ProxyMetrics>, shutdown: watch::Receiver<bool>) {
    let mut sessions = JoinSet::new();
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (metrics, shutdown) = (metrics.clone(), shutdown.clone());
                match (accepted, &backend) {
                    (Ok(Client::Tcp(client)), Backend::Plain(upstream)) => {
                        sessions.spawn(session::serve(client, upstream.clone(), metrics, shutdown))
                    }
                    (Ok(Client::Unix(client)), Backend::Plain(upstream)) => {
                        sessions.spawn(session::serve(client, upstream.clone(), metrics, shutdown))
                    }
                    (Ok(Client::Tcp(client)), Backend::Routed(routing)) => {
                        sessions.spawn(session::routed::serve(client, routing.clone(), metrics, shutdown))
                    }
                    (Ok(Client::Unix(client)), Backend::Routed(routing)) => {
                        sessions.spawn(session::routed::serve(client, routing.clone(), metrics, shutdown))
                    }
                    (Err(err), _) => {
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
