#!/usr/bin/env python3
"""A routed session against the plain proxy: what routing costs a client before any read moves.

From the moment a Migration exists every sidecar runs a routed session, even while the strategy
still sends everything to the source. Two sidecars of the same binary in front of one private
redis-server: a plain proxy (no config), and one with `--config FILE` at `read_percentage: 0`,
`dual_write`, `old_authoritative`, no mirror (a second redis-server as target, which serves
nothing). redis-benchmark SET and GET, 50 clients with -P 16, and one client without a pipeline.

The machine is shared and noisy (2 cores): each test is cut into slices, both sidecars run each
slice back to back (in a rotating order), the ratio routed / plain is taken within a slice (the
geometric mean of the SET and GET ratios), and the median over every slice of every round is
reported.

Usage:  bench/routed.py [--sidecar-build-failed] [SIDECAR_BINARY]

Environment (defaults in brackets):
  BENCH_ROUNDS [5]                   interleaved rounds
  BENCH_PIPELINED_REQUESTS [1000000] requests per round, 50 clients, -P 16, split into slices
  BENCH_PIPELINED_SLICES [4]         slices of the pipelined test per round
  BENCH_LATENCY_REQUESTS [20000]     requests per round, 1 client, split into slices
  BENCH_LATENCY_SLICES [8]           slices of the single-client test per round
  BENCH_OUTPUT [BENCHMARKS.md at the repository root]  file to update; "-" for none

Exits non-zero when something could not be started or measured; BENCHMARKS.md is then left as it
was. A MISS against the target figure is a result, not a failure.
"""

import datetime
import shlex
import statistics
import sys
import time

from common import (BenchError, bench_main, benchmark_args, check_built, env_int, exited, geomean, invocation,
                    launch_sidecar, log, log_tail, machine_facts, parse_args, passed, payload, publish, redis_benchmark,
                    start_source_and_target, wait_serving)

ROUNDS = env_int("BENCH_ROUNDS", 5)
PIPELINED_REQUESTS = env_int("BENCH_PIPELINED_REQUESTS", 1_000_000)
PIPELINED_SLICES = env_int("BENCH_PIPELINED_SLICES", 4)
LATENCY_REQUESTS = env_int("BENCH_LATENCY_REQUESTS", 20_000)
LATENCY_SLICES = env_int("BENCH_LATENCY_SLICES", 8)

TARGETS = ["plain proxy", "routed"]
# (key, label, clients, pipeline, requests per slice, slices per round)
TESTS = [
    ("piped", "50 clients, -P 16", 50, 16, max(1, PIPELINED_REQUESTS // PIPELINED_SLICES), PIPELINED_SLICES),
    ("single", "1 client", 1, 1, max(1, LATENCY_REQUESTS // LATENCY_SLICES), LATENCY_SLICES),
]

# The figure issue 19 sets: a routed session within 10 % of the plain proxy.
MIN_RATIO = 0.9


def start_sidecars(procs, binary, source_port, target_port):
    """Returns {target: (process, port)}."""
    config = procs.scratch / "eden.yaml"
    config.write_text(payload(1, source_port, target_port))
    plain, plain_port, _, _ = launch_sidecar(procs, binary, source_port, name="eden-sidecar-plain")
    routed, routed_port, _, _ = launch_sidecar(procs, binary, source_port, "--config", str(config),
                                               name="eden-sidecar-routed")
    wait_serving(plain_port, plain, "eden-sidecar (plain proxy)")
    wait_serving(routed_port, routed, "eden-sidecar (routed)")
    return {"plain proxy": (plain, plain_port), "routed": (routed, routed_port)}


def run_slices(sidecars):
    """slices[test] is a list of {target: result}, one per slice, both targets back to back."""
    slices = {key: [] for key, *_ in TESTS}
    for number in range(ROUNDS):
        for key, label, clients, pipeline, requests, runs in TESTS:
            for part in range(runs):
                turn = (number * runs + part) % len(TARGETS)
                pair = {}
                for name in TARGETS[turn:] + TARGETS[:turn]:
                    process, port = sidecars[name]
                    if process.poll() is not None:
                        raise exited(process, name)
                    log(f"round {number + 1}/{ROUNDS}: {name}, {label}, slice {part + 1}/{runs}")
                    pair[name] = redis_benchmark(name, benchmark_args(port, "set,get", clients, pipeline, requests))
                slices[key].append(pair)
    return slices


def ratio(pair):
    """Routed over plain within one slice: the geometric mean of the SET and GET throughput ratios."""
    routed, plain = pair["routed"], pair["plain proxy"]
    return geomean([routed["set_rps"] / plain["set_rps"], routed["get_rps"] / plain["get_rps"]])


def p50(result):
    return (result["set_p50"] + result["get_p50"]) / 2


def render(args, slices, elapsed_s):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    med = statistics.median
    lines = [
        f"Measured {date}, {elapsed_s / 60:.1f} minutes, with `{invocation('routed.py', args.sidecar)}`.",
        "",
        "Machine: " + "; ".join(machine_facts(args.sidecar, tools=("redis-server", "redis-benchmark"))) + ".",
        "",
        "Two sidecars of the same binary in front of one redis-server: a plain proxy (no config), and one "
        "with `--config FILE`: `read_percentage: 0`, `write_mode: dual_write`, `write_policy: old_authoritative`, "
        "`mirror_writes: false` (a routed session that sends everything to the source). Median over "
        f"{ROUNDS} rounds of slices; each ratio is routed / plain within one slice (geometric mean of SET and GET).",
        "",
        "| test | plain proxy SET / GET rps | routed SET / GET rps | routed / plain | p50 µs plain / routed |",
        "|---|---|---|---|---|",
    ]
    for key, label, *_ in TESTS:
        pairs = slices[key]
        rps = {name: (med(p[name]["set_rps"] for p in pairs), med(p[name]["get_rps"] for p in pairs))
               for name in TARGETS}
        lines.append(
            f"| {label} | {rps['plain proxy'][0]:.0f} / {rps['plain proxy'][1]:.0f} "
            f"| {rps['routed'][0]:.0f} / {rps['routed'][1]:.0f} | {med(ratio(p) for p in pairs):.2f}× "
            f"| {med(p50(p['plain proxy']) for p in pairs):.0f} / {med(p50(p['routed']) for p in pairs):.0f} |")
    lines += ["", "| target (issue 19) | measured | |", "|---|---|---|"]
    for key, label, *_ in TESTS:
        measured = med(ratio(p) for p in slices[key])
        lines.append(f"| routed throughput ≥ {MIN_RATIO:g}× the plain proxy's, {label} | {measured:.2f}× "
                     f"| {passed(measured >= MIN_RATIO)} |")
    lines += ["", "Each slice runs, on each sidecar (PORT):", "", "```"]
    lines += [shlex.join(benchmark_args("PORT", "set,get", clients, pipeline, requests)) + f"  # {runs} slices a round"
              for _, _, clients, pipeline, requests, runs in TESTS]
    lines.append("```")
    return "\n".join(lines)


def run(args, procs):
    started = time.monotonic()
    check_built(args)
    source_port, target_port = start_source_and_target(procs)
    sidecars = start_sidecars(procs, args.sidecar, source_port, target_port)
    slices = run_slices(sidecars)
    for name, (process, _) in sidecars.items():
        if process.poll() is not None:
            raise BenchError(f"{name} exited during the run: {log_tail(process)}")
    report = render(args, slices, time.monotonic() - started)
    print(report, flush=True)
    publish("routed", "Routed session against the plain proxy (`make bench`, bench/routed.py)", report)
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(run, parse_args(__doc__), ["redis-server", "redis-benchmark"]))
