//! The HTTPS endpoint the API server calls with each pod it is about to create, and the
//! [`Injector`] that answers: it reads the Migration the pod names and its Endpoints, and
//! returns the patch [`inject`](super::inject) makes.
//!
//! Every pod is admitted. A pod that asked for a sidecar and cannot have one (a Migration or
//! Endpoint missing, the API unreachable) is admitted without it, with the reason in its
//! `eden.io/skipped` annotation and, when the Migration exists, a Warning Event on it. Refusing
//! the pod instead would stop a Deployment from scaling over a typo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use json_patch::Patch;
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tracing::{info, warn};

use super::WebhookError;
use super::inject::{self, Decision};
use crate::crd::{Endpoint, EndpointSpec, Migration};
use crate::metrics::Metrics;
use crate::proxy::{self, Upstreams};

/// The path the webhook configuration points at.
pub const PATH: &str = "/mutate-pods";
/// An AdmissionReview of a pod is a few KiB; the API server's own limit is 3 MiB.
const MAX_BODY: usize = 4 << 20;
/// Where the injected sidecar listens: the address the application used for Redis.
const SIDECAR_LISTEN: &str = "127.0.0.1:6379";
/// What the sidecar's ServiceAccount must be allowed in its namespace (charts/eden/rbac/
/// sidecar-rules.yaml): follow its ConfigMap, acknowledge in its Lease.
const SIDECAR_NEEDS: [(&str, &str, &str); 2] =
    [("watch", "", "configmaps"), ("patch", "coordination.k8s.io", "leases")];

/// A Migration a pod asked for, with what its sidecar needs from the Migration's Endpoints.
struct Resolved {
    migration: Migration,
    source: EndpointSpec,
    target: EndpointSpec,
}

/// Answers admission reviews of pods.
pub struct Injector {
    client: Client,
    image: String,
    native: bool,
    recorder: Recorder,
    metrics: Arc<Metrics>,
}

impl Injector {
    /// `native`: whether the cluster runs native sidecars (Kubernetes ≥ 1.29).
    pub fn new(client: Client, image: String, native: bool, instance: Option<String>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter { controller: "eden-operator-webhook".into(), instance };
        Injector { recorder: Recorder::new(client.clone(), reporter), client, image, native, metrics }
    }

    /// Asks the API server its version, for [`Injector::new`]'s `native`.
    pub async fn native_sidecars(client: &Client) -> Result<bool, WebhookError> {
        let version = client.apiserver_version().await?;
        let number = |text: &str| text.trim_end_matches('+').parse::<u32>().unwrap_or(0);
        Ok((number(&version.major), number(&version.minor)) >= (1, 29))
    }

    /// The answer to one AdmissionReview body.
    pub async fn review(&self, body: &[u8]) -> AdmissionReview<DynamicObject> {
        let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
            Ok(review) => review,
            Err(err) => return AdmissionResponse::invalid(format!("unreadable AdmissionReview: {err}")).into_review(),
        };
        let request: AdmissionRequest<Pod> = match review.try_into() {
            Ok(request) => request,
            Err(err) => {
                return AdmissionResponse::invalid(format!("AdmissionReview without a request: {err}")).into_review();
            }
        };
        let response = AdmissionResponse::from(&request);
        let (Some(pod), Some(namespace)) = (&request.object, request.namespace.as_deref()) else {
            return response.into_review();
        };
        let name = pod.metadata.name.as_deref().or(pod.metadata.generate_name.as_deref()).unwrap_or_default();
        let namespace_metadata = self.namespace_metadata(namespace, pod).await;
        let patch = match inject::decide(pod, &inject::Namespace::from_metadata(namespace, &namespace_metadata)) {
            Decision::Leave => {
                self.metrics.admitted("untouched");
                return response.into_review();
            }
            Decision::Skip(reason) => {
                self.skipped(namespace, pod, name, &reason, request.dry_run).await;
                inject::skip(pod, &reason)
            }
            Decision::Inject { migration } => self.inject(namespace, pod, name, &migration, request.dry_run).await,
        };
        match response.clone().with_patch(patch) {
            Ok(patched) => patched.into_review(),
            Err(err) => {
                warn!(namespace, pod = name, %err, "could not encode the patch; admitting the pod unchanged");
                response.into_review()
            }
        }
    }

    /// The labels and annotations of the pod's namespace, when the pod leaves something to them
    /// (whether to inject, or which Migration); empty otherwise, or when they cannot be read.
    async fn namespace_metadata(&self, namespace: &str, pod: &Pod) -> ObjectMeta {
        let names_migration = pod.metadata.annotations.as_ref().is_some_and(|all| all.contains_key(inject::MIGRATION));
        if !inject::asks_namespace(pod) && names_migration {
            return ObjectMeta::default();
        }
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        match namespaces.get_metadata(namespace).await {
            Ok(found) => found.metadata,
            Err(err) => {
                warn!(namespace, %err, "cannot read the namespace's injection label; going by the pod alone");
                ObjectMeta::default()
            }
        }
    }

    /// The patch that adds `migration`'s sidecar to the pod, or that records why it cannot.
    async fn inject(&self, namespace: &str, pod: &Pod, name: &str, migration: &str, dry_run: bool) -> Patch {
        let resolved = match self.resolve(namespace, migration).await {
            Ok(resolved) => resolved,
            Err(reason) => {
                self.skipped(namespace, pod, name, &reason, dry_run).await;
                return inject::skip(pod, &reason);
            }
        };
        let upstreams = Upstreams { source: &resolved.source, target: &resolved.target };
        let (container, volumes) = proxy::container(&resolved.migration, &self.image, SIDECAR_LISTEN, &upstreams);
        info!(namespace, pod = name, migration, native = self.native, "injecting the sidecar");
        self.metrics.admitted("injected");
        if let Some(problem) = self.sidecar_access(namespace, pod).await {
            warn!(namespace, pod = name, problem, "the injected sidecar will not get its strategy");
            if !dry_run {
                self.event(&resolved.migration, "SidecarLacksAccess", format!("pod {name}: {problem}")).await;
            }
        }
        inject::injection(pod, container, volumes, self.native)
    }

    /// The Migration and what its sidecar needs; or why there is none to inject.
    async fn resolve(&self, namespace: &str, name: &str) -> Result<Resolved, String> {
        let migrations: Api<Migration> = Api::namespaced(self.client.clone(), namespace);
        let endpoints: Api<Endpoint> = Api::namespaced(self.client.clone(), namespace);
        let migration = match migrations.get_opt(name).await {
            Ok(Some(migration)) => migration,
            Ok(None) => return Err(format!("Migration {name} not found in namespace {namespace}")),
            Err(err) => return Err(format!("reading Migration {name}: {err}")),
        };
        let endpoint = async |role: &str, endpoint: &str| match endpoints.get_opt(endpoint).await {
            Ok(Some(endpoint)) => Ok(endpoint),
            Ok(None) => Err(format!("the {role} Endpoint {endpoint} of Migration {name} not found")),
            Err(err) => Err(format!("reading the {role} Endpoint {endpoint}: {err}")),
        };
        let source = endpoint("source", &migration.spec.source.endpoint_ref.name).await?;
        let target = endpoint("target", &migration.spec.target.endpoint_ref.name).await?;
        Ok(Resolved { migration, source: source.spec, target: target.spec })
    }

    /// Logs why a pod that asked for a sidecar gets none, and puts a Warning Event on the
    /// Migration it named, when there is one to put it on and this is not a dry run.
    async fn skipped(&self, namespace: &str, pod: &Pod, name: &str, reason: &str, dry_run: bool) {
        warn!(namespace, pod = name, reason, dry_run, "not injecting the sidecar");
        self.metrics.admitted("skipped");
        if dry_run {
            return;
        }
        let Some(migration) = pod.metadata.annotations.as_ref().and_then(|a| a.get(inject::MIGRATION)) else {
            return;
        };
        let migrations: Api<Migration> = Api::namespaced(self.client.clone(), namespace);
        let Ok(Some(migration)) = migrations.get_opt(migration).await else { return };
        self.event(&migration, "SidecarSkipped", format!("pod {name}: {reason}")).await;
    }

    /// Whether the pod's ServiceAccount may do what its sidecar must: watch the ConfigMap and
    /// write its Lease. Without that the sidecar never gets a strategy, and as a native sidecar
    /// it holds the application's start; the chart grants it in `sidecarNamespaces`. The
    /// problem, if there is one; nothing when the API cannot say.
    async fn sidecar_access(&self, namespace: &str, pod: &Pod) -> Option<String> {
        let account = pod.spec.as_ref().and_then(|spec| spec.service_account_name.as_deref()).unwrap_or("default");
        let user = format!("system:serviceaccount:{namespace}:{account}");
        let groups = vec!["system:serviceaccounts".to_string(), format!("system:serviceaccounts:{namespace}")];
        let reviews: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let mut missing = Vec::new();
        for (verb, group, resource) in SIDECAR_NEEDS {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(user.clone()),
                    groups: Some(groups.clone()),
                    resource_attributes: Some(ResourceAttributes {
                        namespace: Some(namespace.into()),
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            match reviews.create(&PostParams::default(), &review).await {
                Ok(answer) if answer.status.as_ref().is_some_and(|status| status.allowed) => {}
                Ok(_) => missing.push(format!("{verb} {resource}")),
                Err(err) => {
                    warn!(namespace, %err, "cannot check the sidecar's permissions");
                    return None;
                }
            }
        }
        (!missing.is_empty()).then(|| {
            format!(
                "ServiceAccount {account} may not {}, so its eden-sidecar cannot follow the Migration; \
                 add {namespace} to the chart's sidecarNamespaces",
                missing.join(" or ")
            )
        })
    }

    /// Puts a Warning Event on the Migration; a failure to record is only logged.
    async fn event(&self, migration: &Migration, reason: &str, note: String) {
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "InjectSidecar".into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &migration.object_ref(&())).await {
            warn!(reason, %err, "could not record the Event");
        }
    }
}

/// Serves [`PATH`] over TLS until the listener fails.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, injector: Arc<Injector>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(%err, "webhook listener: accept failed");
                continue;
            }
        };
        let (acceptor, injector) = (acceptor.clone(), injector.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(stream).await {
                Ok(stream) => stream,
                Err(err) => {
                    warn!(%peer, %err, "webhook TLS handshake failed");
                    return;
                }
            };
            let service = service_fn(move |request| answer(injector.clone(), request));
            if let Err(err) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                warn!(%peer, %err, "webhook connection ended with an error");
            }
        });
    }
}

async fn answer(injector: Arc<Injector>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST || request.uri().path() != PATH {
        return Ok(reply(StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")));
    }
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return Ok(reply(StatusCode::BAD_REQUEST, Bytes::from(format!("unreadable body: {err}\n")))),
    };
    let review = injector.review(&body).await;
    match serde_json::to_vec(&review) {
        Ok(json) => Ok(reply(StatusCode::OK, Bytes::from(json))),
        Err(err) => Ok(reply(StatusCode::INTERNAL_SERVER_ERROR, Bytes::from(format!("{err}\n")))),
    }
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
}

/// Binds the webhook's listener.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, WebhookError> {
    TcpListener::bind(address).await.map_err(|err| WebhookError::Listen { address, source: err })
}
