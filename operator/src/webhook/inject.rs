//! What the webhook does with one pod, as pure functions: the decision, and the JSON patch that
//! carries it out.
//!
//! The patch adds to the pod and never rewrites what is there: the API server applies it to the
//! pod as it received it, fields this operator's Kubernetes types do not know included.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use crate::proxy::CONTAINER_NAME;

/// Pod annotation: `"true"` asks for a sidecar, `"false"` refuses one, whatever the namespace
/// says. Namespace label: `enabled` asks for every pod of the namespace without the annotation.
pub const INJECT: &str = "eden.io/inject";
/// The namespace label's value that opts its pods in.
pub const ENABLED: &str = "enabled";
/// Pod annotation, else namespace annotation: the Migration, in the pod's namespace, whose
/// sidecar it gets.
pub const MIGRATION: &str = "eden.io/migration";
/// Pod annotation the webhook sets on a pod that asked for a sidecar and did not get one: why.
pub const SKIPPED: &str = "eden.io/skipped";

/// Namespaces whose pods never get a sidecar, whatever they ask.
const SYSTEM_NAMESPACES: [&str; 1] = ["kube-system"];

/// What becomes of a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not opted in, or it has its sidecar already (the webhook may be called twice): admitted
    /// as it is.
    Leave,
    /// Opted in, but no sidecar can go in: admitted with the reason in [`SKIPPED`].
    Skip(String),
    /// Opted in, for this Migration.
    Inject { migration: String },
}

/// What the pod's namespace says about injection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Namespace<'a> {
    pub name: &'a str,
    /// Labelled `eden.io/inject: enabled`.
    pub enabled: bool,
    /// Its `eden.io/migration` annotation.
    pub migration: Option<&'a str>,
}

impl<'a> Namespace<'a> {
    /// From the namespace's labels and annotations.
    pub fn from_metadata(name: &'a str, metadata: &'a ObjectMeta) -> Self {
        let enabled = metadata.labels.as_ref().and_then(|labels| labels.get(INJECT)).is_some_and(|v| v == ENABLED);
        let migration = metadata.annotations.as_ref().and_then(|annotations| annotations.get(MIGRATION));
        Namespace { name, enabled, migration: migration.map(String::as_str) }
    }
}

/// Whether the pod's own annotation leaves the decision to its namespace.
pub fn asks_namespace(pod: &Pod) -> bool {
    pod.metadata.annotations.as_ref().is_none_or(|all| !all.contains_key(INJECT))
}

/// Decides from the pod and its namespace; whether the Migration exists is the caller's to find
/// out. The pod's own annotation wins over its namespace's label, so a pod can opt out of an
/// opted-in namespace.
pub fn decide(pod: &Pod, namespace: &Namespace) -> Decision {
    let annotation = |name: &str| pod.metadata.annotations.as_ref().and_then(|all| all.get(name));
    match annotation(INJECT).map(String::as_str) {
        None if namespace.enabled => {}
        None | Some("false") => return Decision::Leave,
        Some("true") => {}
        Some(other) => return Decision::Skip(format!("{INJECT} must be \"true\" or \"false\", not {other:?}")),
    }
    if has_sidecar(pod) {
        return Decision::Leave;
    }
    if SYSTEM_NAMESPACES.contains(&namespace.name) {
        return Decision::Skip(format!("pods in {} never get a sidecar", namespace.name));
    }
    if pod.spec.as_ref().and_then(|spec| spec.host_network) == Some(true) {
        return Decision::Skip(
            "a hostNetwork pod shares its node's network, where the sidecar's localhost port would be the node's"
                .into(),
        );
    }
    match annotation(MIGRATION).map(String::as_str).or(namespace.migration).filter(|name| !name.is_empty()) {
        Some(name) => Decision::Inject { migration: name.to_string() },
        None => Decision::Skip(format!(
            "asked for a sidecar, but neither the pod nor its namespace names a Migration ({MIGRATION})"
        )),
    }
}

fn has_sidecar(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    spec.containers.iter().chain(spec.init_containers.iter().flatten()).any(|c| c.name == CONTAINER_NAME)
}

/// Adds the sidecar. `native`: as the first init container with `restartPolicy: Always`
/// (Kubernetes ≥ 1.29), so it starts before the application's init containers and containers
/// and stops after them; otherwise as the last container, which starts alongside the
/// application. `volumes` are the ones the container mounts.
pub fn injection(pod: &Pod, mut sidecar: Container, volumes: Vec<Volume>, native: bool) -> Patch {
    let spec = pod.spec.as_ref();
    let mut operations = Vec::new();
    if native {
        sidecar.restart_policy = Some("Always".into());
        let present = spec.is_some_and(|spec| spec.init_containers.is_some());
        operations.push(add_to_list("initContainers", present, "0", to_value(&sidecar)));
    } else {
        operations.push(add_to_list("containers", spec.is_some(), "-", to_value(&sidecar)));
    }
    let mut present = spec.is_some_and(|spec| spec.volumes.is_some());
    for volume in volumes {
        operations.push(add_to_list("volumes", present, "-", to_value(&volume)));
        present = true;
    }
    Patch(operations)
}

/// Records why a pod that asked for a sidecar did not get one.
pub fn skip(pod: &Pod, reason: &str) -> Patch {
    let operation = match pod.metadata.annotations {
        Some(_) => add(PointerBuf::from_tokens(["metadata", "annotations", SKIPPED]), Value::from(reason)),
        None => add(PointerBuf::from_tokens(["metadata", "annotations"]), serde_json::json!({ SKIPPED: reason })),
    };
    Patch(vec![operation])
}

/// Inserts `value` at `index` of `/spec/<list>` (`-`: at the end), or creates the list.
fn add_to_list(list: &str, present: bool, index: &str, value: Value) -> PatchOperation {
    if present {
        add(PointerBuf::from_tokens(["spec", list, index]), value)
    } else {
        add(PointerBuf::from_tokens(["spec", list]), Value::Array(vec![value]))
    }
}

fn add(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path, value })
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or_else(|err| unreachable!("Kubernetes types serialize: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(annotations: serde_json::Value, spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app", "annotations": annotations},
            "spec": spec,
        }))
        .unwrap()
    }

    fn app() -> serde_json::Value {
        serde_json::json!({"containers": [{"name": "app", "image": "app:1"}]})
    }

    fn opted_in() -> serde_json::Value {
        serde_json::json!({INJECT: "true", MIGRATION: "cache"})
    }

    fn patched(pod: &Pod, patch: &Patch) -> Pod {
        let mut value = serde_json::to_value(pod).unwrap();
        json_patch::patch(&mut value, patch).unwrap();
        serde_json::from_value(value).unwrap()
    }

    fn sidecar() -> Container {
        Container { name: CONTAINER_NAME.into(), image: Some("eden-sidecar:dev".into()), ..Default::default() }
    }

    const SHOP: Namespace = Namespace { name: "shop", enabled: false, migration: None };

    #[test]
    fn only_pods_that_ask_with_a_migration_get_a_sidecar() {
        let inject = Decision::Inject { migration: "cache".into() };
        assert_eq!(decide(&pod(opted_in(), app()), &SHOP), inject);
        assert_eq!(decide(&pod(serde_json::json!({}), app()), &SHOP), Decision::Leave);
        assert_eq!(
            decide(&pod(serde_json::json!({INJECT: "false", MIGRATION: "cache"}), app()), &SHOP),
            Decision::Leave
        );
        let Decision::Skip(reason) = decide(&pod(serde_json::json!({INJECT: "true"}), app()), &SHOP) else {
            panic!("no Migration named")
        };
        assert!(reason.contains(MIGRATION), "{reason}");
        let Decision::Skip(reason) = decide(&pod(serde_json::json!({INJECT: "yes", MIGRATION: "cache"}), app()), &SHOP)
        else {
            panic!("not a boolean")
        };
        assert!(reason.contains("\"yes\""), "{reason}");
    }

    #[test]
    fn an_opted_in_namespace_asks_for_its_pods_and_a_pod_may_refuse_or_name_another_migration() {
        let metadata: ObjectMeta = serde_json::from_value(serde_json::json!({
            "labels": {INJECT: ENABLED},
            "annotations": {MIGRATION: "cache"},
        }))
        .unwrap();
        let shop = Namespace::from_metadata("shop", &metadata);
        let inject = |name: &str| Decision::Inject { migration: name.into() };
        let unannotated = pod(serde_json::json!({}), app());
        assert!(asks_namespace(&unannotated));
        assert_eq!(decide(&unannotated, &shop), inject("cache"));
        let refuses = pod(serde_json::json!({INJECT: "false"}), app());
        assert!(!asks_namespace(&refuses));
        assert_eq!(decide(&refuses, &shop), Decision::Leave, "the pod's opt-out wins");
        assert_eq!(decide(&pod(serde_json::json!({MIGRATION: "sessions"}), app()), &shop), inject("sessions"));
        let unnamed = Namespace { migration: None, ..shop };
        assert!(matches!(decide(&unannotated, &unnamed), Decision::Skip(r) if r.contains(MIGRATION)));
        let otherwise: ObjectMeta = serde_json::from_value(serde_json::json!({"labels": {INJECT: "true"}})).unwrap();
        assert!(!Namespace::from_metadata("shop", &otherwise).enabled, "only `enabled` opts a namespace in");
    }

    #[test]
    fn system_and_host_network_pods_are_skipped_with_the_reason() {
        assert!(
            matches!(decide(&pod(opted_in(), app()), &Namespace { name: "kube-system", ..SHOP }), Decision::Skip(r) if r.contains("kube-system"))
        );
        let host = serde_json::json!({"hostNetwork": true, "containers": [{"name": "app"}]});
        assert!(matches!(decide(&pod(opted_in(), host), &SHOP), Decision::Skip(r) if r.contains("hostNetwork")));
    }

    #[test]
    fn a_pod_with_its_sidecar_already_is_left_alone() {
        let pod = pod(opted_in(), app());
        let once = patched(&pod, &injection(&pod, sidecar(), Vec::new(), true));
        assert_eq!(decide(&once, &SHOP), Decision::Leave);
        let once = patched(&pod, &injection(&pod, sidecar(), Vec::new(), false));
        assert_eq!(decide(&once, &SHOP), Decision::Leave);
    }

    #[test]
    fn a_native_sidecar_goes_first_among_the_init_containers_and_the_rest_is_kept() {
        let spec = serde_json::json!({
            "initContainers": [{"name": "migrate-schema", "image": "app:1"}],
            "containers": [{"name": "app", "image": "app:1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        });
        let pod = pod(opted_in(), spec);
        let volume = Volume { name: "eden-target-credentials".into(), ..Default::default() };
        let after = patched(&pod, &injection(&pod, sidecar(), vec![volume], true));
        let spec: &PodSpec = after.spec.as_ref().unwrap();
        let init: Vec<_> = spec.init_containers.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(init, [CONTAINER_NAME, "migrate-schema"]);
        assert_eq!(spec.init_containers.as_ref().unwrap()[0].restart_policy.as_deref(), Some("Always"));
        assert_eq!(spec.containers.len(), 1);
        let volumes: Vec<_> = spec.volumes.as_ref().unwrap().iter().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, ["data", "eden-target-credentials"]);
    }

    #[test]
    fn before_native_sidecars_it_is_the_last_container_and_lists_are_created_when_absent() {
        let pod = pod(opted_in(), app());
        let volume = Volume { name: "eden-target-credentials".into(), ..Default::default() };
        let after = patched(&pod, &injection(&pod, sidecar(), vec![volume], false));
        let spec = after.spec.as_ref().unwrap();
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", CONTAINER_NAME]);
        assert_eq!(spec.containers[1].restart_policy, None);
        assert!(spec.init_containers.is_none());
        assert_eq!(spec.volumes.as_ref().unwrap().len(), 1);
        let native = patched(&pod, &injection(&pod, sidecar(), Vec::new(), true));
        assert_eq!(native.spec.as_ref().unwrap().init_containers.as_ref().unwrap()[0].name, CONTAINER_NAME);
    }

    #[test]
    fn a_skip_adds_its_reason_next_to_the_other_annotations() {
        let pod = pod(opted_in(), app());
        let after = patched(&pod, &skip(&pod, "why not"));
        let annotations = after.metadata.annotations.unwrap();
        assert_eq!((annotations[SKIPPED].as_str(), annotations[INJECT].as_str()), ("why not", "true"));
        let bare = Pod { metadata: Default::default(), ..pod };
        let after = patched(&bare, &skip(&bare, "why not"));
        assert_eq!(after.metadata.annotations.unwrap()[SKIPPED], "why not");
    }
}
