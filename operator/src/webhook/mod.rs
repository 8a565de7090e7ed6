//! The mutating admission webhook that puts the sidecar into the pods that ask for it
//! (DESIGN.md §7): [`inject`] decides and writes the patch, [`server`] answers the API server
//! over TLS, [`tls`] keeps the CA every replica signs its serving certificate with, [`renew`]
//! rotates both (or reloads a certificate another issuer keeps), and [`register`] writes the
//! `caBundle` of the `MutatingWebhookConfiguration` that points the API server here.
//!
//! Every replica serves the webhook, leader or not: answering needs no state of its own.

pub mod inject;
pub mod register;
mod renew;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

pub use register::{CallTarget, FailurePolicy};
pub use tls::{Certificates, Lifetimes};

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("webhook TLS: {0}")]
    Tls(String),
    #[error("webhook certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error(
        "MutatingWebhookConfiguration {name} not found: the chart installs it (webhook.enabled), the operator only writes its caBundle",
        name = register::NAME
    )]
    NotInstalled,
    #[error("webhook listener {address}: {source}")]
    Listen { address: SocketAddr, source: std::io::Error },
}

/// How the webhook is served and registered.
pub struct WebhookOptions {
    /// Where it listens.
    pub listen: SocketAddr,
    /// How the API server reaches it.
    pub call: CallTarget,
    pub failure_policy: FailurePolicy,
    /// The operator's namespace: the CA's Secret lives there, and its pods are never sent here.
    pub namespace: String,
    /// The eden-sidecar image injected.
    pub image: String,
    /// This replica's name, for Events.
    pub instance: Option<String>,
    /// Where the admissions are counted.
    pub metrics: Arc<Metrics>,
    /// Where the serving certificate comes from.
    pub certificates: Certificates,
}

/// The CA Secret's name, in the operator's namespace.
pub const CA_SECRET: &str = "eden-webhook-ca";

/// Loads (or makes) the CA, registers the webhook with the API server, then serves it and keeps
/// its certificates fresh until the returned task is aborted.
pub async fn start(client: Client, options: WebhookOptions) -> Result<JoinHandle<()>, WebhookError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let names = options.call.certificate_names();
    let (current, bundle) = match &options.certificates {
        Certificates::Managed(lifetimes) => {
            let authority = tls::Authority::current(&secrets, CA_SECRET, lifetimes).await?;
            (renew::Current::Issued(authority.sign(&names, lifetimes.serving)?), authority.bundle())
        }
        Certificates::Mounted { dir, .. } => {
            let mounted = tls::Mounted::read(dir)?;
            let bundle = mounted.bundle().to_string();
            (renew::Current::Mounted(mounted), bundle)
        }
    };
    let certificate = tls::ServingCertificate::new(current.certified());
    let tls = certificate.server_config()?;
    // Bound before it is registered: the API server's first calls wait in the backlog.
    let listener = server::bind(options.listen).await?;
    let native = server::Injector::native_sidecars(&client).await?;
    let (image, instance, metrics) = (options.image.clone(), options.instance.clone(), options.metrics.clone());
    let injector = Arc::new(server::Injector::new(client.clone(), image, native, instance, metrics));
    register::write(&client, &options, &bundle).await?;
    tracing::info!(listen = %options.listen, native_sidecars = native, "injection webhook serving and registered");
    let renewal = renew::Renewal { client, options, secrets, names, certificate, current };
    Ok(tokio::spawn(async move {
        tokio::select! {
            () = server::serve(listener, tls, injector) => {}
            () = renewal.run() => {}
        }
    }))
}
