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
            (Current::Issued(authority.sign(&names, lifetimes.serving)?), authority.bundle())
        }
        Certificates::Mounted { dir, .. } => {
            let mounted = tls::Mounted::read(dir)?;
            let bundle = mounted.bundle().to_string();
            (Current::Mounted(mounted), bundle)
        }
    };
    let certificate = tls::ServingCertificate::new(current.certified());
    let tls = certificate.server_config()?;
    // Bound before it is registered: the API server's first calls wait in the backlog.
    let listener = server::bind(options.listen).await?;
    let native = server::Injector::native_sidecars(&client).await?;
    let (image, instance, metrics) = (options.image.clone(), options.instance.clone(), options.metrics.clone());
    let injector = Arc::new(server::Injector::new(client.clone(), image, native, instance, metrics));
    register::apply(&client, &register::configuration(&options, &bundle)).await?;
    tracing::info!(listen = %options.listen, native_sidecars = native, "injection webhook serving and registered");
    let renewal = Renewal { client, options, secrets, names, certificate, current };
    Ok(tokio::spawn(async move {
        tokio::select! {
            () = server::serve(listener, tls, injector) => {}
            () = renewal.run() => {}
        }
    }))
}

/// The certificate being served.
enum Current {
    Issued(tls::Issued),
    Mounted(tls::Mounted),
}

impl Current {
    fn certified(&self) -> &Arc<tokio_rustls::rustls::sign::CertifiedKey> {
        match self {
            Current::Issued(issued) => issued.certified(),
            Current::Mounted(mounted) => mounted.certified(),
        }
    }
}

/// What a replica needs to keep its certificates fresh.
struct Renewal {
    client: Client,
    options: WebhookOptions,
    secrets: Api<Secret>,
    names: Vec<String>,
    certificate: Arc<tls::ServingCertificate>,
    current: Current,
}

impl Renewal {
    async fn run(mut self) {
        let mut every = tokio::time::interval(self.options.certificates.check_every());
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        every.tick().await; // the first tick is now: everything was just made
        loop {
            every.tick().await;
            if let Err(err) = self.check().await {
                tracing::warn!(%err, "webhook certificates: check failed; trying again at the next");
            }
        }
    }

    async fn check(&mut self) -> Result<(), WebhookError> {
        match self.options.certificates.clone() {
            Certificates::Managed(lifetimes) => self.renew(&lifetimes).await,
            Certificates::Mounted { dir, .. } => self.reload(&dir).await,
        }
    }

    /// Rotates the CA when it is due (any replica may), writes the bundle that trusts it, and
    /// renews this replica's certificate when that is due, once the bundle trusts its CA.
    async fn renew(&mut self, lifetimes: &Lifetimes) -> Result<(), WebhookError> {
        let authority = tls::Authority::current(&self.secrets, CA_SECRET, lifetimes).await?;
        let live = register::apply(&self.client, &register::configuration(&self.options, &authority.bundle())).await?;
        let due = match &self.current {
            Current::Issued(issued) => issued.due(&authority, lifetimes.serving),
            Current::Mounted(_) => true,
        };
        if due && register::trusts(&live, authority.certificate()) {
            let issued = authority.sign(&self.names, lifetimes.serving)?;
            self.certificate.replace(issued.certified());
            self.current = Current::Issued(issued);
            tracing::info!("webhook serving certificate renewed");
        }
        Ok(())
    }

    /// Serves the mounted files again when the issuer has renewed them, after writing their
    /// `ca.crt` as the bundle.
    async fn reload(&mut self, dir: &std::path::Path) -> Result<(), WebhookError> {
        let mounted = tls::Mounted::read(dir)?;
        if matches!(&self.current, Current::Mounted(current) if current.same_as(&mounted)) {
            return Ok(());
        }
        register::apply(&self.client, &register::configuration(&self.options, mounted.bundle())).await?;
        self.certificate.replace(mounted.certified());
        self.current = Current::Mounted(mounted);
        tracing::info!(dir = %dir.display(), "webhook serving certificate reloaded from its files");
        Ok(())
    }
}
