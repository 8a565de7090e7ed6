//! Real components for Eden's tests and its demo: `redis-server` processes and Redis Clusters,
//! a local Kubernetes control plane (etcd + kube-apiserver built from the upstream Go module), a
//! real node where Pods run ([`Node`]) and Helm (built from its published module).
//!
//! Nothing here is a mock. Tests and the demo start what a user would have, on free loopback
//! ports (the node: on its own pod network), and tear it down when the fixture is dropped or its
//! test binary exits.

mod cluster;
mod control_plane;
mod helm;
pub mod node;
mod redis;
mod redis_cluster;
mod relay;
pub mod shop;
mod tls;
pub mod writers;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use cluster::Cluster;
pub use control_plane::ControlPlane;
pub use helm::Helm;
pub use node::Node;
pub use redis::{RedisConfig, RedisServer};
pub use redis_cluster::RedisCluster;
pub use relay::Relay;
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
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Polls `probe` every 200 ms until it returns `Some`, for at most `timeout`: the one way the
/// fixtures and the tests on them wait for what happens elsewhere (a process, a node, a pod).
pub fn eventually<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Result<T, FixtureError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(FixtureError::NotReady { what: what.into(), detail: format!("not within {timeout:?}") });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The repository root. Cargo sets `CARGO_MANIFEST_DIR` when it runs a test or `cargo run`, and
/// that runtime value wins over the compile-time one: a target directory shared between clones
/// can hold a binary built in another checkout, whose baked-in path may no longer exist.
pub fn repo_root() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    manifest_dir.join("..")
}

/// A loopback port for a server the caller starts, which may bind it only seconds later (a
/// sidecar listens once it has read its strategy from the API server) and again after a restart.
///
/// A port the kernel picked for `127.0.0.1:0` would be free only for a moment: it comes from the
/// ephemeral range, where every outgoing connection of the suite (thousands a minute) takes its
/// local port, and where another test process's pick may land too. So ports come from below the
/// ephemeral range, where no outgoing connection goes, in blocks a process claims by listening
/// on the block's first port for as long as it runs: two test processes never share a block, and
/// a process never hands out a port twice. A port some other program listens on is skipped.
pub fn free_port() -> Result<u16, FixtureError> {
    static PORTS: std::sync::Mutex<Ports> = std::sync::Mutex::new(Ports { claims: Vec::new(), next: 0, end: 0 });
    let mut ports = PORTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        if ports.next == ports.end {
            ports.claim_block()?;
        }
        let port = ports.next;
        ports.next += 1;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// The blocks of ports this process holds (see [`free_port`]), and what is left of the last.
struct Ports {
    /// A listener on the first port of each block claimed, kept for the process's lifetime.
    claims: Vec<TcpListener>,
    next: u16,
    end: u16,
}

impl Ports {
    const BLOCK: u16 = 64;
    const LOWEST: u16 = 10_000;

    /// Claims the first block after the last one (the first at a place of this process's own,
    /// so that processes started together do not all try the same block) that no process holds.
    fn claim_block(&mut self) -> Result<(), FixtureError> {
        // The kernel's ephemeral range starts at 32768 unless configured otherwise.
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768u16);
        let blocks = (ephemeral.saturating_sub(Self::LOWEST) / Self::BLOCK).max(1);
        let first = match self.claims.is_empty() {
            true => (std::process::id() % u32::from(blocks)) as u16,
            false => (self.end - Self::LOWEST) / Self::BLOCK,
        };
        let (claim, start) = (0..blocks)
            .map(|i| Self::LOWEST + (first + i) % blocks * Self::BLOCK)
            .find_map(|start| Some((TcpListener::bind(("127.0.0.1", start)).ok()?, start)))
            .ok_or_else(|| FixtureError::NotReady {
                what: "a block of loopback ports".into(),
                detail: format!("every block of {} ports below {ephemeral} is taken", Self::BLOCK),
            })?;
        self.claims.push(claim);
        (self.next, self.end) = (start + 1, start + Self::BLOCK);
        Ok(())
    }
}

/// The path of one of the workspace's binaries (`eden-sidecar` of package directory `sidecar`),
/// so a test of one package can run another's. `cargo test --workspace` builds it beside the
/// test binaries; when it is missing, or older than a source file of its package (a test of
/// another package run alone after an edit), cargo builds it first. A build that is not needed
/// is not asked for: cargo's plain build resolves dev-dependency features differently from a
/// test build, and would rebuild (and replace) the binary the test build made.
pub fn workspace_binary(package_dir: &str, name: &str) -> Result<PathBuf, FixtureError> {
    // A test runs from `<target>/<profile>/deps`, a binary from `<target>/<profile>`, where
    // binaries sit.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().filter(|dir| !dir.ends_with("deps")).or_else(|| exe.parent()?.parent());
    let profile = dir.ok_or_else(|| FixtureError::NotReady {
        what: name.into(),
        detail: format!("{} is not in a cargo target directory", exe.display()),
    })?;
    let binary = profile.join(name);
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let sources = newest_modification(&repo_root().join(package_dir).join("src"))?;
    if built.is_none_or(|built| built < sources) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo).args(["build", "-q", "--bin", name]).current_dir(repo_root()).status()?;
        if !status.success() {
            return Err(FixtureError::Build { what: name.into(), status });
        }
    }
    Ok(binary)
}

/// The latest modification time of any file under `dir`.
fn newest_modification(dir: &std::path::Path) -> Result<std::time::SystemTime, FixtureError> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let modified = match entry.file_type()?.is_dir() {
            true => newest_modification(&entry.path())?,
            false => entry.metadata()?.modified()?,
        };
        newest = newest.max(modified);
    }
    Ok(newest)
}

/// `argocd-health` (`e2e/argocd-health/`), which runs an Argo CD resource health script as Argo
/// CD does, built first when this source version has no cached binary.
pub fn argocd_health() -> Result<PathBuf, FixtureError> {
    go_program("EDEN_ARGOCD_HEALTH", "e2e/argocd-health/build.sh")
}

/// A Python interpreter with the client libraries of `e2e/python/requirements.txt` (pinned
/// versions from PyPI), in a virtualenv made first when those requirements have none cached.
pub fn python_clients() -> Result<PathBuf, FixtureError> {
    go_program("EDEN_PYTHON", "e2e/python/build.sh")
}

/// The program of the client matrix for one ecosystem (`sidecar/tests/clients/<ecosystem>/`:
/// `go`, `node`, `java`), with its client library at the pinned version from the ecosystem's
/// registry, built first when this source version has none cached; `$EDEN_CLIENT_<ECOSYSTEM>`
/// overrides it.
pub fn matrix_client(ecosystem: &str) -> Result<PathBuf, FixtureError> {
    let script = format!("sidecar/tests/clients/{ecosystem}/build.sh");
    go_program(&format!("EDEN_CLIENT_{}", ecosystem.to_uppercase()), &script)
}

/// The path of a program of the test kit (a Go program, or Python with its packages):
/// `$override` when set, else what its build script (relative to the repository root) prints,
/// which builds the program first when this source version has no cached one.
fn go_program(override_var: &str, script: &str) -> Result<PathBuf, FixtureError> {
    if let Some(path) = std::env::var_os(override_var) {
        return Ok(PathBuf::from(path));
    }
    let script = repo_root().join(script);
    let output = Command::new("bash").arg(&script).stderr(Stdio::inherit()).output()?;
    if !output.status.success() {
        return Err(FixtureError::Build { what: script.display().to_string(), status: output.status });
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// Runs `command` (with `stdin` written to it, if any) and returns its stdout; a non-zero exit
/// is an error that carries the command line and its stderr.
fn stdout_of(command: &mut Command, stdin: Option<&str>) -> Result<String, FixtureError> {
    use std::io::Write;
    let mut child = command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin is piped").write_all(input.as_bytes())?;
    }
    let output = child.wait_with_output()?;
    if !output.status.success() {
        let words: Vec<_> = std::iter::once(command.get_program()).chain(command.get_args()).collect();
        return Err(FixtureError::Failed {
            command: words.iter().map(|word| word.to_string_lossy()).collect::<Vec<_>>().join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range_in_blocks_held_by_this_process() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        let ports: Vec<u16> = (0..3 * Ports::BLOCK).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port handed out twice: {ports:?}");
        assert!(ports.iter().all(|&port| (Ports::LOWEST..ephemeral).contains(&port)), "{ports:?}");
        for port in ports {
            let block = Ports::LOWEST + (port - Ports::LOWEST) / Ports::BLOCK * Ports::BLOCK;
            assert!(TcpListener::bind(("127.0.0.1", block)).is_err(), "block {block} of port {port} is not held");
        }
    }
}
