//! `redis-server` processes on free loopback ports, with chosen configuration.
//!
//! Each [`RedisServer`] owns one real process and a scratch directory; dropping it kills the
//! process. Tests that need an upstream to go away and come back use [`RedisServer::stop`] and
//! [`RedisServer::restart`], which keep the port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{FixtureError, free_port};

/// How to start a `redis-server`: extra directives as they would appear in `redis.conf`.
#[derive(Debug, Clone, Default)]
pub struct RedisConfig {
    directives: Vec<(String, String)>,
    tls: bool,
}

impl RedisConfig {
    /// Adds one `redis.conf` directive, e.g. `("notify-keyspace-events", "KEA")`.
    pub fn directive(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.directives.push((name.into(), value.into()));
        self
    }

    /// Serves TLS only (no plaintext port), with a certificate for 127.0.0.1 signed by the CA
    /// given to the server; see [`RedisServer::tls_ca_file`].
    pub fn tls(mut self, ca_file: &Path, cert_file: &Path, key_file: &Path) -> Self {
        self.tls = true;
        let path = |p: &Path| p.display().to_string();
        self.directive("tls-ca-cert-file", path(ca_file))
            .directive("tls-cert-file", path(cert_file))
            .directive("tls-key-file", path(key_file))
            .directive("tls-auth-clients", "no")
    }
}

/// A running `redis-server` on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    config: RedisConfig,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server with the defaults tests want: no persistence, loopback only.
    pub fn start() -> Result<Self, FixtureError> {
        Self::with_config(RedisConfig::default())
    }

    pub fn with_config(config: RedisConfig) -> Result<Self, FixtureError> {
        let dir = tempfile::Builder::new().prefix("eden-redis-").tempdir()?;
        let mut server = RedisServer { child: None, port: free_port()?, config, dir };
        server.spawn()?;
        Ok(server)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.config.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The server's scratch directory (its working directory, for dumps and logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server; the port stays reserved for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open but nothing is answered, like a
    /// server stalled by its host. [`RedisServer::thaw`] resumes it.
    pub fn freeze(&self) -> Result<(), FixtureError> {
        self.signal("-STOP")
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) -> Result<(), FixtureError> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> Result<(), FixtureError> {
        let pid = self.child.as_ref().map(Child::id).ok_or_else(|| FixtureError::NotReady {
            what: format!("redis-server on port {}", self.port),
            detail: "it is stopped".into(),
        })?;
        let status = std::process::Command::new("kill").arg(signal).arg(pid.to_string()).status()?;
        if !status.success() {
            return Err(FixtureError::NotReady { what: format!("kill {signal} {pid}"), detail: status.to_string() });
        }
        Ok(())
    }

    /// Starts the server again on the same port, with the same configuration and an empty
    /// dataset.
    pub fn restart(&mut self) -> Result<(), FixtureError> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), FixtureError> {
        let binary = find_on_path("redis-server").ok_or(FixtureError::Missing {
            program: "redis-server",
            hint: "run `make deps` (installs Debian's redis-server and redis-tools)",
        })?;
        let listen: &[&str] = if self.config.tls { &["--port", "0", "--tls-port"] } else { &["--port"] };
        let mut args: Vec<String> = ["--bind", "127.0.0.1"].iter().chain(listen).map(|s| s.to_string()).collect();
        args.push(self.port.to_string());
        for (name, value) in [("save", ""), ("appendonly", "no"), ("daemonize", "no"), ("logfile", "")] {
            args.push(format!("--{name}"));
            args.push(value.to_string());
        }
        args.push("--dir".into());
        args.push(self.dir.path().display().to_string());
        for (name, value) in &self.config.directives {
            args.push(format!("--{name}"));
            args.push(value.clone());
        }
        let mut child = Command::new(binary)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let ready = self.wait_ready(&mut child);
        if let Err(err) = ready {
            let _ = child.kill();
            let mut log = String::new();
            if let Some(mut out) = child.stdout.take() {
                let _ = out.read_to_string(&mut log);
            }
            let _ = child.wait();
            return Err(FixtureError::NotReady {
                what: format!("redis-server on port {}", self.port),
                detail: format!("{err}; log:\n{log}"),
            });
        }
        // Drain the log so the server never blocks on a full pipe.
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
        }
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the server accepts connections: a PING for plaintext servers, the port
    /// accepting for TLS ones (a TLS handshake needs a client this fixture does not carry).
    fn wait_ready(&self, child: &mut Child) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("exited with {status}"));
            }
            if let Ok(mut stream) = TcpStream::connect(self.addr()) {
                if self.config.tls {
                    return Ok(());
                }
                // A password-protected server answers -NOAUTH: up all the same.
                let mut reply = [0u8; 7];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream.read_exact(&mut reply).is_ok()
                    && (&reply == b"+PONG\r\n" || reply.starts_with(b"-NOAUTH"))
                {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err("no PONG within 10s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn find_on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join(program)).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|candidate| candidate.is_file())
}
