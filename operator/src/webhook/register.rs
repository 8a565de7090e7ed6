//! The `MutatingWebhookConfiguration` that sends pod creations to the webhook.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::{WebhookError, WebhookOptions, server};
use crate::context::FIELD_MANAGER;

/// The configuration's name, and its webhook's.
pub const NAME: &str = "eden-sidecar-injector";
const WEBHOOK: &str = "inject.eden.io";

/// How the API server reaches the webhook.
#[derive(Debug, Clone)]
pub enum CallTarget {
    /// A Service in front of the operator's pods, in a cluster.
    Service { namespace: String, name: String, port: i32 },
    /// `https://host:port` as is: a local API server with no Service network.
    Url(String),
}

impl CallTarget {
    /// The names the serving certificate must carry for the API server to trust it.
    pub fn certificate_names(&self) -> Vec<String> {
        match self {
            CallTarget::Service { namespace, name, .. } => vec![
                format!("{name}.{namespace}.svc"),
                format!("{name}.{namespace}.svc.cluster.local"),
                format!("{name}.{namespace}"),
            ],
            CallTarget::Url(url) => {
                let authority = url.split("://").nth(1).unwrap_or(url).split('/').next().unwrap_or_default();
                let host = match authority.strip_prefix('[') {
                    Some(bracketed) => bracketed.split(']').next().unwrap_or_default(),
                    None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
                };
                vec![host.to_string()]
            }
        }
    }
}

/// What the API server does with a pod when the webhook cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailurePolicy {
    /// Create the pod without a sidecar: an operator outage never blocks the cluster's pods.
    Ignore,
    /// Refuse the pod: no application pod ever runs without its sidecar.
    Fail,
}

/// The configuration for `options`, trusting `ca_bundle` (PEM).
pub fn configuration(options: &WebhookOptions, ca_bundle: &str) -> MutatingWebhookConfiguration {
    let (url, service) = match &options.call {
        CallTarget::Url(url) => (Some(format!("{}{}", url.trim_end_matches('/'), server::PATH)), None),
        CallTarget::Service { namespace, name, port } => (
            None,
            Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(server::PATH.into()),
                port: Some(*port),
            }),
        ),
    };
    // Never called for kube-system, nor for the operator's own pods: with `Fail`, an operator
    // that is down could otherwise never be started again.
    let excluded = ["kube-system".to_string(), options.namespace.clone()];
    MutatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(NAME.into()), ..Default::default() },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
                service,
                url,
            },
            rules: Some(vec![RuleWithOperations {
                operations: Some(vec!["CREATE".into()]),
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "kubernetes.io/metadata.name".into(),
                    operator: "NotIn".into(),
                    values: Some(excluded.into()),
                }]),
                ..Default::default()
            }),
            failure_policy: Some(format!("{:?}", options.failure_policy)),
            // Events about skipped pods are its only side effect, and dry runs record none.
            side_effects: "NoneOnDryRun".into(),
            // Another webhook may add containers after this one; a second call is harmless.
            reinvocation_policy: Some("IfNeeded".into()),
            timeout_seconds: Some(5),
            ..Default::default()
        }]),
    }
}

/// Writes the configuration with server-side apply (every replica writes the same) and returns
/// it as the API server now has it.
pub async fn apply(
    client: &Client,
    configuration: &MutatingWebhookConfiguration,
) -> Result<MutatingWebhookConfiguration, WebhookError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(NAME, &params, &Patch::Apply(configuration)).await?)
}

/// Whether the webhook of `configuration` trusts the CA certificate `ca` (PEM).
pub fn trusts(configuration: &MutatingWebhookConfiguration, ca: &str) -> bool {
    let bundles = configuration.webhooks.iter().flatten().filter_map(|hook| hook.client_config.ca_bundle.as_ref());
    bundles.into_iter().any(|bundle| String::from_utf8_lossy(&bundle.0).contains(ca.trim()))
}
