//! `make demo-node`: Eden as users run it, on a real node (`eden_e2e::Node`), for watching real
//! pods: this build's images installed with `helm install`, two Redis pods, and a Migration
//! taken through copy, read canary, cutover and complete while two application pods write
//! through their injected sidecars; then every write they saw acknowledged is checked on the
//! target. Needs root (the node changes the network and cgroups).
//!
//! Each step prints what it did; a failure stops the walkthrough with a non-zero exit and says
//! which step failed. At the end the node stays up until Enter (when run from a terminal), then
//! is torn down.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use eden_e2e::shop::{self, INJECT};
use eden_e2e::{Helm, Node, eventually};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The application's pods.
const APPS: [&str; 2] = ["app-0", "app-1"];
/// Lists on the source before the copy (about 1 s to copy at its pace).
const PRELOADED: u64 = 2_000;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let started = Instant::now();
    match walkthrough().await {
        Ok(()) => println!("\nwalkthrough finished in {:.1}s: every step passed", started.elapsed().as_secs_f64()),
        Err(err) => {
            eprintln!("\nwalkthrough failed: {err}");
            std::process::exit(1);
        }
    }
}

async fn walkthrough() -> Result<()> {
    step("Bringing up the node (containerd, kubelet, kube-proxy, CoreDNS) and packing this build's images");
    let out = tempfile::Builder::new().prefix("eden-demo-node-images-").tempdir()?;
    let packing = std::thread::spawn({
        let out = out.path().to_path_buf();
        move || shop::pack_images(&out)
    });
    let node = Node::shared();
    for archive in packing.join().map_err(|_| "packing the images panicked")?? {
        node.import_image(&archive)?;
    }
    done("node Ready; eden-operator, eden-sidecar and the application's eden-writer imported into containerd");
    println!("  watch the pods:  KUBECONFIG={} kubectl get pods,migrations -A -w", node.kubeconfig().display());

    step("helm install eden: the operator (two pods, one leading) and its injection webhook");
    let system = node.restricted_namespace("eden-system").await?;
    let apps = node.restricted_namespace("shop").await?;
    let helm = Helm::find()?;
    helm.install_eden(node.kubeconfig(), &system, &[&format!("sidecarNamespaces={{{apps}}}")])?;
    node.run_kubectl(&["-n", &system, "rollout", "status", "deployment/eden-operator", "--timeout=180s"])?;
    done(&format!("release eden in namespace {system}; sidecars allowed in {apps}"));

    step("Two Redis pods (source with data, empty target), Endpoints, Migration `cache` with a gateway");
    shop::start_redis_servers(node, &apps, PRELOADED)?;
    node.apply_manifest(&apps, &shop::endpoints_and_migration(&apps))?;
    done(&format!("{PRELOADED} lists on the source; the operator probes both servers and copies"));

    step("The application: two pods annotated for injection, writing through 127.0.0.1");
    for name in APPS {
        node.apply_manifest(&apps, &shop::writer(name, INJECT, None))?;
    }
    node.run_kubectl(&["wait", "-n", &apps, "--for=condition=Ready", "pod/app-0", "pod/app-1", "--timeout=180s"])?;
    done("each pod runs eden-sidecar as a native sidecar, started before the application");

    step("Copy and verification: waiting for phase Ready");
    wait_phase(node, &apps, "Ready")?;
    show(node, &apps)?;

    step("Read canary: half the reads to the target");
    patch(node, &apps, r#"{"strategy":{"readPercentage":50}}"#)?;
    eventually("the canary's strategy", Duration::from_secs(60), || {
        let payload = node.run_kubectl(&["get", "-n", &apps, "cm/eden-cache", "-o", "jsonpath={.data.eden\\.yaml}"]);
        payload.ok().filter(|payload| payload.contains("read_percentage: 50"))
    })?;
    done("pushed to every sidecar through ConfigMap eden-cache");

    step("Cutover: writes to the target (held for a moment while replication drains), mirrored to the source");
    patch(node, &apps, r#"{"strategy":{"writeMode":{"mode":"dualWrite","policy":"newAuthoritative"}}}"#)?;
    wait_phase(node, &apps, "CutOver")?;
    show(node, &apps)?;

    step("Complete: the source detached");
    patch(node, &apps, r#"{"complete":true}"#)?;
    wait_phase(node, &apps, "Completed")?;
    show(node, &apps)?;

    step("Stopping the writers: every write they saw acknowledged is on the target, once, in order");
    let ip = node.run_kubectl(&["get", "-n", &apps, "pod/redis-target", "-o", "jsonpath={.status.podIP}"])?;
    let mut target = redis::Client::open(format!("redis://{ip}:6379"))?.get_multiplexed_async_connection().await?;
    for name in APPS {
        let acknowledged = shop::stop_writer(node, &apps, name)?;
        acknowledged.assert_exact_on(name, &mut target).await;
    }
    let preloaded = shop::preloaded_on(&mut target, PRELOADED).await?;
    if preloaded != PRELOADED {
        return Err(format!("{preloaded} of the {PRELOADED} preloaded lists on the target").into());
    }
    done(&format!("and the {PRELOADED} preloaded lists too"));

    if std::io::stdin().is_terminal() {
        println!("\nThe node stays up for a look around (KUBECONFIG above); press Enter to tear it down.");
        std::io::stdin().read_line(&mut String::new())?;
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn done(what: &str) {
    println!("    {what}");
}

/// `kubectl get migration cache`, indented.
fn show(node: &Node, namespace: &str) -> Result<()> {
    let table = node.run_kubectl(&["get", "-n", namespace, "migration/cache"])?;
    table.lines().for_each(|line| println!("    {line}"));
    Ok(())
}

fn wait_phase(node: &Node, namespace: &str, phase: &str) -> Result<()> {
    let condition = format!("--for=jsonpath={{.status.phase}}={phase}");
    node.run_kubectl(&["wait", "-n", namespace, "migration/cache", &condition, "--timeout=180s"])?;
    Ok(())
}

fn patch(node: &Node, namespace: &str, spec: &str) -> Result<()> {
    let patch = format!("{{\"spec\":{spec}}}");
    node.run_kubectl(&["patch", "-n", namespace, "migration/cache", "--type=merge", "-p", &patch])?;
    Ok(())
}
