//! Shared set-up for the operator's end-to-end tests: both controllers reconciling a fresh
//! namespace of a real API server, manifests for real redis-servers, and waits on what the
//! operator reports.

#![allow(dead_code)] // each test binary uses its own subset

use std::sync::Arc;
use std::time::Duration;

use eden_e2e::{ControlPlane, RedisServer};
use eden_operator::crd::{Migration, Phase};
use eden_operator::proxy::DEFAULT_IMAGE;
use eden_operator::{context::Context, endpoint, metrics::Metrics, migration};
use eden_sidecar::config::EdenConfig;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use redis::AsyncCommands;
use tokio::task::JoinHandle;
use tracing_subscriber::EnvFilter;

/// Every line the operator logged in this test process, for tests of what it says.
static OPERATOR_LOG: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

/// What the operator has logged so far in this test process (every test's harness).
pub fn operator_logs() -> String {
    String::from_utf8_lossy(&OPERATOR_LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())).into_owned()
}

/// The operator's log writer: each line kept in [`OPERATOR_LOG`] and shown with the output of a
/// failing test.
struct CapturedLog;

impl std::io::Write for CapturedLog {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        OPERATOR_LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).extend_from_slice(line);
        tracing_subscriber::fmt::TestWriter::new().write(line)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A namespace with both controllers reconciling it, as the operator's leader would.
pub struct Harness {
    pub control_plane: &'static ControlPlane,
    pub namespace: String,
    pub client: kube::Client,
    controllers: Vec<JoinHandle<()>>,
    pub metrics: Arc<Metrics>,
}

impl Harness {
    pub async fn start(prefix: &str) -> Harness {
        // The operator's log lines, shown with the output of a failing test (RUST_LOG overrides).
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| CapturedLog).try_init();
        let control_plane = ControlPlane::shared();
        control_plane.install_eden_crds().unwrap();
        let namespace = control_plane.namespace(prefix).await.unwrap();
        let client = control_plane.client().await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut harness = Harness { control_plane, namespace, client, controllers: Vec::new(), metrics };
        harness.start_operator();
        harness
    }

    /// Starts the controllers with a fresh context: a restarted operator knows only what the
    /// API server holds.
    pub fn start_operator(&mut self) {
        let ctx = Context::new(self.client.clone(), self.metrics.clone(), None, DEFAULT_IMAGE.into());
        self.controllers.push(tokio::spawn(endpoint::run(ctx.clone())));
        self.controllers.push(tokio::spawn(migration::run(ctx, Some(self.namespace.clone()))));
    }

    /// Stops the controllers; their replication runs stop with the context.
    pub async fn stop_operator(&mut self) {
        for controller in self.controllers.drain(..) {
            controller.abort();
            let _ = controller.await;
        }
    }

    pub fn apply(&self, manifest: &str) {
        self.control_plane.apply_manifest(&self.namespace, manifest).unwrap();
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        self.control_plane.run_kubectl(&all).unwrap()
    }

    pub fn migrations(&self) -> Api<Migration> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn config_maps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Polls the Migration until `done` holds; panics with its status otherwise.
    pub async fn wait(&self, name: &str, what: &str, done: impl Fn(&Migration) -> bool) -> Migration {
        for _ in 0..1200 {
            if let Some(migration) = self.migrations().get_opt(name).await.unwrap()
                && done(&migration)
            {
                return migration;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status = self.migrations().get(name).await.unwrap().status;
        panic!("Migration {name} never reached {what}: {status:#?}");
    }

    /// `eden_replication_lag_ms` of Migration `name`, if the operator exports one.
    pub fn lag_metric(&self, name: &str) -> Option<i64> {
        let series = format!("eden_replication_lag_ms{{namespace=\"{}\",migration=\"{name}\"}} ", self.namespace);
        let rendered = self.metrics.render();
        rendered.lines().find_map(|line| line.strip_prefix(series.as_str())).map(|value| value.parse().unwrap())
    }

    pub async fn wait_phase(&self, name: &str, phase: Phase) -> Migration {
        self.wait(name, &format!("{phase:?}"), |m| phase_of(m) == Some(phase)).await
    }

    pub async fn payload(&self, name: &str) -> EdenConfig {
        let config_map = self.config_maps().get(&format!("eden-{name}")).await.unwrap();
        EdenConfig::from_yaml(&config_map.data.unwrap()["eden.yaml"]).unwrap()
    }

    pub async fn wait_payload(&self, name: &str, done: impl Fn(&EdenConfig) -> bool) -> EdenConfig {
        for _ in 0..300 {
            if let Some(config_map) = self.config_maps().get_opt(&format!("eden-{name}")).await.unwrap() {
                let payload = EdenConfig::from_yaml(&config_map.data.unwrap()["eden.yaml"]).unwrap();
                if done(&payload) {
                    return payload;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("ConfigMap eden-{name} never reached the expected payload: {:?}", self.payload(name).await);
    }
}

pub fn phase_of(migration: &Migration) -> Option<Phase> {
    migration.status.as_ref().and_then(|s| s.phase)
}

pub fn condition<'a>(
    migration: &'a Migration,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let status = migration.status.as_ref().expect("status");
    status.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"))
}

pub fn endpoints(source: &RedisServer, target: &RedisServer) -> String {
    endpoints_at(&source.url(), &target.url())
}

/// Endpoints `source` and `target` at these URIs.
pub fn endpoints_at(source: &str, target: &str) -> String {
    format!(
        "apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: source}}\nspec: {{uri: \"{source}\"}}\n---\n\
         apiVersion: eden.io/v1alpha1\nkind: Endpoint\nmetadata: {{name: target}}\nspec: {{uri: \"{target}\"}}\n"
    )
}

pub fn migration(name: &str, data: &str, read_percentage: u32, policy: &str) -> String {
    format!(
        "apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {{name: {name}}}
spec:
  source: {{endpointRef: {{name: source}}}}
  target: {{endpointRef: {{name: target}}}}
  strategy:
    readPercentage: {read_percentage}
    writeMode: {{mode: dualWrite, policy: {policy}}}
  data: {{type: {data}}}
"
    )
}

pub async fn connect(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    // DEBUG POPULATE of many keys takes longer than the client's default response timeout.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)));
    let client = redis::Client::open(server.url()).unwrap();
    client.get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

/// Polls `server` until `key` holds `value`.
pub async fn wait_value(server: &mut redis::aio::MultiplexedConnection, key: &str, value: Option<&str>) {
    for _ in 0..100 {
        let found: Option<String> = server.get(key).await.unwrap();
        if found.as_deref() == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{key} never became {value:?}");
}
