//! A real Kubernetes API server (etcd + kube-apiserver v1.33) on loopback.
//!
//! The binary comes from `e2e/control-plane/` (Go, built once by its `build.sh` into a cache
//! outside the clone). One control plane is shared by every test of a test binary
//! ([`ControlPlane::shared`]); tests isolate themselves in their own namespaces
//! ([`ControlPlane::namespace`]). The process watches its stdin, so it exits with the test
//! binary even though a shared static is never dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;

use crate::FixtureError;

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
    kubeconfig: PathBuf,
    _dir: TempDir,
}

impl ControlPlane {
    /// Builds the binary if needed, starts it, and waits until `/readyz` answers.
    pub fn start() -> Result<Self, FixtureError> {
        let binary = Self::binary()?;
        remove_stale_dirs();
        let dir = tempfile::Builder::new().prefix(DIR_PREFIX).tempdir()?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
        let mut child = Command::new(&binary)
            .arg("--dir")
            .arg(dir.path())
            .arg("--exit-on-stdin-close")
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
            Ok(kubeconfig) => Ok(ControlPlane { child, _stdin: stdin, kubeconfig, _dir: dir }),
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

    /// The path of `eden-control-plane`, building it first if this source version has no
    /// cached binary. `EDEN_CONTROL_PLANE` overrides the lookup.
    pub fn binary() -> Result<PathBuf, FixtureError> {
        crate::go_program("EDEN_CONTROL_PLANE", "e2e/control-plane/build.sh")
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's address, as the admin kubeconfig names it.
    pub fn api_addr(&self) -> Result<std::net::SocketAddr, FixtureError> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        text.lines()
            .find_map(|line| line.trim_start().strip_prefix("server: https://")?.parse().ok())
            .ok_or_else(|| FixtureError::NotReady { what: "kubeconfig".into(), detail: "no server address".into() })
    }

    /// A copy of the admin kubeconfig that reaches the API server through `addr` (a [`crate::Relay`]
    /// to it, on loopback like the server itself), written to `path`.
    pub fn kubeconfig_via(&self, addr: std::net::SocketAddr, path: &Path) -> Result<(), FixtureError> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
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

    /// A kube-rs client with admin rights.
    pub async fn client(&self) -> Result<kube::Client, FixtureError> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(kube::Error::from)?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(kube::Error::from)?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A kube-rs client that acts as `user` (impersonation by the admin), so that a test runs
    /// code with exactly the permissions RBAC gives that user. A ServiceAccount's user name
    /// (`system:serviceaccount:<ns>:<name>`) also gets its ServiceAccount groups.
    pub async fn client_as(&self, user: &str) -> Result<kube::Client, FixtureError> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(kube::Error::from)?;
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(kube::Error::from)?;
        config.auth_info.impersonate = Some(user.to_string());
        Ok(kube::Client::try_from(config)?)
    }

    /// `kubectl` pointed at this control plane.
    pub fn kubectl(&self) -> Command {
        let mut command = Command::new("kubectl");
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command
    }

    /// Applies `crds/eden.yaml` (server-side, so repeated calls are no-ops) and waits until
    /// every Eden CRD is established.
    pub fn install_eden_crds(&self) -> Result<(), FixtureError> {
        let crds = crate::repo_root().join("crds/eden.yaml");
        let crds = crds.to_str().expect("repository paths are UTF-8");
        self.run_kubectl(&["apply", "--server-side", "--force-conflicts", "-f", crds])?;
        self.run_kubectl(&["wait", "--for=condition=Established", "-f", crds, "--timeout=30s"])?;
        Ok(())
    }

    /// Installs the repository's chart (`charts/eden`, rendered by `helm`) as release `eden` in
    /// `namespace` with one `--set` for each of `values`, and waits until its CRDs are
    /// established. `kubectl apply` rather than `helm install`: the objects are the same, and a
    /// test's namespaces come and go without Helm's release records.
    pub fn install_chart(&self, helm: &crate::Helm, namespace: &str, values: &[&str]) -> Result<(), FixtureError> {
        // No `-n`: the sidecar RBAC goes to the sidecar namespaces, the rest names the release's.
        crate::stdout_of(self.kubectl().args(["apply", "-f", "-"]), Some(&helm.template_eden(namespace, values)?))?;
        self.run_kubectl(&["wait", "--for=condition=Established", "crd/endpoints.eden.io", "crd/migrations.eden.io"])?;
        Ok(())
    }

    /// Runs kubectl with `args` and returns its stdout; a non-zero exit is an error that
    /// carries kubectl's stderr.
    pub fn run_kubectl(&self, args: &[&str]) -> Result<String, FixtureError> {
        crate::stdout_of(self.kubectl().args(args), None)
    }

    /// `kubectl apply -n NAMESPACE -f -` with `manifest` on stdin; returns kubectl's stdout, or
    /// an error carrying its stderr (what a user would read when the API server refuses).
    pub fn apply_manifest(&self, namespace: &str, manifest: &str) -> Result<String, FixtureError> {
        crate::stdout_of(self.kubectl().args(["apply", "-n", namespace, "-f", "-"]), Some(manifest))
    }

    /// Creates a fresh namespace named `<prefix>-<n>`, unique within this process, so tests
    /// sharing the control plane never see each other's objects.
    pub async fn namespace(&self, prefix: &str) -> Result<String, FixtureError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let namespace =
            Namespace { metadata: ObjectMeta { name: Some(name.clone()), ..Default::default() }, ..Default::default() };
        kube::Api::<Namespace>::all(self.client().await?).create(&PostParams::default(), &namespace).await?;
        Ok(name)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Closing stdin (dropping `_stdin`) starts a clean shutdown; the kill is the backstop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
