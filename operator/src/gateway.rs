//! Gateway mode: eden-sidecar as a shared proxy behind a Service, for applications that cannot
//! take a sidecar (`spec.gateway`). They point their Redis address at the Service; the proxy pods
//! follow the migration's ConfigMap and acknowledge it with Leases exactly as injected sidecars
//! do, so the operator counts them among the live sidecars and the cutover waits for them.
//!
//! Pure builders of the Deployment and the Service; the Migration reconciler applies them with
//! server-side apply and deletes them when `spec.gateway` goes away or the Migration does.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ContainerPort, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::crd::{Gateway, Migration};
use crate::owned;
use crate::proxy::{self, NON_ROOT, Upstreams};

const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
const COMPONENT: &str = "gateway";

/// The Deployment's name: `eden-<migration>-gateway`.
pub fn deployment_name(migration: &Migration) -> String {
    format!("eden-{}-gateway", migration.name_any())
}

/// The Service's name: `spec.gateway.serviceName`, else `eden-<migration>`.
pub fn service_name(migration: &Migration, gateway: &Gateway) -> String {
    gateway.service_name.clone().unwrap_or_else(|| format!("eden-{}", migration.name_any()))
}

/// Selects the gateway's pods and nothing else of the migration.
fn selector(migration: &Migration) -> BTreeMap<String, String> {
    BTreeMap::from([
        (eden_sidecar::lease::LABEL_MIGRATION.to_string(), migration.name_any()),
        (COMPONENT_LABEL.to_string(), COMPONENT.to_string()),
    ])
}

fn labels(migration: &Migration) -> BTreeMap<String, String> {
    let mut labels = owned::labels(migration);
    labels.extend(selector(migration));
    labels
}

fn metadata(migration: &Migration, name: String) -> ObjectMeta {
    ObjectMeta { labels: Some(labels(migration)), ..owned::metadata(migration, name) }
}

/// The proxy Deployment. `default_image` is the operator's `--sidecar-image`.
pub fn deployment(migration: &Migration, gateway: &Gateway, upstreams: &Upstreams, default_image: &str) -> Deployment {
    let image = gateway.image.as_deref().unwrap_or(default_image);
    let (mut container, volumes) = proxy::container(migration, image, &format!("0.0.0.0:{}", gateway.port), upstreams);
    let redis = ContainerPort { name: Some("redis".into()), container_port: gateway.port, ..Default::default() };
    container.ports.get_or_insert_with(Vec::new).insert(0, redis);
    Deployment {
        metadata: metadata(migration, deployment_name(migration)),
        spec: Some(DeploymentSpec {
            replicas: Some(gateway.replicas),
            selector: LabelSelector { match_labels: Some(selector(migration)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(migration)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(NON_ROOT),
                        run_as_group: Some(NON_ROOT),
                        fs_group: Some(NON_ROOT),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service applications connect to.
pub fn service(migration: &Migration, gateway: &Gateway) -> Service {
    Service {
        metadata: metadata(migration, service_name(migration, gateway)),
        spec: Some(ServiceSpec {
            selector: Some(selector(migration)),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: gateway.port,
                target_port: Some(IntOrString::String("redis".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{EndpointSpec, MigrationSpec};
    use crate::migration::TARGET_CREDENTIALS_FILE;
    use crate::proxy::DEFAULT_IMAGE;

    fn migration(gateway: serde_json::Value) -> (Migration, Gateway) {
        let spec: MigrationSpec = serde_json::from_value(serde_json::json!({
            "source": {"endpointRef": {"name": "old"}},
            "target": {"endpointRef": {"name": "new"}},
            "gateway": gateway,
        }))
        .unwrap();
        let gateway = spec.gateway.clone().expect("a gateway");
        let mut migration = Migration::new("cache", spec);
        migration.metadata.namespace = Some("shop".into());
        migration.metadata.uid = Some("0000-1111".into());
        (migration, gateway)
    }

    fn endpoint(spec: serde_json::Value) -> EndpointSpec {
        serde_json::from_value(spec).unwrap()
    }

    fn plain() -> (EndpointSpec, EndpointSpec) {
        (
            endpoint(serde_json::json!({"uri": "redis://old:6379"})),
            endpoint(serde_json::json!({"uri": "redis://new:6379"})),
        )
    }

    fn pod(deployment: &Deployment) -> &PodSpec {
        deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn an_empty_gateway_gets_two_replicas_on_6379_behind_eden_migration() {
        let (migration, gateway) = migration(serde_json::json!({}));
        assert_eq!((gateway.replicas, gateway.port, gateway.image.as_deref()), (2, 6379, None));
        let (source, target) = plain();
        let deployment =
            deployment(&migration, &gateway, &Upstreams { source: &source, target: &target }, DEFAULT_IMAGE);
        assert_eq!(deployment.metadata.name.as_deref(), Some("eden-cache-gateway"));
        assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));
        let container = &pod(&deployment).containers[0];
        assert_eq!(container.image.as_deref(), Some(DEFAULT_IMAGE));
        assert_eq!(
            container.args.as_ref().unwrap().join(" "),
            "--listen 0.0.0.0:6379 --admin-listen 0.0.0.0:9090 --source redis://old:6379 --configmap eden-cache \
             --namespace shop --pod-name $(POD_NAME) --log-format json"
        );
        let pod_name = &container.env.as_ref().unwrap()[0];
        assert_eq!(pod_name.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "metadata.name");
        let service = service(&migration, &gateway);
        assert_eq!(service.metadata.name.as_deref(), Some("eden-cache"));
        assert_eq!(service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 6379);
    }

    #[test]
    fn the_service_selects_exactly_the_gateway_pods_and_both_are_owned_by_the_migration() {
        let (migration, gateway) = migration(serde_json::json!({"serviceName": "redis", "port": 6380, "replicas": 3}));
        let (source, target) = plain();
        let deployment =
            deployment(&migration, &gateway, &Upstreams { source: &source, target: &target }, DEFAULT_IMAGE);
        let service = service(&migration, &gateway);
        assert_eq!(service.metadata.name.as_deref(), Some("redis"));
        let pod_labels = deployment.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
        let selector = service.spec.as_ref().unwrap().selector.clone().unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{selector:?} ⊄ {pod_labels:?}");
        assert_eq!(deployment.spec.as_ref().unwrap().selector.match_labels.as_ref(), Some(&selector));
        assert_eq!(selector.get("app.kubernetes.io/component").map(String::as_str), Some("gateway"));
        for metadata in [&deployment.metadata, &service.metadata] {
            let labels = metadata.labels.as_ref().unwrap();
            assert_eq!(labels["app.kubernetes.io/managed-by"], "eden-operator");
            assert_eq!(labels["eden.io/migration"], "cache");
            let owner = &metadata.owner_references.as_ref().unwrap()[0];
            assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Migration", "cache"));
            assert_eq!(metadata.namespace.as_deref(), Some("shop"));
        }
        let ports = pod(&deployment).containers[0].ports.clone().unwrap();
        assert_eq!(ports[0].container_port, 6380);
    }

    #[test]
    fn the_proxy_runs_locked_down_with_probes_on_the_admin_port() {
        let (migration, gateway) = migration(serde_json::json!({"image": "registry.local/eden-sidecar:dev"}));
        let (source, target) = plain();
        let deployment =
            deployment(&migration, &gateway, &Upstreams { source: &source, target: &target }, DEFAULT_IMAGE);
        let pod = pod(&deployment);
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("registry.local/eden-sidecar:dev"), "spec.gateway.image wins");
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(
            (security.read_only_root_filesystem, security.allow_privilege_escalation),
            (Some(true), Some(false))
        );
        assert_eq!(security.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_string()]));
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        let requests = container.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("50m", "64Mi"));
        for (probe, path) in [(&container.readiness_probe, "/readyz"), (&container.liveness_probe, "/healthz")] {
            let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
            assert_eq!((get.path.as_deref(), &get.port), (Some(path), &IntOrString::String("eden-admin".into())));
        }
        assert!(pod.volumes.is_none() && container.volume_mounts.is_none(), "no Secret to mount");
    }

    #[test]
    fn the_target_secret_is_mounted_where_the_payload_points() {
        let (migration, gateway) = migration(serde_json::json!({}));
        let (source, _) = plain();
        let target = endpoint(
            serde_json::json!({"uri": "redis://new:6379", "credentialsSecretRef": {"name": "target-redis-credentials"}}),
        );
        let deployment =
            deployment(&migration, &gateway, &Upstreams { source: &source, target: &target }, DEFAULT_IMAGE);
        let pod = pod(&deployment);
        let volume = &pod.volumes.as_ref().unwrap()[0];
        assert_eq!(volume.secret.as_ref().unwrap().secret_name.as_deref(), Some("target-redis-credentials"));
        let mount = &pod.containers[0].volume_mounts.as_ref().unwrap()[0];
        assert_eq!((mount.name.as_str(), mount.read_only), (volume.name.as_str(), Some(true)));
        assert_eq!(format!("{}/password", mount.mount_path), TARGET_CREDENTIALS_FILE);
    }

    /// Each server's own TLS reaches the proxy: its server name and its CA (mounted from its own
    /// Secret, the key `ca.crt` only) as flags of that server; verification skipped only where
    /// that Endpoint says so.
    #[test]
    fn each_servers_tls_settings_reach_the_proxy_as_its_own_flags_and_mounts() {
        let (migration, gateway) = migration(serde_json::json!({}));
        let source = endpoint(serde_json::json!({
            "uri": "rediss://10.0.0.5:6380",
            "tls": {"caSecretRef": {"name": "source-ca"}, "serverName": "old.redis.test"},
        }));
        let target = endpoint(serde_json::json!({
            "uri": "rediss://new:6380",
            "credentialsSecretRef": {"name": "target-redis-credentials"},
            "tls": {"caSecretRef": {"name": "target-ca"}, "insecureSkipVerify": true},
        }));
        let deployment =
            deployment(&migration, &gateway, &Upstreams { source: &source, target: &target }, DEFAULT_IMAGE);
        let pod = pod(&deployment);
        let args = pod.containers[0].args.as_ref().unwrap().join(" ");
        assert!(
            args.ends_with(
                "--source-server-name old.redis.test --source-ca-file /var/run/eden/ca/source/ca.crt \
                 --target-insecure-skip-verify --target-ca-file /var/run/eden/ca/target/ca.crt"
            ),
            "{args}"
        );
        let volumes: Vec<_> = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .map(|v| {
                let secret = v.secret.as_ref().unwrap();
                let items = secret.items.as_ref().map(|items| items.iter().map(|i| i.key.clone()).collect::<Vec<_>>());
                (v.name.as_str(), secret.secret_name.as_deref().unwrap(), items)
            })
            .collect();
        let ca = Some(vec!["ca.crt".to_string()]);
        assert_eq!(
            volumes,
            [
                ("eden-target-credentials", "target-redis-credentials", None),
                ("eden-source-ca", "source-ca", ca.clone()),
                ("eden-target-ca", "target-ca", ca),
            ]
        );
        let mounts: Vec<_> = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
            .collect();
        assert_eq!(
            mounts[1..],
            [
                ("eden-source-ca", "/var/run/eden/ca/source", Some(true)),
                ("eden-target-ca", "/var/run/eden/ca/target", Some(true)),
            ]
        );
    }
}
