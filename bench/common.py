"""Helpers shared by the benchmarks in this directory (proxy.py, strategy.py, replication.py, cutover.py).

Each benchmark is a script that starts its own private servers on free loopback ports, measures
against a baseline taken in the same run (the machine is shared and noisy), prints a Markdown
report and rewrites its own section of BENCHMARKS.md between its markers. This module holds what
they have in common: installing tools from Debian packages, starting and always stopping child
processes, talking RESP and HTTP on loopback, the local Kubernetes API server, the machine facts and
the section writer.
"""

import argparse
import base64
import contextlib
import csv
import ctypes
import http.client
import io
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = str(Path.home())


def env_int(name, default):
    return int(os.environ.get(name, default))



class BenchError(Exception):
    """A target that could not be started or measured; the message goes into the report."""


def log(message):
    print(message, file=sys.stderr, flush=True)


def shown(path):
    """A path as the report may show it: never this machine's home directory."""
    return str(path).replace(HOME, "$HOME", 1)


# ---------------------------------------------------------------------------------------------
# Tools: Debian packages, installed when missing.

# Command -> Debian package, for every tool a benchmark may need; each script installs its own.
PACKAGES = {"redis-server": "redis-server", "redis-cli": "redis-tools", "redis-benchmark": "redis-tools",
            "haproxy": "haproxy", "nutcracker": "nutcracker"}
# haproxy and nutcracker live in /usr/sbin, which a non-root PATH lacks.
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


def ensure_tools(commands):
    """Install the missing tools among `commands`, then stop whatever service the packages
    started on their own."""
    packages = sorted({PACKAGES[command] for command in commands if not which(command)})
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
    missing = [command for command in commands if not which(command)]
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
    return vm_kib(pid, "VmRSS")


def cpu_seconds(pid):
    """User plus system CPU time a process has used so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    """User plus system CPU time of every waited-for child so far (redis-benchmark's runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def socket_fds(pid):
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count



def http_get(url, timeout=1.0):
    """The body of a plain-HTTP GET (the sidecar's admin port), or None when it can't be had."""
    with contextlib.suppress(OSError):
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return answer.read().decode()
    return None


def vm_kib(pid, field="VmRSS"):
    """A /proc/PID/status figure in KiB: VmRSS (now) or VmHWM (peak so far)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1))


class Conn:
    """One persistent RESP connection, for polling a server many times without reconnecting."""

    def __init__(self, port, timeout=5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("connection closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise BenchError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self.buffer) < size + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise OSError("connection closed")
                self.buffer += chunk
            value, self.buffer = self.buffer[:size], self.buffer[size + 2:]
            return value.decode(errors="replace")
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))] if int(rest) >= 0 else None
        raise BenchError(f"unexpected RESP reply {line!r}")

    def call(self, *args):
        """Sends one command and returns its decoded reply (str, int, list or None)."""
        args = [str(a).encode() for a in args]
        self.sock.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]))
        return self._reply()


def info_fields(conn, section):
    """INFO SECTION as a dict of its `name:value` lines."""
    return dict(line.split(":", 1) for line in conn.call("INFO", section).splitlines() if ":" in line)


# ---------------------------------------------------------------------------------------------
# Starting Redis and the sidecar.

def start_redis(procs, port, *directives, name="redis-server"):
    """A private redis-server without persistence; `directives` are extra `--name value` args."""
    child = procs.start(name, [which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(procs.scratch), *directives])
    wait_serving(port, child, name)
    return child


def start_source_and_target(procs):
    """Two private redis-servers, a migration's source and target; returns their ports."""
    source_port, target_port = free_port(), free_port()
    start_redis(procs, source_port, name="redis-source")
    start_redis(procs, target_port, name="redis-target")
    return source_port, target_port


def sidecar_env(**extra):
    """The sidecar reads EDEN_* settings from the environment: keep the caller's out of the run,
    and RUST_LOG too, so that every run logs (and pays for logging) the same."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDEN_") and k != "RUST_LOG"}
    env.update(extra)
    return env


def launch_sidecar(procs, binary, redis_port, *extra, name="eden-sidecar", env=None):
    """Starts a sidecar (with `extra` arguments); returns (child, RESP port, admin port, ms from
    exec to /readyz 200)."""
    port, admin = free_port(), free_port()
    started = time.monotonic()
    child = procs.start(name, [binary, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                               "--source", f"redis://127.0.0.1:{redis_port}", *extra], env=env or sidecar_env())
    while not readyz(admin):
        if child.poll() is not None:
            raise exited(child, name)
        if time.monotonic() - started > 10:
            raise BenchError(f"{name}: /readyz not 200 within 10s: {log_tail(child)}")
        time.sleep(0.001)
    return child, port, admin, 1000 * (time.monotonic() - started)


def payload(generation, source_port, target_port, read_percentage=0, mirror=False):
    """An eden.yaml (DESIGN §6) of migration eden-bench/bench: dual_write, source authoritative."""
    return "\n".join([
        f"generation: {generation}",
        "migration: eden-bench/bench",
        f'source: {{uri: "redis://127.0.0.1:{source_port}"}}',
        f'target: {{uri: "redis://127.0.0.1:{target_port}"}}',
        f"read_percentage: {read_percentage}",
        "write_mode: dual_write",
        "write_policy: old_authoritative",
        f"mirror_writes: {'true' if mirror else 'false'}",
        "shadow_read_percentage: 0",
        "writes: flowing",
        "",
    ])


def check_built(args):
    """Refuses to run without a sidecar that built (`--sidecar-build-failed`) and exists."""
    if args.sidecar_build_failed:
        raise BenchError("the sidecar did not build (cargo build --release -p eden-sidecar)")
    check_binary(args.sidecar)


def check_binary(binary):
    if not os.access(binary, os.X_OK):
        raise BenchError(f"no sidecar binary at {shown(binary)} (cargo build --release -p eden-sidecar)")


# ---------------------------------------------------------------------------------------------
# redis-benchmark.

def redis_benchmark(name, args, tests=("SET", "GET")):
    """One redis-benchmark run (args from "redis-benchmark" on, with -q --csv); returns
    {"set_rps", "set_p50", "set_p99", ...} for each test (latencies in µs)."""
    requests = int(args[args.index("-n") + 1])
    # redis-benchmark waits forever when it cannot connect: bound every run.
    timeout = 120 + requests / 500
    try:
        done = subprocess.run([which("redis-benchmark")] + args[1:], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{name}: redis-benchmark did not finish within {timeout:.0f}s: {shlex.join(args)}")
    rows = {row.get("test"): row for row in csv.DictReader(io.StringIO(done.stdout))}
    if done.returncode != 0 or any(test not in rows for test in tests):
        detail = " / ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise BenchError(f"{name}: redis-benchmark failed (status {done.returncode}): {detail}")
    result = {}
    for test in tests:
        row, key = rows[test], test.lower()
        result[f"{key}_rps"] = float(row["rps"])
        result[f"{key}_p50"] = 1000 * float(row["p50_latency_ms"])
        result[f"{key}_p99"] = 1000 * float(row["p99_latency_ms"])
        if result[f"{key}_rps"] <= 0:
            raise BenchError(f"{name}: redis-benchmark reported no {test} throughput")
    return result


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def percentile(values, q):
    """The q-th percentile (0-100) by the nearest-rank method: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------------
# Reporting.

def first_match(args, pattern):
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
        found = re.search(pattern, done.stdout + done.stderr)
        if found:
            return found.group(1)
    return "unknown"


def machine_facts(sidecar, built=True, tools=("redis-server",)):
    """The machine, the tools' versions, and the sidecar with the commit it was built from."""
    cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    versions = {
        "redis-server": ([which("redis-server"), "--version"], r"v=(\S+)", "redis-server"),
        "redis-benchmark": ([which("redis-benchmark"), "--version"], r"redis-benchmark (\S+)", "redis-benchmark"),
        "haproxy": ([which("haproxy"), "-v"], r"version (\S+)", "HAProxy"),
        "nutcracker": ([which("nutcracker"), "--version"], r"nutcracker-(\S+)", "nutcracker"),
    }
    facts = [f"nproc {len(os.sched_getaffinity(0))} ({cpu.group(1) if cpu else 'unknown CPU'}), "
             f"Linux {platform.release()}"]
    for tool in tools:
        args, pattern, label = versions[tool]
        facts.append(f"{label} {first_match(args, pattern)}")
    eden = first_match([sidecar, "--version"], r"eden-sidecar (\S+)") if built else "(did not build)"
    commit = first_match(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], r"(\w+)")
    # Read-only: --no-optional-locks keeps `git status` from refreshing the index behind our back.
    dirty = first_match(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                         "--untracked-files=no", "--", "sidecar", "Cargo.toml", "Cargo.lock"], r"(\S)")
    if dirty != "unknown":
        commit += " plus uncommitted changes to the sidecar"
    facts.append(f"eden-sidecar {eden} (release build), repository at commit {commit}")
    return facts


def invocation(script, sidecar):
    """The command that produced a report, as a reader could run it again."""
    overrides = [f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("BENCH_")]
    if os.environ.get("MAKELEVEL"):
        return shlex.join(overrides + ["make", "bench"])
    return shlex.join(overrides + [f"bench/{script}", shown(sidecar)])


HEADER = """# Benchmarks

Every figure here is measured on the project's machine (2 cores, shared and noisy) and reported
against a baseline measured in the same run, as a ratio: absolute numbers move from run to run,
ratios much less. Each section below belongs to one benchmark, which rewrites it between its own
markers; other benchmarks add sections of their own.
"""


def write_section(path, marker, title, report):
    """Rewrites the section between `<!-- MARKER:begin -->` and `<!-- MARKER:end -->`, or appends it."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else HEADER
    section = f"{begin}\n## {title}\n\n{report}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def publish(marker, title, report):
    """Writes `report` as the MARKER section of the output file, unless BENCH_OUTPUT is "-"."""
    output = output_path()
    if output != "-":
        write_section(Path(output), marker, title, report)
        log(f"\nwrote the {marker} section of {shown(output)}")


def benchmark_args(port, tests, clients, pipeline, requests):
    """redis-benchmark's arguments for `tests` (e.g. "set,get") against 127.0.0.1:PORT."""
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", tests, "-n", str(requests),
            "-c", str(clients)]
    if pipeline > 1:
        args += ["-P", str(pipeline)]
    # -r: random keys over 100k, not one hot key; --csv: rps and p50/p99 in ms with µs digits.
    return args + ["-r", "100000", "-q", "--csv"]


def output_path():
    """BENCH_OUTPUT: the file to update, "-" for none; BENCHMARKS.md at the repository root by default."""
    return os.environ.get("BENCH_OUTPUT", str(REPO / "BENCHMARKS.md"))


def passed(ok):
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------------
# The frame every benchmark runs in.

def default_sidecar():
    target_dir = os.environ.get("CARGO_TARGET_DIR") or os.path.join(HOME, ".cache", "eden", "target")
    return os.path.join(target_dir, "release", "eden-sidecar")


def parse_args(doc):
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sidecar", nargs="?", default=default_sidecar(), help="the eden-sidecar binary")
    parser.add_argument("--sidecar-build-failed", action="store_true",
                        help="report the sidecar as failed to build (and exit non-zero) instead of running it")
    args = parser.parse_args()
    args.sidecar = os.path.abspath(args.sidecar)
    return args


def bench_main(run, args, tools):
    """Installs `tools` when missing, then runs run(args, procs) in a scratch directory; every
    process started through `procs` is stopped however the run ends. Returns the exit status."""
    # Unwind (and so clean up) on SIGTERM and SIGHUP as on Ctrl-C, unless the caller chose to
    # ignore one (nohup ignores SIGHUP; a shell ignores SIGINT in background jobs).
    for signum, handler in ((signal.SIGTERM, raise_on_term), (signal.SIGHUP, raise_on_term),
                            (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, handler)
    ensure_tools(tools)
    with tempfile.TemporaryDirectory(prefix="eden-bench-") as scratch:
        procs = Processes(Path(scratch))
        try:
            return run(args, procs)
        except BenchError as error:  # a baseline itself failed: nothing to measure against
            log(f"FAILED {error}")
            return 1
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            procs.stop_all()


# ---------------------------------------------------------------------------------------------
# The local Kubernetes API server (e2e/control-plane) and a minimal client for it.

def start_control_plane(procs):
    """Builds (once) and starts e2e/control-plane; returns its kubeconfig path. It exits when its
    stdin closes, i.e. with this script, and on SIGTERM from the cleanup."""
    build = subprocess.run(["bash", str(REPO / "e2e/control-plane/build.sh")], capture_output=True, text=True,
                           timeout=1800)
    if build.returncode != 0:
        raise BenchError(f"e2e/control-plane/build.sh failed: {build.stderr.strip()[-500:]}")
    binary = build.stdout.strip()
    state = procs.scratch / "control-plane"
    log_path = procs.scratch / "control-plane.log"
    with open(log_path, "ab") as log_file:
        child = subprocess.Popen([binary, "--dir", str(state), "--exit-on-stdin-close"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=log_file, cwd=procs.scratch,
                                 preexec_fn=_die_with_parent)
    child.log_path = log_path
    procs.children.append(child)
    found = {}

    def read_stdout():
        for line in child.stdout:
            if line.startswith(b"ready "):
                found["kubeconfig"] = line[len(b"ready "):].decode().strip()

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + 120
    while "kubeconfig" not in found:
        if child.poll() is not None:
            raise exited(child, "the control plane")
        if time.monotonic() > deadline:
            raise BenchError(f"the control plane was not ready within 120s: {log_tail(child)}")
        time.sleep(0.05)
    return found["kubeconfig"]


class Kube:
    """Just enough of the Kubernetes API for this benchmark, from the admin kubeconfig the control
    plane writes (server, CA data, static token)."""

    def __init__(self, kubeconfig):
        text = Path(kubeconfig).read_text()
        server = urllib.parse.urlsplit(re.search(r"server:\s*(\S+)", text).group(1))
        self.host, self.port = server.hostname, server.port
        ca = base64.b64decode(re.search(r"certificate-authority-data:\s*(\S+)", text).group(1)).decode()
        self.context = ssl.create_default_context(cadata=ca)
        self.token = re.search(r"token:\s*(\S+)", text).group(1)
        self.conn = self.connect()

    def connect(self, timeout=10):
        return http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=timeout)

    def text(self, path):
        """GET `path` as text (the API server's /metrics)."""
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {self.token}"})
        answer = self.conn.getresponse()
        data = answer.read().decode(errors="replace")
        if answer.status != 200:
            raise BenchError(f"GET {path}: HTTP {answer.status}: {data[:300]}")
        return data

    def request(self, method, path, body=None, content_type="application/json", ok=(200, 201)):
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
            body = json.dumps(body)
        try:
            self.conn.request(method, path, body=body, headers=headers)
            answer = self.conn.getresponse()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # one retry on a fresh connection (keep-alive closed by the server)
            self.conn = self.connect()
            self.conn.request(method, path, body=body, headers=headers)
            answer = self.conn.getresponse()
        data = answer.read()
        if answer.status not in ok:
            raise BenchError(f"{method} {path}: HTTP {answer.status}: {data[:300].decode(errors='replace')}")
        return json.loads(data)

    def watch(self, path, on_object):
        """Watches a list path in a thread; on_object(obj, monotonic time) for every event."""
        conn = self.connect(timeout=None)
        separator = "&" if "?" in path else "?"
        conn.request("GET", f"{path}{separator}watch=true",
                     headers={"Authorization": f"Bearer {self.token}", "Accept": "application/json"})
        answer = conn.getresponse()
        if answer.status != 200:
            raise BenchError(f"watch {path}: HTTP {answer.status}: {answer.read()[:300].decode(errors='replace')}")

        def follow():
            while True:
                try:
                    line = answer.readline()
                except (OSError, http.client.HTTPException, ValueError):
                    return
                if not line:
                    return
                now = time.monotonic()
                on_object(json.loads(line).get("object", {}), now)

        threading.Thread(target=follow, daemon=True).start()
