#!/usr/bin/env python3
"""Cutover and rollback with many sidecars under load: the write pause clients see, how long a
Migration patch takes to reach every sidecar, and what the sidecars cost the API server at rest.

One run per sidecar count (BENCH_SIDECARS, default "10,100"). Each starts the local Kubernetes API
server (e2e/control-plane), the Eden CRDs, two redis-servers, eden-operator for one namespace, and N
eden-sidecar processes with --configmap (the command line the webhook injects, default fencing
settings), then Endpoints and a `sync` Migration (requireVerification false: the copy's checks are
the replication benchmark's business). BENCH_WRITERS writer threads each loop `SET` on a key of
their own through one sidecar (round robin over the sidecars), recording every write's send time
and how long its reply took.

Then, BENCH_CUTOVERS times:
  - cutover: patch writeMode to newAuthoritative, wait for phase CutOver;
  - rollback: patch it back to oldAuthoritative, wait for RolledBack;
  - patch newAuthoritative again... which starts with a fresh copy, so each cutover after the first
    is preceded by Syncing and Ready (the small dataset copies in about a second).
For each cutover and rollback:
  - write pause: the longest any write took among those sent while it ran (from the patch to the
    phase); the operator's pause is bounded by maxWritePauseMillis (2000);
  - apply time: from the moment the ConfigMap holds the generation that moves writes (polled) to the
    phase, which the operator sets only once every sidecar acknowledged it.
At rest (Ready, writers running), over BENCH_REST_SECONDS: the API server's own request counters
(apiserver_request_total on its /metrics) for Lease writes and ConfigMap reads, per sidecar.

Usage:  bench/cutover.py [--sidecar-build-failed] [SIDECAR_BINARY]   (eden-operator beside it)

Environment (defaults in brackets):
  BENCH_SIDECARS ["10,100"]   sidecar counts, one run each
  BENCH_CUTOVERS [20]         cutover + rollback cycles per run
  BENCH_WRITERS [10]          writer threads
  BENCH_REST_SECONDS [60]     the at-rest window
  BENCH_OUTPUT [BENCHMARKS.md at the repository root]  file to update; "-" for none

Exits non-zero when something could not be started or measured; BENCHMARKS.md is then left as it
was. A MISS against a target figure is a result, not a failure.
"""

import datetime
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import (REPO, BenchError, Conn, Kube, bench_main, check_built, env_int, exited, free_port, invocation,
                    launch_sidecar, log, machine_facts, parse_args, passed, percentile, publish, sidecar_env,
                    start_control_plane, start_redis, vm_kib)

CUTOVERS = env_int("BENCH_CUTOVERS", 20)
WRITERS = env_int("BENCH_WRITERS", 10)
REST_SECONDS = env_int("BENCH_REST_SECONDS", 60)
SIDECARS = [int(n) for n in os.environ.get("BENCH_SIDECARS", "10,100").split(",")]

MIGRATION = "bench"

# The figures issue 14 sets: write pause p99 by sidecar count.
PAUSE_P99_MAX_MS = {10: 250, 100: 500}


def kubectl(kubeconfig, *args, stdin=None):
    done = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, *args], input=stdin, capture_output=True,
                          text=True, timeout=120)
    if done.returncode != 0:
        raise BenchError(f"kubectl {' '.join(args)}: {done.stderr.strip()[-400:]}")
    return done.stdout


def migration_manifest(policy):
    return f"""apiVersion: eden.io/v1alpha1
kind: Migration
metadata: {{name: {MIGRATION}}}
spec:
  source: {{endpointRef: {{name: source}}}}
  target: {{endpointRef: {{name: target}}}}
  strategy:
    readPercentage: 0
    writeMode: {{mode: dualWrite, policy: {policy}}}
  data: {{type: sync}}
  cutover: {{requireVerification: false}}
"""


class Writers:
    """Writer threads: SET through the sidecars, every write's (send time, latency) recorded."""

    def __init__(self, ports):
        self.stop = threading.Event()
        self.samples = []  # (sent, seconds) of every write
        self.errors = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.write, args=(number, ports[number % len(ports)]), daemon=True)
                        for number in range(WRITERS)]
        for thread in self.threads:
            thread.start()

    def write(self, number, port):
        conn, n = Conn(port, timeout=30), 0
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                conn.call("SET", f"bench:writer:{number}", n)
            except (OSError, BenchError) as error:
                with self.lock:
                    self.errors.append(f"writer {number}: {error}")
                return
            took = time.monotonic() - sent
            with self.lock:
                self.samples.append((sent, took))
            n += 1

    def longest(self, start, end):
        """The longest write sent in [start, end), in ms."""
        with self.lock:
            took = [t for sent, t in self.samples if start <= sent < end]
        return 1000 * max(took, default=0.0)

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=40)
        if self.errors:
            raise BenchError("writes failed: " + "; ".join(self.errors[:3]))


class Cluster:
    """The API server, as this benchmark uses it: one namespace per run."""

    def __init__(self, kubeconfig, namespace):
        self.kube, self.kubeconfig, self.namespace = Kube(kubeconfig), kubeconfig, namespace

    def apply(self, manifest):
        kubectl(self.kubeconfig, "apply", "-n", self.namespace, "-f", "-", stdin=manifest)

    def phase(self):
        path = f"/apis/eden.io/v1alpha1/namespaces/{self.namespace}/migrations/{MIGRATION}"
        status = self.kube.request("GET", path).get("status", {})
        return status.get("phase"), status

    def payload(self):
        path = f"/api/v1/namespaces/{self.namespace}/configmaps/eden-{MIGRATION}"
        return self.kube.request("GET", path).get("data", {}).get("eden.yaml", "")

    def wait_phase(self, wanted, operator, timeout=120, moves=None):
        """Polls until phase `wanted`; returns (reached, when the payload first satisfied `moves`)."""
        started, moved = time.monotonic(), None
        while True:
            current, status = self.phase()
            if moves is not None and moved is None and moves(self.payload()):
                moved = time.monotonic()
            if current == wanted:
                return time.monotonic(), moved
            if operator.poll() is not None:
                raise exited(operator, "eden-operator")
            if time.monotonic() - started > timeout:
                held = [c for c in status.get("conditions", []) if c.get("type") == "Held"]
                raise BenchError(f"Migration never reached {wanted} within {timeout}s (phase {current}; {held})")
            time.sleep(0.005)


def api_counts(kube):
    """(Lease writes, ConfigMap GETs) so far, from the API server's own counters."""
    leases = configmaps = 0
    for line in kube.text("/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if 'resource="leases"' in line and re.search(r'verb="(APPLY|PATCH|UPDATE|POST)"', line):
            leases += value
        if 'resource="configmaps"' in line and 'verb="GET"' in line:
            configmaps += value
    return leases, configmaps


def flipped(text):
    return "new_authoritative" in text and "writes: flowing" in text


def rolled_back(text):
    return "old_authoritative" in text and "writes: flowing" in text


def one_run(args, procs, kubeconfig, sidecars):
    """Everything for one sidecar count, in a namespace of its own; returns the figures."""
    operator_binary = str(Path(args.sidecar).with_name("eden-operator"))
    cluster = Cluster(kubeconfig, f"eden-bench-{sidecars}")
    kubectl(kubeconfig, "create", "namespace", cluster.namespace)
    source_port, target_port = free_port(), free_port()
    start_redis(procs, source_port, name=f"redis-source-{sidecars}")
    start_redis(procs, target_port, name=f"redis-target-{sidecars}")
    env = sidecar_env(KUBECONFIG=kubeconfig)
    operator = procs.start(f"eden-operator-{sidecars}", [
        operator_binary, "--admin-listen", f"127.0.0.1:{free_port()}", "--log-format", "text",
        "--watch-namespace", cluster.namespace, "--instance", f"bench-operator-{sidecars}",
        "--leader-election-namespace", cluster.namespace], env=env)
    cluster.apply(f"""apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {{name: source}}
spec: {{uri: "redis://127.0.0.1:{source_port}"}}
---
apiVersion: eden.io/v1alpha1
kind: Endpoint
metadata: {{name: target}}
spec: {{uri: "redis://127.0.0.1:{target_port}"}}
""")
    cluster.apply(migration_manifest("oldAuthoritative"))
    cluster.wait_phase("Ready", operator)

    log(f"starting {sidecars} sidecars")
    ports, children = [], []
    for number in range(sidecars):
        child, port, _, _ = launch_sidecar(
            procs, args.sidecar, source_port, "--configmap", f"eden-{MIGRATION}", "--namespace", cluster.namespace,
            "--pod-name", f"app-{number}", name=f"eden-sidecar-{sidecars}-{number}", env=env)
        ports.append(port)
        children.append(child)
    deadline = time.monotonic() + 120
    while (cluster.phase()[1].get("sidecars") or {}).get("acknowledged") != sidecars:
        if time.monotonic() > deadline:
            raise BenchError(f"not every sidecar acknowledged within 120s: {cluster.phase()[1].get('sidecars')}")
        time.sleep(0.1)
    writers = Writers(ports)

    log(f"{sidecars} sidecars at rest for {REST_SECONDS}s")
    before, rest_started = api_counts(cluster.kube), time.monotonic()
    time.sleep(REST_SECONDS)
    after, rest = api_counts(cluster.kube), time.monotonic() - rest_started
    lease_writes = (after[0] - before[0]) / rest / sidecars
    config_reads = (after[1] - before[1]) / rest / sidecars

    cutovers, rollbacks = [], []
    for number in range(CUTOVERS):
        log(f"{sidecars} sidecars: cutover and rollback {number + 1}/{CUTOVERS}")
        cluster.apply(migration_manifest("newAuthoritative"))
        # After a rollback the cutover starts with a fresh copy: time it from the end of that.
        started = cluster.wait_phase("CuttingOver", operator)[0] if number > 0 else time.monotonic()
        reached, moved = cluster.wait_phase("CutOver", operator, moves=flipped)
        time.sleep(0.3)  # writes sent just before the phase still count
        cutovers.append({"pause": writers.longest(started, reached), "apply": 1000 * (reached - (moved or reached)),
                         "total": 1000 * (reached - started)})
        cluster.apply(migration_manifest("oldAuthoritative"))
        patched = time.monotonic()
        reached, moved = cluster.wait_phase("RolledBack", operator, moves=rolled_back)
        time.sleep(0.3)
        rollbacks.append({"pause": writers.longest(patched, reached), "apply": 1000 * (reached - (moved or reached)),
                          "total": 1000 * (reached - patched)})
    writers.finish()
    for child in children:
        if child.poll() is not None:
            raise exited(child, "a sidecar")
    rss_kib = statistics.median(vm_kib(child.pid) for child in children)
    for child in children + [operator]:
        procs.stop(child)
    return {"sidecars": sidecars, "cutovers": cutovers, "rollbacks": rollbacks, "lease_writes": lease_writes,
            "config_reads": config_reads, "rss_kib": rss_kib}


def every(rate):
    return f"one every {1 / rate:.0f} s" if rate > 0 else "none"


def render(args, runs, elapsed_s):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def stats(samples, key):
        values = [s[key] for s in samples]
        return statistics.median(values), percentile(values, 99), max(values)

    lines = [
        f"Measured {date}, {elapsed_s / 60:.1f} minutes, with `{invocation('cutover.py', args.sidecar)}`.",
        "",
        "Machine: " + "; ".join(machine_facts(args.sidecar)) + "; kube-apiserver v1.33 with embedded etcd "
        "(e2e/control-plane), eden-operator and every sidecar on loopback, all on the same 2 cores.",
        "",
        f"{CUTOVERS} cutovers and {CUTOVERS} rollbacks per row, {WRITERS} writer threads looping SET through the "
        "sidecars. *Pause*: the longest any write waited among those sent while the cutover (or rollback) ran. "
        "*Apply*: from the ConfigMap holding the generation that moves writes to the phase the operator sets once "
        "every sidecar acknowledged it. *Total*: from the patch (the first cutover, and rollbacks) or the end of the "
        "fresh copy that follows a rollback (phase CuttingOver) to that phase; a cutover's includes the barrier "
        "generation every sidecar acknowledges before writes pause.",
        "",
        "| sidecars | | pause p50 ms | pause p99 ms | pause max ms | apply p50 ms | apply p99 ms | total p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for name, samples in (("cutover", run["cutovers"]), ("rollback", run["rollbacks"])):
            pause, apply, total = stats(samples, "pause"), stats(samples, "apply"), stats(samples, "total")
            lines.append(f"| {run['sidecars']} | {name} | {pause[0]:.0f} | {pause[1]:.0f} | {pause[2]:.0f} "
                         f"| {apply[0]:.0f} | {apply[1]:.0f} | {total[0]:.0f} |")
    lines += [
        "",
        f"At rest over {REST_SECONDS} s (the API server's own `apiserver_request_total`), per sidecar; the "
        "ConfigMap GETs include the operator's (one a second, shared by all sidecars):",
        "",
        "| sidecars | Lease writes per second | ConfigMap GETs per second | sidecar RSS (median) |",
        "|---|---|---|---|",
    ]
    for run in runs:
        lines.append(f"| {run['sidecars']} | {run['lease_writes']:.4f} ({every(run['lease_writes'])}) "
                     f"| {run['config_reads']:.3f} | {run['rss_kib'] / 1024:.1f} MiB |")
    lines += ["", "| target (issue 14) | measured | |", "|---|---|---|"]
    for run in runs:
        limit = PAUSE_P99_MAX_MS.get(run["sidecars"])
        if limit is not None:
            p99 = stats(run["cutovers"], "pause")[1]
            lines.append(f"| cutover write pause p99 < {limit} ms with {run['sidecars']} sidecars | {p99:.0f} ms "
                         f"| {passed(p99 < limit)} |")
    for run in runs:
        lines.append(f"| steady-state API writes ≤ one per 30 s per sidecar ({run['sidecars']} sidecars) "
                     f"| {every(run['lease_writes'])} | {passed(run['lease_writes'] <= 1 / 30 + 1e-3)} |")
    return "\n".join(lines)


def run(args, procs):
    started = time.monotonic()
    check_built(args)
    if not os.access(Path(args.sidecar).with_name("eden-operator"), os.X_OK):
        raise BenchError("no eden-operator beside the sidecar (cargo build --release -p eden-operator)")
    kubeconfig = start_control_plane(procs)
    kubectl(kubeconfig, "apply", "-f", str(REPO / "crds/eden.yaml"))
    runs = [one_run(args, procs, kubeconfig, sidecars) for sidecars in SIDECARS]
    report = render(args, runs, time.monotonic() - started)
    print(report, flush=True)
    publish("cutover", "Cutover and rollback with many sidecars (`make bench`, bench/cutover.py)", report)
    return 0


def main():
    return bench_main(run, parse_args(__doc__), ["redis-server"])


if __name__ == "__main__":
    sys.exit(main())
