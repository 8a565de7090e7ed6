#!/usr/bin/env python3
"""The sidecar's overhead against direct Redis, HAProxy and twemproxy, in one run.

Starts a private redis-server and, in front of it, eden-sidecar, HAProxy (mode tcp) and twemproxy,
all on free loopback ports. Drives each target with redis-benchmark: SET/GET with 50 clients, with
and without a 16-deep pipeline, and single-client p50/p99 latency. Also measures the sidecar's time
to ready and its resident memory idle and with 1,000 idle clients. Prints a Markdown report and
writes it into BENCHMARKS.md between the proxy markers.

The machine is shared and noisy (2 cores), so every figure is a ratio against direct Redis measured
in the same round: rounds are interleaved (each round runs each test on every target back to back,
in a rotating order), ratios are taken within a round, and the median round is reported.

What the rest of the machine does moves every figure from one second to the next, so the pipelined
and single-client tests are cut into slices: every target runs each slice back to back, each ratio is
taken within a slice, and the reported figure is the median over every slice of every round. Pairs
a few seconds apart track each other; one run per target per round paired runs tens of seconds apart,
and then the added p50 of the same binaries swung between -16 and +72 µs from round to round, and the
sidecar's pipelined throughput over twemproxy's (a CPU-bound single thread, which any other process
on the machine slows) between 1.5× and 3.1×. A slice still moves 250,000 pipelined requests, so that
it lasts about a second on the fastest target; one hiccup then moves one slice of twenty, not a round.

Usage:  bench/proxy.py [--sidecar-build-failed] [SIDECAR_BINARY]
        (`make bench` builds the release sidecar and calls this; SIDECAR_BINARY defaults to
        $CARGO_TARGET_DIR/release/eden-sidecar, else $HOME/.cache/eden/target/release/eden-sidecar)

Environment (defaults in brackets):
  BENCH_ROUNDS [5]                   interleaved rounds; the median is reported
  BENCH_REQUESTS [100000]            requests per test, 50 clients, no pipeline
  BENCH_PIPELINED_REQUESTS [1000000] requests per round, 50 clients, -P 16, split into slices
  BENCH_PIPELINED_SLICES [4]         slices of the pipelined test per round
  BENCH_LATENCY_REQUESTS [20000]     requests per round, 1 client, split into slices
  BENCH_LATENCY_SLICES [8]           slices of the single-client test per round
  BENCH_IDLE_CLIENTS [1000]          idle clients held open for the sidecar's RSS
  BENCH_OUTPUT [BENCHMARKS.md at the repository root]  file to update; "-" for none

Exits non-zero when any target could not be started or measured (after printing what was measured);
BENCHMARKS.md is only rewritten when every target was measured. A MISS against a target figure is a
result, not a failure.
"""

import datetime
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import time

from common import (BenchError, bench_main, benchmark_args, check_binary, children_cpu_seconds, cpu_seconds,
                    env_int, exited, free_port, geomean, invocation, launch_sidecar, log, machine_facts, parse_args,
                    publish, redis_benchmark, rss_kib, shown, socket_fds, start_redis, wait_serving, which)

ROUNDS = env_int("BENCH_ROUNDS", 5)
REQUESTS = env_int("BENCH_REQUESTS", 100_000)
PIPELINED_REQUESTS = env_int("BENCH_PIPELINED_REQUESTS", 1_000_000)
PIPELINED_SLICES = env_int("BENCH_PIPELINED_SLICES", 4)
LATENCY_REQUESTS = env_int("BENCH_LATENCY_REQUESTS", 20_000)
LATENCY_SLICES = env_int("BENCH_LATENCY_SLICES", 8)
IDLE_CLIENTS = env_int("BENCH_IDLE_CLIENTS", 1000)
READY_STARTS = 5  # fresh sidecar starts timed for readiness; the median is reported
TARGETS = ["direct", "eden-sidecar", "haproxy", "twemproxy"]
FOOTPRINT = "sidecar footprint"  # failures' key for the RSS and readiness measurements

# (key, clients, pipeline, requests per run, runs per round). Only SET and GET: twemproxy proxies a
# subset of commands.
TESTS = [
    ("plain", 50, 1, REQUESTS, 1),
    ("piped", 50, 16, max(1, PIPELINED_REQUESTS // PIPELINED_SLICES), PIPELINED_SLICES),
    ("single", 1, 1, max(1, LATENCY_REQUESTS // LATENCY_SLICES), LATENCY_SLICES),
]
RUNS_PER_ROUND = {key: runs for key, *_, runs in TESTS}

# The figures issue 3 sets for the sidecar.
IDLE_RSS_MAX_MIB = 10
LOADED_RSS_MAX_MIB = 40
READY_MAX_MS = 50


def start_sidecar(procs, binary, redis_port):
    check_binary(binary)
    child, port, _, _ = launch_sidecar(procs, binary, redis_port)
    wait_serving(port, child, "eden-sidecar")
    return child, port



def start_haproxy(procs, port, redis_port):
    # No `check` on the server: health checks would be extra traffic on Redis during the runs.
    config = procs.scratch / "haproxy.cfg"
    config.write_text(f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend redis
    bind 127.0.0.1:{port}
    default_backend redis
backend redis
    server redis 127.0.0.1:{redis_port}
""")
    check = subprocess.run([which("haproxy"), "-c", "-q", "-f", str(config)], capture_output=True, text=True,
                           timeout=30)
    if check.returncode != 0:
        raise BenchError(f"haproxy rejected its config: {(check.stdout + check.stderr).strip()}")
    child = procs.start("haproxy", [which("haproxy"), "-db", "-f", str(config)])  # -db: stay in the foreground
    wait_serving(port, child, "haproxy")
    return child


def start_twemproxy(procs, port, redis_port):
    # One server connection, opened at start, as a sidecar-like single upstream link.
    config = procs.scratch / "nutcracker.yml"
    config.write_text(f"""eden:
  listen: 127.0.0.1:{port}
  redis: true
  preconnect: true
  server_connections: 1
  servers:
   - 127.0.0.1:{redis_port}:1
""")
    nutcracker = which("nutcracker")
    check = subprocess.run([nutcracker, "-t", "-c", str(config)], capture_output=True, text=True, timeout=30)
    if check.returncode != 0:
        raise BenchError(f"nutcracker rejected its config: {(check.stdout + check.stderr).strip()}")
    # Its stats server listens on 0.0.0.0 unless told otherwise: keep it on loopback.
    child = procs.start("nutcracker", [nutcracker, "-c", str(config), "-a", "127.0.0.1", "-s", str(free_port()),
                                       "-o", str(procs.scratch / "nutcracker.log")])
    wait_serving(port, child, "twemproxy")
    return child


# ---------------------------------------------------------------------------------------------
# Measuring.

def run_benchmark(name, port, clients, pipeline, requests, pids):
    """One redis-benchmark run; returns {"set_rps", "get_rps", "set_p50", ..., "get_p99"} (µs)
    and "cpu": the CPU time per request, in µs, of redis-benchmark, redis-server and the proxy
    (0 for direct), whatever the rest of the machine was doing meanwhile."""
    before = [cpu_seconds(pid) for pid in pids] + [children_cpu_seconds()]
    result = redis_benchmark(name, benchmark_args(port, "set,get", clients, pipeline, requests))
    after = [cpu_seconds(pid) for pid in pids] + [children_cpu_seconds()]
    redis, proxy, bench = ((b - a) * 1e6 / (2 * requests) for a, b in zip(before, after))
    result["cpu"] = {"bench": bench, "redis": redis, "proxy": proxy if name != "direct" else 0.0}
    return result


def run_rounds(ports, processes, failures):
    """rounds[target][test] is a list of results, RUNS_PER_ROUND[test] per round, for the targets
    still standing. Within a round, the n-th run of a test on every target form a set taken back to
    back, and ratios are only taken within a set."""
    rounds = {name: {test[0]: [] for test in TESTS} for name in ports}
    names = list(ports)
    for number in range(ROUNDS):
        for key, clients, pipeline, requests, runs in TESTS:
            for part in range(runs):
                # Rotate who goes first: the first run after a pause sees a slightly different machine.
                turn = (number * runs + part) % len(names)
                for name in names[turn:] + names[:turn]:
                    if name in failures:
                        continue
                    log(f"round {number + 1}/{ROUNDS}: {name}, {key} run {part + 1}/{runs} "
                        f"({clients} clients, -P {pipeline}, -n {requests})")
                    try:
                        if processes[name].poll() is not None:
                            raise exited(processes[name], name)
                        pids = (processes["direct"].pid, processes[name].pid)
                        rounds[name][key].append(run_benchmark(name, ports[name], clients, pipeline, requests, pids))
                    except BenchError as error:
                        failures[name] = str(error)
                        log(f"FAILED {error}")
                        if name == "direct":
                            return rounds  # nothing left to compare with
    return rounds


def sidecar_footprint(procs, binary, redis_port):
    """Time to ready over fresh starts; RSS idle right after the first start and with idle clients."""
    figures = {"ready_ms": []}
    for start in range(READY_STARTS):
        child, port, _, ready_ms = launch_sidecar(procs, binary, redis_port, name=f"eden-sidecar-start{start}")
        figures["ready_ms"].append(ready_ms)
        if start == 0:
            figures["idle_kib"] = rss_kib(child.pid)
            figures["loaded_kib"] = rss_with_idle_clients(child, port)
        procs.stop(child)
    return figures


def rss_with_idle_clients(child, port):
    """Opens IDLE_CLIENTS connections, one after the other, each sending one PING and reading its
    PONG (so the sidecar holds a whole session, as for a pooled client between uses), then reads
    the RSS while they all sit idle. One at a time: this measures memory, not a connection storm."""
    clients = []
    try:
        for number in range(IDLE_CLIENTS):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(client)
            client.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = client.recv(256)
            if reply != b"+PONG\r\n":
                raise BenchError(f"eden-sidecar: idle client {number} sent PING and got {reply!r}")
        # Every connection accepted and held by the sidecar, not waiting in the listen backlog.
        deadline = time.monotonic() + 5
        while socket_fds(child.pid) < IDLE_CLIENTS and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # let buffers settle before reading the RSS
        return rss_kib(child.pid)
    except OSError as error:
        raise BenchError(f"eden-sidecar: holding {IDLE_CLIENTS} idle clients failed: {error}")
    finally:
        for client in clients:
            client.close()


def raise_fd_limit():
    """1,000 idle clients need more than the usual soft limit of 1,024 descriptors, here and in
    the sidecar (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if IDLE_CLIENTS + 100 > resource.getrlimit(resource.RLIMIT_NOFILE)[0]:
        log(f"warning: the descriptor limit is too low for {IDLE_CLIENTS} idle clients")


# ---------------------------------------------------------------------------------------------
# Summarising: ratios within a slice, then the median over slices.

def summarise(rounds, name):
    """Medians over slices for one target; ratios against direct in the same slice."""
    runs, direct = rounds[name], rounds["direct"]
    n = min(len(runs[key]) // RUNS_PER_ROUND[key] for key in RUNS_PER_ROUND)  # whole rounds measured
    if n == 0 or min(len(direct[key]) // RUNS_PER_ROUND[key] for key in RUNS_PER_ROUND) < n:
        return None
    runs = {key: results[:n * RUNS_PER_ROUND[key]] for key, results in runs.items()}
    med = statistics.median
    s = {}
    for key in ("plain", "piped"):
        for op in ("set", "get"):
            s[f"{key}_{op}"] = med(r[f"{op}_rps"] for r in runs[key])
            s[f"{key}_{op}_ratio"] = med(t[f"{op}_rps"] / d[f"{op}_rps"] for t, d in zip(runs[key], direct[key]))
    # Single-client latency: the mean of the SET and GET percentiles of each slice.
    s["p50"] = med(latency(r, "p50") for r in runs["single"])
    s["p99"] = med(latency(r, "p99") for r in runs["single"])
    s["p50_added"] = med(latency(t, "p50") - latency(d, "p50") for t, d in zip(runs["single"], direct["single"]))
    return s


def latency(result, percentile):
    """One single-client run's percentile: the mean of its SET and GET figures, in µs."""
    return (result[f"set_{percentile}"] + result[f"get_{percentile}"]) / 2


def piped_vs(rounds, name, other):
    """Pipelined throughput of one target over another's, slice by slice (geometric mean of the
    SET and GET ratios), median over slices; None when either was not measured."""
    ratios = [geomean([a["set_rps"] / b["set_rps"], a["get_rps"] / b["get_rps"]])
              for a, b in zip(rounds[name]["piped"], rounds[other]["piped"])]
    return statistics.median(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------
# Reporting.

def throughput_table(rounds, failures):
    lines = [
        "| target | SET / GET rps, 50 clients | ratio | SET / GET rps, -P 16 | ratio -P 16 "
        "| p50 µs, 1 client | p99 µs | p50 added µs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in TARGETS:
        s = summarise(rounds, name) if name in rounds else None
        if s is None or name in failures:
            lines.append(f"| {name} | FAILED: {failures.get(name, 'not measured')} | — | — | — | — | — | — |")
            continue
        lines.append(
            f"| {name} | {s['plain_set']:.0f} / {s['plain_get']:.0f} "
            f"| {s['plain_set_ratio']:.2f}× / {s['plain_get_ratio']:.2f}× "
            f"| {s['piped_set']:.0f} / {s['piped_get']:.0f} "
            f"| {s['piped_set_ratio']:.2f}× / {s['piped_get_ratio']:.2f}× "
            f"| {s['p50']:.0f} | {s['p99']:.0f} | {s['p50_added']:+.0f} |")
    return lines


def cpu_table(rounds, failures):
    """CPU time per pipelined request, by process: what each target costs the machine, which the
    noise of a shared machine moves far less than it moves throughput."""
    lines = ["| target, -P 16 | redis-benchmark | redis-server | proxy | total |", "|---|---|---|---|---|"]
    med = statistics.median
    for name in TARGETS:
        runs = rounds.get(name, {}).get("piped", [])
        if not runs or name in failures:
            continue
        cpu = {part: med(r["cpu"][part] for r in runs) for part in ("bench", "redis", "proxy")}
        total = med(sum(r["cpu"].values()) for r in runs)
        proxy = f"{cpu['proxy']:.2f}" if name != "direct" else "—"
        lines.append(f"| {name} | {cpu['bench']:.2f} | {cpu['redis']:.2f} | {proxy} | {total:.2f} |")
    return lines


def footprint_table(footprint, failures):
    if not footprint:
        return [f"Sidecar footprint: FAILED: {failures.get(FOOTPRINT, 'not measured (see the eden-sidecar row)')}"]
    ready = footprint["ready_ms"]
    return [
        "| sidecar footprint | measured |",
        "|---|---|",
        f"| RSS idle, right after /readyz | {footprint['idle_kib'] / 1024:.1f} MiB |",
        f"| RSS with {IDLE_CLIENTS} idle clients (each sent one PING) | {footprint['loaded_kib'] / 1024:.1f} MiB |",
        f"| exec to /readyz 200, median of {len(ready)} starts | {statistics.median(ready):.1f} ms "
        f"(min {min(ready):.1f}, max {max(ready):.1f}) |",
    ]


def targets_table(rounds, failures, footprint):
    def ok(name):
        return name in rounds and name not in failures and summarise(rounds, name) is not None

    rows = []
    sidecar_ok = ok("eden-sidecar")
    for other, label, factor in (("haproxy", "HAProxy", 0.9), ("twemproxy", "twemproxy", 2.0)):
        ratio = piped_vs(rounds, "eden-sidecar", other) if sidecar_ok and ok(other) else None
        rows.append((f"pipelined throughput ≥ {factor:g}× {label}'s",
                     None if ratio is None else (f"{ratio:.2f}×", ratio >= factor)))
    if sidecar_ok and ok("haproxy"):
        eden, haproxy = (summarise(rounds, n)["p50_added"] for n in ("eden-sidecar", "haproxy"))
        rows.append(("single-client p50 added latency ≤ HAProxy's",
                     (f"{eden:+.0f} µs vs {haproxy:+.0f} µs", eden <= haproxy)))
    else:
        rows.append(("single-client p50 added latency ≤ HAProxy's", None))
    if footprint:
        idle, loaded = footprint["idle_kib"] / 1024, footprint["loaded_kib"] / 1024
        ready = statistics.median(footprint["ready_ms"])
        rows += [(f"idle RSS ≤ {IDLE_RSS_MAX_MIB} MiB", (f"{idle:.1f} MiB", idle <= IDLE_RSS_MAX_MIB)),
                 (f"RSS with 1,000 idle clients ≤ {LOADED_RSS_MAX_MIB} MiB",
                  (f"{loaded:.1f} MiB with {IDLE_CLIENTS}", loaded <= LOADED_RSS_MAX_MIB and IDLE_CLIENTS >= 1000)),
                 (f"ready < {READY_MAX_MS} ms", (f"{ready:.1f} ms", ready < READY_MAX_MS))]
    else:
        rows += [(f"idle RSS ≤ {IDLE_RSS_MAX_MIB} MiB", None),
                 (f"RSS with 1,000 idle clients ≤ {LOADED_RSS_MAX_MIB} MiB", None),
                 (f"ready < {READY_MAX_MS} ms", None)]
    lines = ["| target (issue 3) | measured | |", "|---|---|---|"]
    for what, result in rows:
        if result is None:
            lines.append(f"| {what} | not measured | — |")
        else:
            value, passed = result
            lines.append(f"| {what} | {value} | {'PASS' if passed else 'MISS'} |")
    return lines


def rounds_table(rounds):
    """Every round's figures (the median of its slices), so that a reader can see how much the
    machine moved."""
    lines = ["| target | round | SET / GET rps, 50 clients (ratio) | SET / GET rps, -P 16 (ratio) | p50 / p99 µs |",
             "|---|---|---|---|---|"]
    med = statistics.median
    direct = rounds.get("direct")
    for name in TARGETS:
        if name not in rounds or not direct:
            continue
        for number in range(ROUNDS):
            runs, base = (round_of(results, number) for results in (rounds[name], direct))
            if any(len(runs[key]) < runs_per_round for key, runs_per_round in RUNS_PER_ROUND.items()):
                break
            cells = []
            for key in ("plain", "piped"):
                pairs = list(zip(runs[key], base[key]))
                ratios = f" ({med(t['set_rps'] / d['set_rps'] for t, d in pairs):.2f} / " \
                         f"{med(t['get_rps'] / d['get_rps'] for t, d in pairs):.2f})" if pairs else ""
                cells.append(f"{med(r['set_rps'] for r in runs[key]):.0f} / "
                             f"{med(r['get_rps'] for r in runs[key]):.0f}{ratios}")
            p50, p99 = (med(latency(r, q) for r in runs["single"]) for q in ("p50", "p99"))
            lines.append(f"| {name} | {number + 1} | {cells[0]} | {cells[1]} | {p50:.0f} / {p99:.0f} |")
    return lines


def round_of(results, number):
    """One round's runs of every test, from a target's results."""
    return {key: runs[number * RUNS_PER_ROUND[key]:(number + 1) * RUNS_PER_ROUND[key]] for key, runs in results.items()}


def render(args, rounds, failures, footprint, elapsed_s):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command_lines = [shlex.join(benchmark_args("PORT", "set,get", c, p, n)) + (f"  # {runs} times" if runs > 1 else "")
                     for _, c, p, n, runs in TESTS]
    lines = [
        f"Measured {date}, {elapsed_s / 60:.1f} minutes, with `{invocation('proxy.py', args.sidecar)}`.",
        "",
        "Machine: " + "; ".join(machine_facts(args.sidecar, not args.sidecar_build_failed,
                                        ("redis-server", "redis-benchmark", "haproxy", "nutcracker"))) + ".",
        "",
        f"{ROUNDS} interleaved rounds of slices (below); each ratio is against direct Redis in the same "
        "slice. Every target fronts one private redis-server (no persistence) "
        "on loopback; HAProxy in `mode tcp` with one server and no health checks; twemproxy with "
        "`redis: true`, `preconnect: true`, `server_connections: 1`.",
        "",
        *throughput_table(rounds, failures),
        "",
        "CPU time per pipelined request (µs, median over slices; user + system, from /proc), by process:",
        "",
        *cpu_table(rounds, failures),
        "",
        *footprint_table(footprint, failures),
        "",
        *targets_table(rounds, failures, footprint),
        "",
        "Each round runs, for every target (PORT):",
        "",
        "```",
        *command_lines,
        "```",
        "",
        f"The pipelined test runs as {PIPELINED_SLICES} slices per round and the single-client test as "
        f"{LATENCY_SLICES}, each slice on every target back to back; every figure is the median over all "
        "slices, and every ratio the median over all slices of the ratio within a slice (the sidecar's over "
        "HAProxy's and twemproxy's too), so a ratio need not equal the quotient of the medians shown. "
        "p50/p99 are the mean of the SET and GET percentiles from redis-benchmark's histogram, whose "
        "buckets are 8 µs wide below 1 ms; p50 added is (target − direct) within a slice. The rounds "
        "below show the median of each round's slices.",
        "",
        "<details><summary>Every round</summary>",
        "",
        *rounds_table(rounds),
        "",
        "</details>",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------

def run(args, procs):
    started = time.monotonic()
    failures, processes, ports = {}, {}, {}
    redis_port = free_port()
    processes["direct"], ports["direct"] = start_redis(procs, redis_port), redis_port

    if args.sidecar_build_failed:
        failures["eden-sidecar"] = "the sidecar did not build (cargo build --release -p eden-sidecar)"
    else:
        try:
            processes["eden-sidecar"], ports["eden-sidecar"] = start_sidecar(procs, args.sidecar, redis_port)
        except BenchError as error:
            failures["eden-sidecar"] = f"did not start: {error}"
    for name, start in (("haproxy", start_haproxy), ("twemproxy", start_twemproxy)):
        try:
            port = free_port()
            processes[name], ports[name] = start(procs, port, redis_port), port
        except BenchError as error:
            failures[name] = f"did not start: {error}"
    for name, error in failures.items():
        log(f"FAILED {name}: {error}")

    footprint = None
    if "eden-sidecar" not in failures:
        try:
            log("sidecar: time to ready, idle RSS, RSS with idle clients")
            footprint = sidecar_footprint(procs, args.sidecar, redis_port)
        except BenchError as error:  # a failure of its own: the throughput runs still go ahead
            failures[FOOTPRINT] = str(error)
            log(f"FAILED {error}")

    rounds = run_rounds(ports, processes, failures)
    report = render(args, rounds, failures, footprint, time.monotonic() - started)
    print(report, flush=True)

    if failures:
        log(f"\n{len(failures)} target(s) failed: {', '.join(failures)}; BENCHMARKS.md left as it was")
        return 1
    publish("proxy", "Sidecar proxy overhead (`make bench`, bench/proxy.py)", report)
    return 0


def main():
    args = parse_args(__doc__)
    raise_fd_limit()
    return bench_main(run, args, ["redis-server", "redis-benchmark", "haproxy", "nutcracker"])


if __name__ == "__main__":
    sys.exit(main())
