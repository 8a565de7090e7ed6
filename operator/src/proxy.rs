//! The eden-sidecar container, as gateway pods run it and the injection webhook adds it to
//! application pods: the same arguments, probes, requests and lock-down either way.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::configmap;
use crate::crd::{EndpointSpec, Migration};
use crate::migration::TARGET_CREDENTIALS_DIR;

/// The image when neither the Migration nor the operator's `--sidecar-image` says otherwise:
/// the sidecar released with this operator.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/eden/eden-sidecar:", env!("CARGO_PKG_VERSION"));
/// The container's name, which also tells the webhook a pod has its sidecar already.
pub const CONTAINER_NAME: &str = "eden-sidecar";
/// The sidecar's admin port (health and metrics); never the Redis port.
pub const ADMIN_PORT: i32 = 9090;
/// Prefixed, as port names must be unique across an application pod's containers.
const ADMIN_PORT_NAME: &str = "eden-admin";
/// A numeric non-root user, so `runAsNonRoot` holds whatever user the image declares.
pub const NON_ROOT: i64 = 65532;
const CREDENTIALS_VOLUME: &str = "eden-target-credentials";
/// Where each server's CA Secret (`tls.caSecretRef`, key `ca.crt`) is mounted.
const CA_DIR: &str = "/var/run/eden/ca";

/// What the proxy needs from outside the Migration: the two Endpoints.
pub struct Upstreams<'a> {
    /// The source: its URI (no secret in it: clients' AUTH goes through to the source) and its
    /// TLS settings.
    pub source: &'a EndpointSpec,
    /// The target: its TLS settings, and its credentials Secret, mounted where the payload's
    /// `credentials_file` points (the payload names its URI).
    pub target: &'a EndpointSpec,
}

/// The container serving RESP on `listen`, following `migration`'s ConfigMap and acknowledging
/// it in a Lease named after its pod, and the volumes it mounts, which the pod must carry: the
/// target's credentials Secret and each server's CA Secret. Each server's TLS settings become
/// flags of their own (`--source-server-name`, `--target-ca-file`...): a name and a path, never
/// a secret, on the command line.
pub fn container(migration: &Migration, image: &str, listen: &str, upstreams: &Upstreams) -> (Container, Vec<Volume>) {
    let namespace = migration.namespace().unwrap_or_default();
    let mut args: Vec<String> = [
        "--listen",
        listen,
        "--admin-listen",
        &format!("0.0.0.0:{ADMIN_PORT}"),
        "--source",
        &upstreams.source.uri,
        "--configmap",
        &configmap::name(migration),
        "--namespace",
        &namespace,
        "--pod-name",
        "$(POD_NAME)",
        "--log-format",
        "json",
    ]
    .map(String::from)
    .to_vec();
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    let mut mount = |volume: Volume, path: String| {
        mounts.push(VolumeMount {
            name: volume.name.clone(),
            mount_path: path,
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(volume);
    };
    if let Some(secret) = &upstreams.target.credentials_secret_ref {
        mount(secret_volume(CREDENTIALS_VOLUME, &secret.name, None), TARGET_CREDENTIALS_DIR.into());
    }
    for (role, endpoint) in [("source", upstreams.source), ("target", upstreams.target)] {
        let Some(tls) = &endpoint.tls else { continue };
        if let Some(name) = &tls.server_name {
            args.extend([format!("--{role}-server-name"), name.clone()]);
        }
        if tls.insecure_skip_verify {
            args.push(format!("--{role}-insecure-skip-verify"));
        }
        if let Some(secret) = &tls.ca_secret_ref {
            let dir = format!("{CA_DIR}/{role}");
            args.extend([format!("--{role}-ca-file"), format!("{dir}/ca.crt")]);
            mount(secret_volume(&format!("eden-{role}-ca"), &secret.name, Some("ca.crt")), dir);
        }
    }
    let probe = |path: &str, period_seconds: i32, failure_threshold: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(ADMIN_PORT_NAME.into()),
            ..Default::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        ..Default::default()
    };
    let container = Container {
        name: CONTAINER_NAME.into(),
        image: Some(image.into()),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some(ADMIN_PORT_NAME.into()),
            container_port: ADMIN_PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 5, 3)),
        // The sidecar is ready once it has applied its Migration's strategy. As a native
        // sidecar, it counts as started only then, so the application's containers start after
        // it listens and never send a command before Eden knows where it goes; ten minutes
        // without a strategy restarts it.
        startup_probe: Some(probe("/readyz", 1, 600)),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
            ..Default::default()
        }),
        // Set on the container, not the pod: in an application pod the pod's settings are the
        // application's.
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            run_as_non_root: Some(true),
            run_as_user: Some(NON_ROOT),
            run_as_group: Some(NON_ROOT),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        ..Default::default()
    };
    (container, volumes)
}

/// A volume of Secret `secret` (only its key `only`, when given).
fn secret_volume(name: &str, secret: &str, only: Option<&str>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            items: only.map(|key| vec![KeyToPath { key: key.into(), path: key.into(), ..Default::default() }]),
            // Only this container mounts it, and it runs as its own user, whatever the pod's
            // fsGroup.
            default_mode: Some(0o444),
            ..Default::default()
        }),
        ..Default::default()
    }
}
