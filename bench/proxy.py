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

Usage:  bench/proxy.py [--sidecar-build-failed] [SIDECAR_BINARY]
        (`make bench` builds the release sidecar and calls this; SIDECAR_BINARY defaults to
        $CARGO_TARGET_DIR/release/eden-sidecar, else $HOME/.cache/eden/target/release/eden-sidecar)

Environment (defaults in brackets):
  BENCH_ROUNDS [5]                   interleaved rounds; the median is reported
  BENCH_REQUESTS [100000]            requests per test, 50 clients, no pipeline
  BENCH_PIPELINED_REQUESTS [200000]  requests per test, 50 clients, -P 16
  BENCH_LATENCY_REQUESTS [20000]     requests per test, 1 client
  BENCH_IDLE_CLIENTS [1000]          idle clients held open for the sidecar's RSS
  BENCH_OUTPUT [BENCHMARKS.md at the repository root]  file to update; "-" for none

Exits non-zero when any target could not be started or measured (after printing what was measured);
BENCHMARKS.md is only rewritten when every target was measured. A MISS against a target figure is a
result, not a failure.
"""

import argparse
import contextlib
import csv
import ctypes
import datetime
import io
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = str(Path.home())


def env_int(name, default):
    return int(os.environ.get(name, default))


ROUNDS = env_int("BENCH_ROUNDS", 5)
REQUESTS = env_int("BENCH_REQUESTS", 100_000)
PIPELINED_REQUESTS = env_int("BENCH_PIPELINED_REQUESTS", 200_000)
LATENCY_REQUESTS = env_int("BENCH_LATENCY_REQUESTS", 20_000)
IDLE_CLIENTS = env_int("BENCH_IDLE_CLIENTS", 1000)
READY_STARTS = 5  # fresh sidecar starts timed for readiness; the median is reported
TARGETS = ["direct", "eden-sidecar", "haproxy", "twemproxy"]
FOOTPRINT = "sidecar footprint"  # failures' key for the RSS and readiness measurements

# (key, clients, pipeline, requests). Only SET and GET: twemproxy proxies a subset of commands.
TESTS = [
    ("plain", 50, 1, REQUESTS),
    ("piped", 50, 16, PIPELINED_REQUESTS),
    ("single", 1, 1, LATENCY_REQUESTS),
]

# The figures issue 3 sets for the sidecar.
IDLE_RSS_MAX_MIB = 10
LOADED_RSS_MAX_MIB = 40
READY_MAX_MS = 50


class BenchError(Exception):
    """A target that could not be started or measured; the message goes into the report."""


def log(message):
    print(message, file=sys.stderr, flush=True)


def shown(path):
    """A path as the report may show it: never this machine's home directory."""
    return str(path).replace(HOME, "$HOME", 1)


# ---------------------------------------------------------------------------------------------
# Tools: Debian packages, installed when missing.

# Command -> Debian package. haproxy and nutcracker live in /usr/sbin, which a non-root PATH lacks.
TOOLS = {"redis-server": "redis-server", "redis-benchmark": "redis-tools", "haproxy": "haproxy",
         "nutcracker": "nutcracker"}
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# Daemons a package's maintainer scripts may start: each is also its package's and its service's
# name, and its /proc/PID/comm.
DAEMONS = {"redis-server", "haproxy", "nutcracker"}


def which(command):
    return shutil.which(command, path=SEARCH_PATH)


def root_prefix():
    return [] if os.geteuid() == 0 else ["sudo"]


def daemon_pids():
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() in DAEMONS:
                    pids.add(int(entry.name))
    return pids


def apt_lists_fresh():
    """`make bench` runs `deps` first, which may just have run apt-get update: don't run it twice."""
    with contextlib.suppress(OSError):
        return time.time() - os.path.getmtime("/var/lib/apt/lists") < 3600
    return False


def ensure_tools():
    """Install the missing tools, then stop whatever service the packages started on their own."""
    packages = sorted({package for command, package in TOOLS.items() if not which(command)})
    if not packages:
        return
    log(f"installing {' '.join(packages)} from Debian packages")
    sudo = root_prefix()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    before = daemon_pids()
    if not apt_lists_fresh():
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, timeout=900,
                   stdout=subprocess.DEVNULL)
    # The benchmark starts its own private instances; a system-wide one would only steal CPU.
    services = [p for p in packages if p in DAEMONS]
    if services and Path("/run/systemd/system").is_dir():
        subprocess.run(sudo + ["systemctl", "disable", "--now", *services], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
    # Without systemd, an init script may have started a daemon anyway: stop exactly the ones that
    # appeared during the install, nothing that was running before.
    for pid in sorted(daemon_pids() - before):
        log(f"stopping pid {pid}, started by the package install")
        subprocess.run(sudo + ["kill", str(pid)], stderr=subprocess.DEVNULL, timeout=10)
    missing = [command for command in TOOLS if not which(command)]
    if missing:
        raise SystemExit(f"still missing after the install: {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Processes: every one this benchmark starts is stopped however the run ends.

def _die_with_parent():
    """Runs in the child: SIGTERM it if this script dies without its cleanup (e.g. SIGKILL)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Processes:
    def __init__(self, scratch):
        self.scratch = scratch
        self.children = []

    def start(self, name, args, env=None):
        """Starts args with output to a log file in the scratch directory; returns the Popen."""
        log_path = self.scratch / f"{name}.log"
        with open(log_path, "ab") as log_file:
            child = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                     env=env, cwd=self.scratch, preexec_fn=_die_with_parent)
        child.log_path = log_path
        self.children.append(child)
        return child

    def stop(self, child):
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=5)

    def stop_all(self):
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        for child in self.children:
            self.stop(child)


def log_tail(child, lines=5):
    with contextlib.suppress(OSError):
        text = child.log_path.read_text(errors="replace").strip()
        if text:
            return " / ".join(text.splitlines()[-lines:])
    return "no output"


def exited(child, what):
    return BenchError(f"{what} exited with status {child.returncode}: {log_tail(child)}")


def raise_on_term(signum, _frame):
    """SIGTERM and SIGHUP unwind like Ctrl-C does, so the cleanup in main() runs."""
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# Talking to the targets.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resp(port, *args, timeout=1.0):
    """One RESP command on a fresh connection; returns the raw reply (a simple line or a bulk)."""
    command = b"".join([f"*{len(args)}\r\n".encode()] + [f"${len(a)}\r\n{a}\r\n".encode() for a in args])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(command)
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
            head, found, body = reply.partition(b"\r\n")
            if found and (not head.startswith(b"$") or len(body) >= max(int(head[1:]) + 2, 0)):
                break
        return reply


def wait_serving(port, child, what, timeout=10.0):
    """Until a SET and GET through the port reach Redis: listening alone doesn't prove the path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise exited(child, what)
        with contextlib.suppress(OSError):
            if resp(port, "SET", "eden-bench:probe", "1") == b"+OK\r\n" and \
                    resp(port, "GET", "eden-bench:probe") == b"$1\r\n1\r\n":
                return
        time.sleep(0.01)
    raise BenchError(f"{what} did not serve SET/GET within {timeout:.0f}s: {log_tail(child)}")


def readyz(admin_port):
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=0.5) as answer:
            return answer.status == 200
    return False


def rss_kib(pid):
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def socket_fds(pid):
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


# ---------------------------------------------------------------------------------------------
# Starting the targets.

def start_redis(procs, port):
    child = procs.start("redis-server", [which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--dir", str(procs.scratch)])
    wait_serving(port, child, "redis-server")
    return child


def sidecar_env():
    """The sidecar reads EDEN_* settings from the environment: keep the caller's out of the run,
    and RUST_LOG too, so that every run logs (and pays for logging) the same."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EDEN_") and k != "RUST_LOG"}


def launch_sidecar(procs, binary, redis_port, name="eden-sidecar"):
    """Starts a sidecar; returns (child, RESP port, admin port, ms from exec to /readyz 200)."""
    port, admin = free_port(), free_port()
    started = time.monotonic()
    child = procs.start(name, [binary, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                               "--source", f"redis://127.0.0.1:{redis_port}"], env=sidecar_env())
    while not readyz(admin):
        if child.poll() is not None:
            raise exited(child, "eden-sidecar")
        if time.monotonic() - started > 10:
            raise BenchError(f"eden-sidecar: /readyz not 200 within 10s: {log_tail(child)}")
        time.sleep(0.001)
    return child, port, admin, 1000 * (time.monotonic() - started)


def start_sidecar(procs, binary, redis_port):
    if not os.access(binary, os.X_OK):
        raise BenchError(f"no sidecar binary at {shown(binary)} (cargo build --release -p eden-sidecar)")
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

def benchmark_args(port, clients, pipeline, requests):
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-n", str(requests),
            "-c", str(clients)]
    if pipeline > 1:
        args += ["-P", str(pipeline)]
    # -r: random keys over 100k, not one hot key; --csv: rps and p50/p99 in ms with µs digits.
    return args + ["-r", "100000", "-q", "--csv"]


def run_benchmark(name, port, clients, pipeline, requests):
    """One redis-benchmark run; returns {"set_rps", "get_rps", "set_p50", ..., "get_p99"} (µs)."""
    args = benchmark_args(port, clients, pipeline, requests)
    # redis-benchmark waits forever when it cannot connect: bound every run.
    timeout = 120 + requests / 500
    try:
        done = subprocess.run([which("redis-benchmark")] + args[1:], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name}: redis-benchmark did not finish within {timeout:.0f}s: {shlex.join(args)}")
    rows = {row.get("test"): row for row in csv.DictReader(io.StringIO(done.stdout))}
    if done.returncode != 0 or "SET" not in rows or "GET" not in rows:
        detail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise BenchError(f"{name}: redis-benchmark failed (status {done.returncode}): {detail}")
    result = {}
    for test in ("SET", "GET"):
        row, key = rows[test], test.lower()
        result[f"{key}_rps"] = float(row["rps"])
        result[f"{key}_p50"] = 1000 * float(row["p50_latency_ms"])
        result[f"{key}_p99"] = 1000 * float(row["p99_latency_ms"])
        if result[f"{key}_rps"] <= 0:
            raise BenchError(f"{name}: redis-benchmark reported no {test} throughput")
    return result


def run_rounds(ports, processes, failures):
    """rounds[target][test] is a list of results, one per round, for the targets still standing."""
    rounds = {name: {test[0]: [] for test in TESTS} for name in ports}
    for number in range(ROUNDS):
        # Rotate who goes first: the first run after a pause sees a slightly different machine.
        order = list(ports)[number % len(ports):] + list(ports)[:number % len(ports)]
        for key, clients, pipeline, requests in TESTS:
            for name in order:
                if name in failures:
                    continue
                log(f"round {number + 1}/{ROUNDS}: {name}, {key} ({clients} clients, -P {pipeline}, -n {requests})")
                try:
                    if processes[name].poll() is not None:
                        raise exited(processes[name], name)
                    rounds[name][key].append(run_benchmark(name, ports[name], clients, pipeline, requests))
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
# Summarising: within-round ratios, then the median over rounds.

def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarise(rounds, name):
    """Medians over rounds for one target; ratios against direct in the same round."""
    runs, direct = rounds[name], rounds["direct"]
    n = min(len(runs[key]) for key, *_ in TESTS)
    if n == 0 or min(len(direct[key]) for key, *_ in TESTS) < n:
        return None
    med = statistics.median
    s = {}
    for key in ("plain", "piped"):
        for op in ("set", "get"):
            s[f"{key}_{op}"] = med(r[f"{op}_rps"] for r in runs[key][:n])
            s[f"{key}_{op}_ratio"] = med(t[f"{op}_rps"] / d[f"{op}_rps"] for t, d in zip(runs[key], direct[key]))
    # Single-client latency: the mean of the SET and GET percentiles of each round.
    def p(result, q):
        return (result[f"set_{q}"] + result[f"get_{q}"]) / 2
    s["p50"] = med(p(r, "p50") for r in runs["single"][:n])
    s["p99"] = med(p(r, "p99") for r in runs["single"][:n])
    s["p50_added"] = med(p(t, "p50") - p(d, "p50") for t, d in zip(runs["single"], direct["single"]))
    return s


def piped_vs(rounds, name, other):
    """Pipelined throughput of one target over another's, round by round (geometric mean of the
    SET and GET ratios), median over rounds; None when either was not measured."""
    ratios = [geomean([a["set_rps"] / b["set_rps"], a["get_rps"] / b["get_rps"]])
              for a, b in zip(rounds[name]["piped"], rounds[other]["piped"])]
    return statistics.median(ratios) if ratios else None


# ---------------------------------------------------------------------------------------------
# Reporting.

def first_match(args, pattern):
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
        found = re.search(pattern, done.stdout + done.stderr)
        if found:
            return found.group(1)
    return "unknown"


def machine_facts(sidecar, built):
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    redis = first_match([which("redis-server"), "--version"], r"v=(\S+)")
    benchmark = first_match([which("redis-benchmark"), "--version"], r"redis-benchmark (\S+)")
    haproxy = first_match([which("haproxy"), "-v"], r"version (\S+)")
    nutcracker = first_match([which("nutcracker"), "--version"], r"nutcracker-(\S+)")
    eden = first_match([sidecar, "--version"], r"eden-sidecar (\S+)") if built else "(did not build)"
    commit = first_match(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], r"(\w+)")
    # Read-only: --no-optional-locks keeps `git status` from refreshing the index behind our back.
    dirty = first_match(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                         "--untracked-files=no", "--", "sidecar", "Cargo.toml", "Cargo.lock"], r"(\S)")
    if dirty != "unknown":
        commit += " plus uncommitted changes to the sidecar"
    return [
        f"nproc {len(os.sched_getaffinity(0))} ({cpu.group(1) if cpu else 'unknown CPU'}), Linux {platform.release()}",
        f"redis-server {redis}", f"redis-benchmark {benchmark}", f"HAProxy {haproxy}", f"nutcracker {nutcracker}",
        f"eden-sidecar {eden}, repository at commit {commit}",
    ]


def invocation(sidecar):
    overrides = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("BENCH_")]
    if os.environ.get("MAKELEVEL"):
        return shlex.join(overrides + ["make", "bench"])
    return shlex.join(overrides + ["bench/proxy.py", shown(sidecar)])


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
    """Every round's figures, so that a reader can see how much the machine moved."""
    lines = ["| target | round | SET / GET rps, 50 clients (ratio) | SET / GET rps, -P 16 (ratio) | p50 / p99 µs |",
             "|---|---|---|---|---|"]
    direct = rounds.get("direct")
    for name in TARGETS:
        if name not in rounds:
            continue
        runs = rounds[name]
        for number, (plain, piped, single) in enumerate(zip(runs["plain"], runs["piped"], runs["single"])):
            cells = []
            for key, result in (("plain", plain), ("piped", piped)):
                base = direct[key][number] if number < len(direct[key]) else None
                ratios = f" ({result['set_rps'] / base['set_rps']:.2f} / {result['get_rps'] / base['get_rps']:.2f})" \
                    if base else ""
                cells.append(f"{result['set_rps']:.0f} / {result['get_rps']:.0f}{ratios}")
            latency = f"{(single['set_p50'] + single['get_p50']) / 2:.0f} / {(single['set_p99'] + single['get_p99']) / 2:.0f}"
            lines.append(f"| {name} | {number + 1} | {cells[0]} | {cells[1]} | {latency} |")
    return lines


def render(args, rounds, failures, footprint, elapsed_s):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command_lines = [shlex.join(benchmark_args("PORT", c, p, n)) for _, c, p, n in TESTS]
    lines = [
        f"Measured {date}, {elapsed_s / 60:.1f} minutes, with `{invocation(args.sidecar)}`.",
        "",
        "Machine: " + "; ".join(machine_facts(args.sidecar, not args.sidecar_build_failed)) + ".",
        "",
        f"{ROUNDS} interleaved rounds; each figure is the median over rounds, and each ratio is against "
        "direct Redis in the same round. Every target fronts one private redis-server (no persistence) "
        "on loopback; HAProxy in `mode tcp` with one server and no health checks; twemproxy with "
        "`redis: true`, `preconnect: true`, `server_connections: 1`.",
        "",
        *throughput_table(rounds, failures),
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
        "p50/p99 are the mean of the SET and GET percentiles from redis-benchmark's histogram, whose "
        "buckets are 8 µs wide below 1 ms: single-client differences smaller than that are noise. "
        "p50 added is the median over rounds of (target − direct) within a round, so it need not equal "
        "the difference of the two medians shown.",
        "",
        "<details><summary>Every round</summary>",
        "",
        *rounds_table(rounds),
        "",
        "</details>",
    ]
    return "\n".join(lines)


BEGIN, END = "<!-- proxy:begin -->", "<!-- proxy:end -->"
HEADER = """# Benchmarks

Every figure here is measured on the project's machine (2 cores, shared and noisy) and reported
against a baseline measured in the same run, as a ratio: absolute numbers move from run to run,
ratios much less. Each section below belongs to one benchmark, which rewrites it between its own
markers; other benchmarks add sections of their own.
"""


def write_section(path, report):
    text = path.read_text() if path.exists() else HEADER
    section = f"{BEGIN}\n## Sidecar proxy overhead (`make bench`, bench/proxy.py)\n\n{report}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


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

    output = os.environ.get("BENCH_OUTPUT", str(REPO / "BENCHMARKS.md"))
    if failures:
        log(f"\n{len(failures)} target(s) failed: {', '.join(failures)}; BENCHMARKS.md left as it was")
        return 1
    if output != "-":
        write_section(Path(output), report)
        log(f"\nwrote the proxy section of {shown(output)}")
    return 0


def default_sidecar():
    target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(HOME, ".cache", "eden", "target")
    return os.path.join(target_dir, "release", "eden-sidecar")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sidecar", nargs="?", default=default_sidecar(), help="the eden-sidecar binary")
    parser.add_argument("--sidecar-build-failed", action="store_true",
                        help="report the sidecar as failed to build (and exit non-zero) instead of running it")
    args = parser.parse_args()
    args.sidecar = os.path.abspath(args.sidecar)

    # Unwind (and so clean up) on SIGTERM and SIGHUP as on Ctrl-C, unless the caller chose to
    # ignore one (nohup ignores SIGHUP; a shell ignores SIGINT in background jobs).
    for signum, handler in ((signal.SIGTERM, raise_on_term), (signal.SIGHUP, raise_on_term),
                            (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, handler)
    ensure_tools()
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="eden-bench-") as scratch:
        procs = Processes(Path(scratch))
        try:
            return run(args, procs)
        except BenchError as error:  # direct Redis itself: nothing to measure against
            log(f"FAILED {error}")
            return 1
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
