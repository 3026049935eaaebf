"""Preflight cost: vCenter requests and wall time, cold (first login) and warm (cached session).

    uv run python -m bench.preflight [--hosts 3] [--runs 10]

Uses a real simulator and a real Temporal dev server, like the integration tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from activities.guard import write_policy
from activities.vsphere.session import SessionPool
from domain.account import CloudAccountSpec
from domain.names import SEARCH_ATTRIBUTES
from domain.trust import policy_for
from plumbing.codec import ReadableMetadata, data_converter
from plumbing.settings import Settings, tool_path
from starters.client import KubegateClient
from tests.support import ADMIN, PLACEMENT, Vcsim
from workers.control import build_worker
from workers.gateway_agent import build_agent, load_key, policy_path


async def main(hosts: int, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="kubegate-bench-"))
    sim = Vcsim(work, args=["-hosts", str(hosts), "-ntp", "pool.ntp.org"]).start()
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(tool_path("temporal")),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=data_converter(),
        interceptors=[ReadableMetadata()],
    )
    settings = Settings(home=work / "home", temporal_address="unused")
    pool = SessionPool()
    spec = CloudAccountSpec.model_validate(
        {
            "name": "bench",
            "gateway": "bench",
            "vcenter": {
                "server": sim.address,
                "username": ADMIN,
                "thumbprint": sim.thumbprint,
            },
            "placement": PLACEMENT,
        }
    )
    try:
        # the agent as the trust model has it: its key, its policy allowing the simulator
        # (pinned), and gateway "bench" created with its fingerprint and paired (so approved);
        # not configured, so that the first account check is the first login (cold)
        key = load_key(settings, "bench")
        policy = policy_path(settings, "bench")
        write_policy(policy, policy_for("bench", spec.vcenter.endpoint()))
        with ThreadPoolExecutor(8) as executor:
            agent = build_agent(env.client, "bench", key, pool, executor, 8, policy=policy)
            async with build_worker(env.client), agent:
                client = KubegateClient(env.client, settings)
                _, code = await client.create_gateway(
                    "bench", system=True, fingerprint=key.fingerprint
                )
                await client.register_agent("bench", key, code)
                samples: list[tuple[float, int]] = []
                for _ in range(runs + 1):
                    start = time.perf_counter()
                    report = await client.validate_account(spec, sim.password)
                    samples.append((time.perf_counter() - start, report.vcenter_requests))
                    assert report.passed
        cold, warm = samples[0], samples[1:]
        print(f"hosts per cluster: {hosts}")
        print(f"cold: {cold[1]} vCenter requests, {cold[0] * 1000:.0f} ms")
        print(
            f"warm: {warm[0][1]} vCenter requests, "
            f"median {statistics.median(s[0] for s in warm) * 1000:.0f} ms over {runs} runs"
        )
        print(f"logins: {pool.logins}")
    finally:
        pool.close_all()
        await env.shutdown()
        sim.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.hosts, args.runs))
