//! A TCP relay a test can cut and heal, or slow down: a real network partition, or a slow link,
//! between two processes on loopback. Cutting drops every relayed connection and resets new
//! ones until healed, as a broken link would; a delay holds every chunk the server sends for
//! that long before the client gets it. Nothing on either side is mocked.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct Relay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    delay: watch::Sender<Duration>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays connections made to [`Self::addr`] to `to`.
    pub async fn start(to: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, cuts) = watch::channel(false);
        let (delay, delays) = watch::channel(Duration::ZERO);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *cuts.borrow() {
                    continue; // dropped: the client sees its connection reset
                }
                let mut cuts = cuts.clone();
                let delays = delays.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(to).await else { return };
                    let (mut from_client, to_client) = client.into_split();
                    let (from_server, mut to_server) = server.into_split();
                    tokio::select! {
                        _ = tokio::io::copy(&mut from_client, &mut to_server) => {}
                        _ = pump(from_server, to_client, delays) => {}
                        _ = cuts.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Relay { addr, cut, delay, task })
    }

    /// Holds every chunk the server sends for `delay` before relaying it (zero: none).
    pub fn delay(&self, delay: Duration) {
        self.delay.send_replace(delay);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Drops every connection and refuses new ones until [`Self::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

/// Copies `from` to `to`, each chunk after the delay in force when it was read.
async fn pump(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin, delays: watch::Receiver<Duration>) {
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        let delay = *delays.borrow();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
