//! A real Kubernetes API server (etcd + kube-apiserver v1.33) on loopback, or serving the real
//! node ([`crate::Node`]).
//!
//! The binary comes from `e2e/control-plane/` (Go, built once by its `build.sh` into a cache
//! outside the clone). One control plane is shared by every test of a test binary
//! ([`ControlPlane::shared`]); tests isolate themselves in their own namespaces
//! ([`Cluster::namespace`]). The process watches its stdin, so it exits with the test
//! binary even though a shared static is never dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use crate::{Cluster, FixtureError};

/// The state directories' prefix, in the temporary directory.
const DIR_PREFIX: &str = "eden-control-plane-";
/// The process a state directory belongs to, in it.
const OWNER_FILE: &str = "owner.pid";

/// Removes the state directories of control planes whose process has ended. A shared control
/// plane lives in a static, which is never dropped, so its directory (etcd's data, some 70 MB)
/// would outlive every test binary that made one.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for dir in entries.flatten().map(|entry| entry.path()) {
        let named = dir.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(DIR_PREFIX));
        // A directory without an owner is one being made right now: left alone.
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE)).ok();
        if named && owner.is_some_and(|pid| !Path::new("/proc").join(pid.trim()).exists()) {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A running control plane and the admin kubeconfig that reaches it.
#[derive(Debug)]
pub struct ControlPlane {
    child: Child,
    // Held open: the control plane shuts down when this pipe closes.
    _stdin: ChildStdin,
    cluster: Cluster,
    _dir: TempDir,
}

impl ControlPlane {
    /// Builds the binary if needed, starts it on loopback, and waits until `/readyz` answers.
    pub fn start() -> Result<Self, FixtureError> {
        Self::start_serving(None)
    }

    /// [`ControlPlane::start`] for a real node ([`crate::Node`]): listening on `address` (a
    /// local one pods reach), with ServiceAccount tokens and the `kubernetes` Service's
    /// endpoints.
    pub fn start_for_node(address: &str) -> Result<Self, FixtureError> {
        Self::start_serving(Some(address))
    }

    fn start_serving(node_address: Option<&str>) -> Result<Self, FixtureError> {
        let binary = Self::binary()?;
        remove_stale_dirs();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
        let mut child = Command::new(&binary)
            .arg("--dir")
            .arg(dir.path())
            .arg("--exit-on-stdin-close")
            .args(node_address.map(|address| format!("--advertise-address={address}")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(dir.path().join("control-plane.log"))?))
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");

        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(path) = line.strip_prefix("ready ") {
                    let _ = ready_tx.send(PathBuf::from(path));
                }
            }
        });
        match ready_rx.recv_timeout(Duration::from_secs(120)) {
            Ok(kubeconfig) => Ok(ControlPlane { child, _stdin: stdin, cluster: Cluster::new(kubeconfig), _dir: dir }),
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.path().join("control-plane.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                Err(FixtureError::NotReady {
                    what: "kube-apiserver".into(),
                    detail: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                })
            }
        }
    }

    /// The control plane every test in this process shares, started on first use.
    ///
    /// # Panics
    /// When the control plane cannot start: no test that needs it can run.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| ControlPlane::start().unwrap_or_else(|err| panic!("{err}")))
    }

    /// The path of `eden-control-plane` (also the node's kubelet, kube-proxy, scheduler and
    /// controller-manager), building it first if this source version has no cached binary.
    /// `EDEN_CONTROL_PLANE` overrides the lookup.
    pub fn binary() -> Result<PathBuf, FixtureError> {
        crate::go_program("EDEN_CONTROL_PLANE", "e2e/control-plane/build.sh")
    }

    /// The API server's address, as the admin kubeconfig names it.
    pub fn api_addr(&self) -> Result<std::net::SocketAddr, FixtureError> {
        let text = std::fs::read_to_string(self.kubeconfig())?;
        text.lines()
            .find_map(|line| line.trim_start().strip_prefix("server: https://")?.parse().ok())
            .ok_or_else(|| FixtureError::NotReady { what: "kubeconfig".into(), detail: "no server address".into() })
    }

    /// A copy of the admin kubeconfig that reaches the API server through `addr` (a [`crate::Relay`]
    /// to it, on loopback like the server itself), written to `path`.
    pub fn kubeconfig_via(&self, addr: std::net::SocketAddr, path: &Path) -> Result<(), FixtureError> {
        let text = std::fs::read_to_string(self.kubeconfig())?;
        let rewritten: Vec<String> = text
            .lines()
            .map(|line| match line.trim_start().strip_prefix("server: ") {
                Some(_) => format!("{}server: https://{addr}", &line[..line.len() - line.trim_start().len()]),
                None => line.to_string(),
            })
            .collect();
        std::fs::write(path, rewritten.join("\n"))?;
        Ok(())
    }
}

impl std::ops::Deref for ControlPlane {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        &self.cluster
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Closing stdin (dropping `_stdin`) starts a clean shutdown; the kill is the backstop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
