//! The `MutatingWebhookConfiguration` that sends the pods that opted in to the webhook.
//!
//! In a cluster the chart installs it (`charts/eden/templates/webhook.yaml`, the same webhooks as
//! [`configuration`]), so `helm uninstall` removes it, and the operator only writes its
//! `caBundle`: it never creates it, and one the release removed stays removed. With
//! [`CallTarget::Url`] (an API server with no Service network, no chart) the operator applies the
//! whole [`configuration`] itself.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement, ObjectMeta};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use super::inject::{ENABLED, INJECT};
use super::{WebhookError, WebhookOptions, server};
use crate::context::FIELD_MANAGER;

/// The configuration's name.
pub const NAME: &str = "eden-sidecar-injector";
/// The webhook called for pods whose own `eden.io/inject` annotation asks (any value but
/// `"false"`: a value the webhook cannot read is admitted with the reason).
pub const POD_WEBHOOK: &str = "inject.eden.io";
/// The webhook called for pods without the annotation in a namespace labelled
/// `eden.io/inject=enabled`.
pub const NAMESPACE_WEBHOOK: &str = "namespace.inject.eden.io";
/// Both, as the chart installs them.
pub const WEBHOOKS: [&str; 2] = [POD_WEBHOOK, NAMESPACE_WEBHOOK];

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
    let excluded = LabelSelectorRequirement {
        key: "kubernetes.io/metadata.name".into(),
        operator: "NotIn".into(),
        values: Some(vec!["kube-system".to_string(), options.namespace.clone()]),
    };
    let labelled =
        LabelSelectorRequirement { key: INJECT.into(), operator: "In".into(), values: Some(vec![ENABLED.into()]) };
    // The API server asks only about pods that opted in: with `Fail` and no replica answering,
    // nobody else's pods are refused.
    let annotations = "has(object.metadata.annotations)";
    let asks = format!("{annotations} && '{INJECT}' in object.metadata.annotations");
    let pod_asks = format!("{asks} && object.metadata.annotations['{INJECT}'] != 'false'");
    let webhook = |name: &str, namespaces: Vec<LabelSelectorRequirement>, condition: &str, expression: String| {
        MutatingWebhook {
            name: name.into(),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                ca_bundle: Some(ByteString(ca_bundle.as_bytes().to_vec())),
                service: service.clone(),
                url: url.clone(),
            },
            rules: Some(vec![RuleWithOperations {
                operations: Some(vec!["CREATE".into()]),
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector { match_expressions: Some(namespaces), ..Default::default() }),
            match_conditions: Some(vec![MatchCondition { name: condition.into(), expression }]),
            failure_policy: Some(format!("{:?}", options.failure_policy)),
            // Events about skipped pods are its only side effect, and dry runs record none.
            side_effects: "NoneOnDryRun".into(),
            // Another webhook may add containers after this one; a second call is harmless.
            reinvocation_policy: Some("IfNeeded".into()),
            timeout_seconds: Some(5),
            ..Default::default()
        }
    };
    MutatingWebhookConfiguration {
        metadata: ObjectMeta { name: Some(NAME.into()), ..Default::default() },
        webhooks: Some(vec![
            webhook(POD_WEBHOOK, vec![excluded.clone()], "pod-asks", pod_asks),
            webhook(NAMESPACE_WEBHOOK, vec![labelled, excluded], "namespace-asks", format!("!({asks})")),
        ]),
    }
}

/// Makes the API server trust `ca_bundle` (PEM) for the webhook and returns the configuration as
/// it now has it. Through a Service (a cluster, the chart's configuration): a patch of every
/// webhook's `caBundle` alone, which fails with [`WebhookError::NotInstalled`] rather than
/// create a configuration no release owns. At a URL: the whole [`configuration`].
pub async fn write(
    client: &Client,
    options: &WebhookOptions,
    ca_bundle: &str,
) -> Result<MutatingWebhookConfiguration, WebhookError> {
    if let CallTarget::Url(_) = options.call {
        return apply(client, &configuration(options, ca_bundle)).await;
    }
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = ByteString(ca_bundle.as_bytes().to_vec());
    let webhooks: Vec<_> =
        WEBHOOKS.iter().map(|name| serde_json::json!({"name": name, "clientConfig": {"caBundle": bundle}})).collect();
    // A strategic merge patch merges the webhooks by name and, unlike an apply, never creates.
    let patch = Patch::Strategic(serde_json::json!({"webhooks": webhooks}));
    match api
        .patch(NAME, &PatchParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &patch)
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 404 => Err(WebhookError::NotInstalled),
        written => Ok(written?),
    }
}

/// Writes the configuration with server-side apply (every replica writes the same) and returns
/// it as the API server now has it.
async fn apply(
    client: &Client,
    configuration: &MutatingWebhookConfiguration,
) -> Result<MutatingWebhookConfiguration, WebhookError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(NAME, &params, &Patch::Apply(configuration)).await?)
}

/// Whether every webhook of `configuration` trusts the CA certificate `ca` (PEM).
pub fn trusts(configuration: &MutatingWebhookConfiguration, ca: &str) -> bool {
    let mut webhooks = configuration.webhooks.iter().flatten().peekable();
    webhooks.peek().is_some()
        && webhooks.all(|hook| {
            let bundle = hook.client_config.ca_bundle.as_ref();
            bundle.is_some_and(|bundle| String::from_utf8_lossy(&bundle.0).contains(ca.trim()))
        })
}
