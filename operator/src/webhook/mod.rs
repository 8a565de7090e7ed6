//! The mutating admission webhook that puts the sidecar into the pods that ask for it
//! (DESIGN.md §7): [`inject`] decides and writes the patch, [`server`] answers the API server
//! over TLS, [`tls`] keeps the CA every replica signs its serving certificate with (both
//! rotated), and [`register`] writes the `MutatingWebhookConfiguration` that points the API
//! server here.
//!
//! Every replica serves the webhook, leader or not: answering needs no state of its own.

pub mod inject;
pub mod register;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::metrics::Metrics;

pub use register::{CallTarget, FailurePolicy};
pub use tls::Lifetimes;

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("webhook TLS: {0}")]
    Tls(String),
    #[error("webhook certificate: {0}")]
    Certificate(#[from] rcgen::Error),
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
    /// How long the CA and the serving certificates live.
    pub lifetimes: Lifetimes,
}

/// The CA Secret's name, in the operator's namespace.
pub const CA_SECRET: &str = "eden-webhook-ca";

/// Loads (or makes) the CA, registers the webhook with the API server, then serves it and keeps
/// its certificates fresh until the returned task is aborted.
pub async fn start(client: Client, options: WebhookOptions) -> Result<JoinHandle<()>, WebhookError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let names = options.call.certificate_names();
    let authority = tls::Authority::current(&secrets, CA_SECRET, &options.lifetimes).await?;
    let issued = authority.sign(&names, options.lifetimes.serving)?;
    let certificate = tls::ServingCertificate::new(&issued);
    let tls = certificate.server_config()?;
    // Bound before it is registered: the API server's first calls wait in the backlog.
    let listener = server::bind(options.listen).await?;
    let native = server::Injector::native_sidecars(&client).await?;
    let (image, instance, metrics) = (options.image.clone(), options.instance.clone(), options.metrics.clone());
    let injector = Arc::new(server::Injector::new(client.clone(), image, native, instance, metrics));
    register::apply(&client, &register::configuration(&options, &authority.bundle())).await?;
    tracing::info!(listen = %options.listen, native_sidecars = native, "injection webhook serving and registered");
    let renewal = Renewal { client, options, secrets, names, certificate, issued };
    Ok(tokio::spawn(async move {
        tokio::select! {
            () = server::serve(listener, tls, injector) => {}
            () = renewal.run() => {}
        }
    }))
}

/// What a replica needs to keep its certificates fresh.
struct Renewal {
    client: Client,
    options: WebhookOptions,
    secrets: Api<Secret>,
    names: Vec<String>,
    certificate: Arc<tls::ServingCertificate>,
    issued: tls::Issued,
}

impl Renewal {
    async fn run(mut self) {
        let mut every = tokio::time::interval(self.options.lifetimes.check_every);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        every.tick().await; // the first tick is now: everything was just made
        loop {
            every.tick().await;
            if let Err(err) = self.check().await {
                tracing::warn!(%err, "webhook certificates: check failed; trying again at the next");
            }
        }
    }

    /// Rotates the CA when it is due (any replica may), writes the bundle that trusts it, and
    /// renews this replica's certificate when that is due, once the bundle trusts its CA.
    async fn check(&mut self) -> Result<(), WebhookError> {
        let lifetimes = self.options.lifetimes;
        let authority = tls::Authority::current(&self.secrets, CA_SECRET, &lifetimes).await?;
        let live = register::apply(&self.client, &register::configuration(&self.options, &authority.bundle())).await?;
        if self.issued.due(&authority, lifetimes.serving) && register::trusts(&live, authority.certificate()) {
            self.issued = authority.sign(&self.names, lifetimes.serving)?;
            self.certificate.replace(&self.issued);
            tracing::info!("webhook serving certificate renewed");
        }
        Ok(())
    }
}
