#!/usr/bin/env python3
"""The replication engine's peak memory on one big value, in both modes.

Starts a private source redis-server holding one big value and copies it with
`eden-sidecar replicate --mode sync|scan --once` into a fresh, empty redis-server, once per mode
and value:

  zset    one sorted set of BENCH_ZSET_MEMBERS members (`player:<i>`, score i / 7);
  string  one string of BENCH_STRING_MB MiB of random bytes (APPENDed a MiB at a time, so the
          snapshot holds it uncompressed).

Both servers run with `proto-max-bulk-len 1gb` (a string past the default 512 MB cannot exist
otherwise); the source sends its snapshot diskless (`repl-diskless-sync-delay 0`). The
replicator's peak RSS is its VmHWM (/proc/PID/status), read every 20 ms until it exits; the time
is until it exits after `--once` reports "caught up" (its loop ticks once a second). Each copy is
checked with DEBUG DIGEST-VALUE on both servers, and no `eden:tmp:*` key may be left.

Usage:  bench/big_values.py [--sidecar-build-failed] [SIDECAR_BINARY]

Environment (defaults in brackets):
  BENCH_ZSET_MEMBERS [2000000]  members of the sorted set
  BENCH_STRING_MB [600]         MiB of the string
  BENCH_OUTPUT [BENCHMARKS.md at the repository root]  file to update; "-" for none

Needs about three times the string's size in memory (source, target, the source's fork while it
sends the snapshot). Exits non-zero when something could not be started or measured; a MISS
against the target figure is a result, not a failure.
"""

import contextlib
import datetime
import os
import shlex
import sys
import time

from common import (BenchError, Conn, bench_main, check_built, exited, free_port, invocation, log, log_tail,
                    machine_facts, parse_args, passed, publish, sidecar_env, start_redis, vm_kib)

ZSET_MEMBERS = int(os.environ.get("BENCH_ZSET_MEMBERS", 2_000_000))
STRING_MB = int(os.environ.get("BENCH_STRING_MB", 600))
RUN_TIMEOUT_S = 1800
# The figure issue 15 sets.
MAX_RSS_MIB = 64
SERVER_ARGS = ("--proto-max-bulk-len", "1gb", "--enable-debug-command", "yes")


def raw_call(conn, *args):
    """Conn.call for binary arguments (bytes are sent as they are)."""
    args = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    conn.sock.sendall(b"".join([b"*%d\r\n" % len(args)] + [b"$%d\r\n%s\r\n" % (len(a), a) for a in args]))
    return conn._reply()


def fill_zset(conn):
    for start in range(0, ZSET_MEMBERS, 10_000):
        members = []
        for i in range(start, min(start + 10_000, ZSET_MEMBERS)):
            members += [f"{i / 7:.6f}", f"player:{i}"]
        conn.call("ZADD", "big", *members)
    return f"one sorted set of {ZSET_MEMBERS:,} members"


def fill_string(conn):
    for _ in range(STRING_MB):
        raw_call(conn, "APPEND", "big", os.urandom(1 << 20))
    return f"one string of {STRING_MB} MiB (random bytes)"


def source_with(procs, fill, name):
    port = free_port()
    child = start_redis(procs, port, "--repl-diskless-sync-delay", "0", *SERVER_ARGS, name=name)
    conn = Conn(port, timeout=600)
    conn.call("FLUSHALL")  # the probe key of the readiness check
    what = fill(conn)
    used = int(conn.call("MEMORY", "USAGE", "big", "SAMPLES", "0"))
    conn.close()
    return child, port, what, used


def copy(procs, binary, mode, source_port, label):
    """`replicate --mode MODE --once` into a fresh server; returns (seconds, peak RSS KiB)."""
    port = free_port()
    target_child = start_redis(procs, port, *SERVER_ARGS, name=f"redis-{label}")
    target = Conn(port, timeout=600)
    target.call("FLUSHALL")
    started = time.monotonic()
    child = procs.start(label, [binary, "replicate", "--source", f"redis://127.0.0.1:{source_port}",
                                "--target", f"redis://127.0.0.1:{port}", "--mode", mode, "--once"],
                        env=sidecar_env())
    peak_kib = 0
    while True:
        with contextlib.suppress(OSError, AttributeError):
            peak_kib = max(peak_kib, vm_kib(child.pid, "VmHWM"))
        pid, status = os.waitpid(child.pid, os.WNOHANG)
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - started > RUN_TIMEOUT_S:
            raise BenchError(f"{label}: not caught up within {RUN_TIMEOUT_S}s: {log_tail(child)}")
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    if child.returncode != 0:
        raise exited(child, label)
    source = Conn(source_port, timeout=600)
    expected, copied = source.call("DEBUG", "DIGEST-VALUE", "big"), target.call("DEBUG", "DIGEST-VALUE", "big")
    source.close()
    if expected != copied:
        raise BenchError(f"{label}: the copy differs (digest {copied}, source {expected})")
    if target.call("KEYS", "eden:tmp:*"):
        raise BenchError(f"{label}: a temporary key was left on the target")
    target.close()
    procs.stop(target_child)
    if not peak_kib:
        raise BenchError(f"{label}: no VmHWM read before it exited")
    return elapsed, peak_kib


def render(args, rows, elapsed_s):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Measured {date}, {elapsed_s / 60:.1f} minutes, with `{invocation('big_values.py', args.sidecar)}`.",
        "",
        "Machine: " + "; ".join(machine_facts(args.sidecar)) + ".",
        "",
        "One big value copied from a private redis-server into a fresh, empty one by "
        "`eden-sidecar replicate --mode MODE --once` (default big-value threshold, 16 MiB), each copy "
        "checked with DEBUG DIGEST-VALUE. Both servers have `proto-max-bulk-len 1gb`; the source sends "
        "its snapshot diskless. Peak RSS is the replicator's VmHWM.",
        "",
        "| value | in Redis (MEMORY USAGE) | mode | until exit s | peak RSS | ≤ 64 MiB |",
        "|---|---|---|---|---|---|",
    ]
    for what, used, mode, seconds, peak_kib in rows:
        lines.append(f"| {what} | {used / (1 << 20):.0f} MiB | {mode} | {seconds:.1f} | {peak_kib / 1024:.1f} MiB "
                     f"| {passed(peak_kib / 1024 <= MAX_RSS_MIB)} |")
    lines += [
        "",
        "Each copy (SOURCE holds the value, TARGET is a fresh redis-server):",
        "",
        "```",
        *[shlex.join(["eden-sidecar", "replicate", "--source", "redis://127.0.0.1:SOURCE", "--target",
                      "redis://127.0.0.1:TARGET", "--mode", mode, "--once"]) for mode in ("sync", "scan")],
        "```",
    ]
    return "\n".join(lines)


def run(args, procs):
    started = time.monotonic()
    check_built(args)
    rows = []
    for name, fill in (("zset", fill_zset), ("string", fill_string)):
        log(f"filling the source: {name}")
        source_child, port, what, used = source_with(procs, fill, f"redis-source-{name}")
        for mode in ("sync", "scan"):
            log(f"copying {what} with --mode {mode}")
            seconds, peak_kib = copy(procs, args.sidecar, mode, port, f"{mode}-{name}")
            log(f"  {seconds:.1f} s, peak RSS {peak_kib / 1024:.1f} MiB")
            rows.append((what, used, mode, seconds, peak_kib))
        # Free its memory before the next value.
        procs.stop(source_child)

    report = render(args, rows, time.monotonic() - started)
    print(report, flush=True)
    publish("big-values", "Big values: the replicator's peak memory (bench/big_values.py)", report)
    return 0


def main():
    return bench_main(run, parse_args(__doc__), ["redis-server"])


if __name__ == "__main__":
    sys.exit(main())
