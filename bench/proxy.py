#!/usr/bin/env python3
"""The sidecar against a plain TCP proxy: one run, same machine, everything as a ratio.

Starts a private redis-server, then eden-sidecar, HAProxy (mode tcp) and twemproxy in front of
it, and drives each with redis-benchmark: SET/GET throughput with 50 clients, with and without
a 16-deep pipeline, and single-client p50/p99 latency. This machine is shared and noisy, so
every figure is compared with direct Redis measured in the same run, rounds are interleaved
(each round measures every target once) and the median round is reported.

Also measures the sidecar's resident memory idle and with 1,000 idle clients, and the time from
exec to accepting connections. Writes the results into BENCHMARKS.md between the proxy markers.

Usage: bench/proxy.py SIDECAR_BINARY   (make bench builds the release binary and calls this)
Environment: BENCH_ROUNDS (3), BENCH_REQUESTS (200000), BENCH_LATENCY_REQUESTS (20000).
"""

import contextlib
import csv
import datetime
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
REQUESTS = int(os.environ.get("BENCH_REQUESTS", "200000"))
LATENCY_REQUESTS = int(os.environ.get("BENCH_LATENCY_REQUESTS", "20000"))
IDLE_CLIENTS = 1000
REPO = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.002)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class Processes:
    """Every process this benchmark starts, stopped however the run ends."""

    def __init__(self):
        self.children = []

    def start(self, args, **kwargs):
        child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
        self.children.append(child)
        return child

    def stop_all(self):
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
            if child.poll() is None:
                child.kill()


def rss_kib(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def benchmark(port, clients, pipeline, requests):
    """redis-benchmark SET and GET; returns {test: row} from its CSV output."""
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-n", str(requests),
            "-c", str(clients), "-P", str(pipeline), "--csv", "-r", "100000"]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=600).stdout
    return {row["test"]: row for row in csv.DictReader(io.StringIO(out))}


def measure(port):
    plain = benchmark(port, 50, 1, REQUESTS)
    piped = benchmark(port, 50, 16, REQUESTS)
    single = benchmark(port, 1, 1, LATENCY_REQUESTS)
    return {
        "set": float(plain["SET"]["rps"]), "get": float(plain["GET"]["rps"]),
        "set_p16": float(piped["SET"]["rps"]), "get_p16": float(piped["GET"]["rps"]),
        "p50_us": 1000 * float(single["GET"]["p50_latency_ms"]), "p99_us": 1000 * float(single["GET"]["p99_latency_ms"]),
    }


def main(sidecar):
    procs = Processes()
    scratch = tempfile.TemporaryDirectory(prefix="eden-bench-")
    try:
        return run(sidecar, procs, Path(scratch.name))
    finally:
        procs.stop_all()
        scratch.cleanup()


def run(sidecar, procs, scratch):
    redis_port = free_port()
    procs.start(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
    wait_port(redis_port)

    ports = {"direct": redis_port, "eden-sidecar": free_port(), "haproxy": free_port(), "twemproxy": free_port()}
    admin_port = free_port()
    eden = procs.start([sidecar, "--listen", f"127.0.0.1:{ports['eden-sidecar']}", "--admin-listen",
                        f"127.0.0.1:{admin_port}", "--source", f"redis://127.0.0.1:{redis_port}"])

    (scratch / "haproxy.cfg").write_text(f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h
frontend redis
    bind 127.0.0.1:{ports['haproxy']}
    default_backend redis
backend redis
    server redis 127.0.0.1:{redis_port}
""")
    procs.start(["haproxy", "-f", str(scratch / "haproxy.cfg")])

    (scratch / "nutcracker.yml").write_text(f"""eden:
  listen: 127.0.0.1:{ports['twemproxy']}
  redis: true
  preconnect: true
  server_connections: 1
  servers:
   - 127.0.0.1:{redis_port}:1
""")
    procs.start(["nutcracker", "-c", str(scratch / "nutcracker.yml"), "-s", str(free_port()), "-o", str(scratch / "nutcracker.log")])
    for port in ports.values():
        wait_port(port)

    idle_rss = rss_kib(eden.pid)
    rounds = {name: [] for name in ports}
    for round_number in range(ROUNDS):
        for name, port in ports.items():
            print(f"round {round_number + 1}/{ROUNDS}: {name}", file=sys.stderr)
            rounds[name].append(measure(port))
    results = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}

    clients = []
    for _ in range(IDLE_CLIENTS):
        clients.append(socket.create_connection(("127.0.0.1", ports["eden-sidecar"])))
    time.sleep(0.5)
    loaded_rss = rss_kib(eden.pid)
    for client in clients:
        client.close()

    ready_ms = time_to_ready(sidecar, procs, redis_port)
    report = render(results, idle_rss, loaded_rss, ready_ms)
    print(report)
    write_benchmarks(report)
    return 0


def time_to_ready(sidecar, procs, redis_port):
    """Milliseconds from exec to /readyz answering 200, median of 5 starts."""
    samples = []
    for _ in range(5):
        listen, admin = free_port(), free_port()
        started = time.monotonic()
        child = procs.start([sidecar, "--listen", f"127.0.0.1:{listen}", "--admin-listen", f"127.0.0.1:{admin}",
                             "--source", f"redis://127.0.0.1:{redis_port}"])
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=0.2).status == 200:
                    break
            if time.monotonic() - started > 10:
                raise RuntimeError("sidecar not ready within 10s")
            time.sleep(0.001)
        samples.append(1000 * (time.monotonic() - started))
        child.terminate()
        child.wait(timeout=5)
    return statistics.median(samples)


def version(args):
    out = subprocess.run(args, capture_output=True, text=True).stdout + subprocess.run(args, capture_output=True, text=True).stderr
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def render(results, idle_rss, loaded_rss, ready_ms):
    direct = results["direct"]
    haproxy = results["haproxy"]
    twemproxy = results["twemproxy"]
    eden = results["eden-sidecar"]

    def ratio(name, key):
        return results[name][key] / direct[key]

    lines = [
        f"Measured {datetime.date.today()} on {os.cpu_count()} cores; {version(['redis-server', '--version'])}; "
        f"{version(['haproxy', '-v'])}; {version(['nutcracker', '--version'])}.",
        f"Command: `make bench` (bench/proxy.py; {ROUNDS} interleaved rounds, median; {REQUESTS} requests per "
        f"throughput test, {LATENCY_REQUESTS} for single-client latency; 50 clients; SET/GET).",
        "",
        "| target | SET rps | GET rps | ratio | SET rps -P16 | GET rps -P16 | ratio -P16 | p50 µs (1 client) | p99 µs | p50 added µs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        plain = (ratio(name, "set") + ratio(name, "get")) / 2
        piped = (ratio(name, "set_p16") + ratio(name, "get_p16")) / 2
        lines.append(
            f"| {name} | {r['set']:.0f} | {r['get']:.0f} | {plain:.2f}× | {r['set_p16']:.0f} | {r['get_p16']:.0f} | "
            f"{piped:.2f}× | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['p50_us'] - direct['p50_us']:+.0f} |")

    def piped_throughput(r):
        return r["set_p16"] + r["get_p16"]

    vs_haproxy = piped_throughput(eden) / piped_throughput(haproxy)
    vs_twemproxy = piped_throughput(eden) / piped_throughput(twemproxy)
    eden_added = eden["p50_us"] - direct["p50_us"]
    haproxy_added = haproxy["p50_us"] - direct["p50_us"]
    targets = [
        ("pipelined throughput ≥ 0.9× HAProxy's", f"{vs_haproxy:.2f}×", vs_haproxy >= 0.9),
        ("pipelined throughput ≥ 2× twemproxy's", f"{vs_twemproxy:.2f}×", vs_twemproxy >= 2.0),
        ("single-client p50 added ≤ HAProxy's", f"{eden_added:+.0f} µs vs {haproxy_added:+.0f} µs", eden_added <= haproxy_added),
        ("idle RSS ≤ 10 MiB", f"{idle_rss / 1024:.1f} MiB", idle_rss <= 10 * 1024),
        (f"RSS with {IDLE_CLIENTS} idle clients ≤ 40 MiB", f"{loaded_rss / 1024:.1f} MiB", loaded_rss <= 40 * 1024),
        ("ready < 50 ms after exec", f"{ready_ms:.1f} ms", ready_ms < 50),
    ]
    lines += ["", "| target (issue 3) | measured | |", "|---|---|---|"]
    lines += [f"| {what} | {value} | {'PASS' if ok else 'MISS'} |" for what, value, ok in targets]
    lines += ["", "p50/p99 from redis-benchmark's histogram (its precision is about 8 µs at these latencies)."]
    return "\n".join(lines)


def write_benchmarks(report):
    path = REPO / "BENCHMARKS.md"
    begin, end = "<!-- proxy:begin -->", "<!-- proxy:end -->"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEvery figure is measured on the project's 2-core machine, in one run, as a ratio against a "
        "baseline taken in the same run (the machine is shared and noisy, so absolute numbers move between runs).\n")
    section = f"{begin}\n## Sidecar proxy overhead\n\n{report}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
