//! Keeping the webhook's certificates fresh: every replica checks on a timer ([`Renewal`]),
//! rotating the operator's CA and its own serving certificate when they are due (the order that
//! keeps the API server's trust is in [`super::tls`]), or serving anew the files another issuer
//! renewed.

use std::path::Path;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::time::MissedTickBehavior;
use tokio_rustls::rustls::sign::CertifiedKey;

use super::{CA_SECRET, Certificates, Lifetimes, WebhookError, WebhookOptions, register, tls};

/// The certificate being served.
pub(super) enum Current {
    Issued(tls::Issued),
    Mounted(tls::Mounted),
}

impl Current {
    pub(super) fn certified(&self) -> &Arc<CertifiedKey> {
        match self {
            Current::Issued(issued) => issued.certified(),
            Current::Mounted(mounted) => mounted.certified(),
        }
    }
}

/// What a replica needs to keep its certificates fresh.
pub(super) struct Renewal {
    pub(super) client: Client,
    pub(super) options: WebhookOptions,
    pub(super) secrets: Api<Secret>,
    pub(super) names: Vec<String>,
    pub(super) certificate: Arc<tls::ServingCertificate>,
    pub(super) current: Current,
}

impl Renewal {
    pub(super) async fn run(mut self) {
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
        let live = register::write(&self.client, &self.options, &authority.bundle()).await?;
        // Anything but a certificate of this CA with time left gives way.
        let due = !matches!(&self.current, Current::Issued(issued) if !issued.due(&authority, lifetimes.serving));
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
    async fn reload(&mut self, dir: &Path) -> Result<(), WebhookError> {
        let mounted = tls::Mounted::read(dir)?;
        if matches!(&self.current, Current::Mounted(current) if current.same_as(&mounted)) {
            return Ok(());
        }
        register::write(&self.client, &self.options, mounted.bundle()).await?;
        self.certificate.replace(mounted.certified());
        self.current = Current::Mounted(mounted);
        tracing::info!(dir = %dir.display(), "webhook serving certificate reloaded from its files");
        Ok(())
    }
}
