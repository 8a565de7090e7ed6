//! Helm, built from its published Go module (`e2e/helm/`, once per version, into the same cache
//! as the control plane), so that tests install the chart as `helm install` or Argo CD renders
//! it rather than an imitation of it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::FixtureError;

/// The Helm binary.
#[derive(Debug, Clone)]
pub struct Helm {
    binary: PathBuf,
}

impl Helm {
    /// Builds Helm first when this version has no cached binary. `EDEN_HELM` overrides the
    /// lookup.
    pub fn find() -> Result<Self, FixtureError> {
        Ok(Helm { binary: crate::go_program("EDEN_HELM", "e2e/helm/build.sh")? })
    }

    /// `helm` with `args`.
    pub fn command(&self) -> Command {
        Command::new(&self.binary)
    }

    /// The manifests of the repository's chart (`charts/eden`) installed as release `eden` in
    /// `namespace`, CRDs first, with one `--set` for each of `values` (Helm's `key=value`).
    pub fn template_eden(&self, namespace: &str, values: &[&str]) -> Result<String, FixtureError> {
        let mut command = self.command();
        command.args(["template", "eden"]).arg(crate::repo_root().join("charts/eden"));
        command.args(["--namespace", namespace, "--include-crds"]);
        for value in values {
            command.args(["--set", value]);
        }
        crate::stdout_of(&mut command, None)
    }

    /// `helm install eden charts/eden` in `namespace` of the cluster `kubeconfig` names, with one
    /// `--set` for each of `values`: a release Helm records, and `helm uninstall` removes.
    pub fn install_eden(&self, kubeconfig: &Path, namespace: &str, values: &[&str]) -> Result<String, FixtureError> {
        self.release(&["install"], kubeconfig, namespace, values)
    }

    /// `helm upgrade eden charts/eden` of the release in `namespace`, keeping its values but for
    /// `values`.
    pub fn upgrade_eden(&self, kubeconfig: &Path, namespace: &str, values: &[&str]) -> Result<String, FixtureError> {
        self.release(&["upgrade", "--reuse-values"], kubeconfig, namespace, values)
    }

    fn release(
        &self,
        verb: &[&str],
        kubeconfig: &Path,
        namespace: &str,
        values: &[&str],
    ) -> Result<String, FixtureError> {
        let mut command = self.command();
        command.args(verb).arg("eden").arg(crate::repo_root().join("charts/eden"));
        command.args(["--namespace", namespace]).arg("--kubeconfig").arg(kubeconfig);
        for value in values {
            command.args(["--set", value]);
        }
        crate::stdout_of(&mut command, None)
    }

    /// `helm uninstall eden` from `namespace`, waiting until its objects are gone.
    pub fn uninstall_eden(&self, kubeconfig: &Path, namespace: &str) -> Result<String, FixtureError> {
        let mut command = self.command();
        command.args(["uninstall", "eden", "--wait", "--namespace", namespace]).arg("--kubeconfig").arg(kubeconfig);
        crate::stdout_of(&mut command, None)
    }
}
