//! Two operator replicas against a real API server: exactly one leads, and the other takes over
//! when the leader dies (after the lease expires) or steps down cleanly (at once).

use std::time::{Duration, Instant};

use eden_e2e::ControlPlane;
use eden_operator::leader::{LeaderElector, Timing};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use tokio::sync::watch;

const TIMING: Timing = Timing {
    lease_duration: Duration::from_secs(2),
    renew_deadline: Duration::from_millis(1500),
    retry_period: Duration::from_millis(100),
};

struct Candidate {
    leading: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn campaign(api: &Api<Lease>, identity: &str) -> Candidate {
    let (sender, leading) = watch::channel(false);
    let elector = LeaderElector::new(api.clone(), "eden-operator", identity, TIMING);
    Candidate { leading, task: tokio::spawn(elector.run(sender)) }
}

async fn wait_until(what: &str, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(15), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Leases in a fresh namespace of the shared control plane.
async fn leases(prefix: &str) -> Api<Lease> {
    let control_plane = ControlPlane::shared();
    let namespace = control_plane.namespace(prefix).await.unwrap();
    Api::namespaced(control_plane.client().await.unwrap(), &namespace)
}

#[tokio::test]
async fn one_replica_leads_and_the_other_takes_over_when_it_dies() {
    let api = leases("leader").await;

    let first = campaign(&api, "operator-a");
    wait_until("a leads", || *first.leading.borrow()).await;
    let second = campaign(&api, "operator-b");
    tokio::time::sleep(TIMING.lease_duration / 2).await;
    assert!(*first.leading.borrow() && !*second.leading.borrow(), "exactly one leader while a renews");

    // a dies without releasing: b must wait for the lease to expire, then lead.
    first.task.abort();
    let took = wait_until("b leads", || *second.leading.borrow()).await;
    assert!(took >= TIMING.lease_duration - TIMING.retry_period * 2, "b waited for expiry, took {took:?}");

    let lease = api.get("eden-operator").await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("operator-b"));
    assert_eq!(lease.lease_transitions, Some(1));
}

#[tokio::test]
async fn a_clean_release_hands_over_without_waiting_for_expiry() {
    let api = leases("leader-release").await;

    let first = campaign(&api, "operator-a");
    wait_until("a leads", || *first.leading.borrow()).await;
    let second = campaign(&api, "operator-b");

    first.task.abort();
    LeaderElector::new(api.clone(), "eden-operator", "operator-a", TIMING).release().await.unwrap();
    let took = wait_until("b leads", || *second.leading.borrow()).await;
    assert!(took < TIMING.lease_duration, "a released lease is taken at once, took {took:?}");
}
