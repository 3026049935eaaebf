"""One large cluster: wall time against vCenter's host-limited bound (issue 14, item 5).

    uv run python -m bench.large [--nodes 100] [--delays clone=10000,...] [--keep] [--json]

The deploy benchmark's stack (bench/deploy.py: vcsim with 2 compute clusters x 3 hosts behind
the counting proxy, a Temporal dev server, the control worker and the gateway agent as
processes) and one cluster of 3 control-plane nodes + (N - 3) workers over both compute
clusters, clones of 10 s. vCenter lets each host run `KUBEGATE_MAX_OPS_PER_HOST` (8)
operations at once, so with 6 hosts the clones go in waves of 48:

    host-limited bound = ceil(N / (8 x 6)) x (CloneVM_Task + ReconfigVM_Task)
                         + PowerOnVM_Task (the first node) + PowerOnMultiVM_Task (the joiners)

An agent bounded by its threads (32 before issue 14) needs ceil(N / 32) waves instead. The
report gives the wall time, the bound, their ratio (target: within 1.25x), and the most clones
the proxy saw in flight at once (a clone is in flight from its request for its configured delay).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.deploy import cluster_spec, print_phase, run_phase, start_stack
from bench.vcproxy import parse_delays
from domain.lifecycle import ClusterStatus
from plumbing.settings import Settings

#: the simulator's inventory (bench.vcproxy.start_simulator): 2 compute clusters x 3 hosts
HOSTS = 6
#: an agent whose waits held threads had this many (KUBEGATE_AGENT_THREADS before issue 14)
THREADS_BEFORE = 32
DELAYS = (
    "clone=10000,reconfigure=300,customize=300,poweron=500,poweronmulti=500,"
    "poweroff=500,destroy=500"
)


def most_in_flight(starts: list[float], seconds: float) -> int:
    """The most intervals [start, start + seconds) that overlap at one moment."""
    edges = sorted([(s, 1) for s in starts] + [(s + seconds, -1) for s in starts])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


async def main(nodes: int, delays: dict[str, int], keep: bool, as_json: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="kubegate-bench-large-"))
    per_host = Settings().max_ops_per_host
    threads = THREADS_BEFORE
    clone = delays.get("CloneVM_Task", 0) / 1000
    node_tasks = clone + delays.get("ReconfigVM_Task", 0) / 1000
    tail = (delays.get("PowerOnVM_Task", 0) + delays.get("PowerOnMultiVM_Task", 0)) / 1000
    waves = math.ceil(nodes / (per_host * HOSTS))
    bound = waves * node_tasks + tail
    thread_bound = math.ceil(nodes / threads) * node_tasks + tail
    out = sys.stderr if as_json else sys.stdout
    report: dict[str, Any] = {
        "nodes": nodes,
        "delays_ms": delays,
        "hosts": HOSTS,
        "max_ops_per_host": per_host,
        "thread_bound_threads": threads,
        "host_limited_bound_seconds": bound,
        "thread_limited_bound_seconds": thread_bound,
    }
    print(
        f"{nodes} nodes, {HOSTS} hosts x {per_host} operations: host-limited bound "
        f"{waves} x {node_tasks:.1f} + {tail:.1f} = {bound:.1f} s (an agent bounded by "
        f"{threads} threads: {thread_bound:.1f} s); load {os.getloadavg()[0]:.2f}",
        file=out,
    )
    stack = await start_stack(work, delays)
    ok = False
    try:
        phase, _ = await run_phase(
            stack,
            f"deploy {nodes}",
            ["big-1"],
            bound,
            delete=False,
            spec=lambda name: cluster_spec(name, workers=nodes - 3),
        )
        with contextlib.redirect_stdout(out):
            print_phase(phase, [])
        ok = phase.states[0].status is ClusterStatus.RUNNING
        starts = [sent for sent, method, _, _ in phase.log if method == "CloneVM_Task"]
        most = most_in_flight(starts, clone)
        report.update(
            wall_seconds=phase.wall,
            ratio=phase.wall / bound,
            status=phase.states[0].status.value,
            clones=len(starts),
            most_clones_in_flight=most,
            requests=phase.requests.total,
            requests_per_node=phase.requests.total / nodes,
            cpu_seconds=phase.cpu,
            load_after=os.getloadavg()[0],
        )
        print(
            f"\n{nodes} nodes: wall {phase.wall:.1f} s = {phase.wall / bound:.2f} x the "
            f"host-limited bound {bound:.1f} s; clones {len(starts)}, at most {most} in "
            f"flight; {phase.requests.total / nodes:.1f} requests per node; "
            f"load {os.getloadavg()[0]:.2f}",
            file=out,
        )
        if not keep and ok:
            off, destroy = delays.get("PowerOffVM_Task", 0), delays.get("Destroy_Task", 0)
            delete_bound = (off + 2 * destroy) / 1000
            phase, _ = await run_phase(stack, "delete 1", ["big-1"], delete_bound, delete=True)
            with contextlib.redirect_stdout(out):
                print_phase(phase, [])
            report["delete_seconds"] = phase.wall
    finally:
        await stack.stop()
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100, help="nodes of the cluster (>= 4)")
    parser.add_argument("--delays", default=DELAYS, help="task delays in ms (bench.deploy)")
    parser.add_argument("--keep", action="store_true", help="skip the delete")
    parser.add_argument("--json", action="store_true", help="JSON on stdout (report on stderr)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.nodes, parse_delays(args.delays), args.keep, args.json)))
