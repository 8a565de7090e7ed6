//! Real components for Eden's tests and its demo: `redis-server` processes and a local
//! Kubernetes control plane (etcd + kube-apiserver built from the upstream Go module).
//!
//! Nothing here is a mock. Tests and the demo start what a user would have, on free loopback
//! ports, and tear it down when the fixture is dropped.

mod control_plane;
mod redis;
mod tls;

use std::net::TcpListener;
use std::path::PathBuf;

pub use control_plane::ControlPlane;
pub use redis::{RedisConfig, RedisServer};
pub use tls::{TestPki, TlsFiles};

/// Why a fixture could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("{program} not found on PATH: {hint}")]
    Missing { program: &'static str, hint: &'static str },
    #[error("{what} did not become ready: {detail}")]
    NotReady { what: String, detail: String },
    #[error("building {what} failed ({status})")]
    Build { what: String, status: std::process::ExitStatus },
    #[error("kubectl {args} failed: {stderr}")]
    Kubectl { args: String, stderr: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// The repository root. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test or `cargo run`, and
/// that runtime value wins over the compile-time one: a target directory shared between clones
/// can hold a binary built in another checkout, whose baked-in path may no longer exist.
pub fn repo_root() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest_dir.join("..")
}

/// A loopback port that was free a moment ago. Another process may take it before the caller
/// binds it; fixtures that lose that race fail with a clear "did not become ready".
pub fn free_port() -> Result<u16, FixtureError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
