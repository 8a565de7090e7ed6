//! A Kubernetes cluster the tests reach with an admin kubeconfig: the loopback control plane
//! ([`crate::ControlPlane`]) or the real node ([`crate::Node`]). Clients, kubectl, the chart and
//! namespaces work the same on both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::FixtureError;

/// The admin kubeconfig of a running cluster.
#[derive(Debug)]
pub struct Cluster {
    kubeconfig: PathBuf,
}

impl Cluster {
    pub(crate) fn new(kubeconfig: PathBuf) -> Self {
        Cluster { kubeconfig }
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
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
    /// sharing the cluster never see each other's objects.
    pub async fn namespace(&self, prefix: &str) -> Result<String, FixtureError> {
        self.create_namespace(prefix, BTreeMap::new()).await
    }

    /// [`Cluster::namespace`] enforcing the `restricted` Pod Security Standard: every pod in it
    /// (the operator's, the application's with its injected sidecar) must run as a non-root
    /// user without privileges, capabilities or a seccomp profile other than the runtime's.
    pub async fn restricted_namespace(&self, prefix: &str) -> Result<String, FixtureError> {
        let labels = [("pod-security.kubernetes.io/enforce".to_string(), "restricted".to_string())];
        self.create_namespace(prefix, labels.into()).await
    }

    async fn create_namespace(&self, prefix: &str, labels: BTreeMap<String, String>) -> Result<String, FixtureError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let metadata = ObjectMeta { name: Some(name.clone()), labels: Some(labels), ..Default::default() };
        let namespace = Namespace { metadata, ..Default::default() };
        kube::Api::<Namespace>::all(self.client().await?).create(&PostParams::default(), &namespace).await?;
        Ok(name)
    }
}
