"""IP pools through a real Temporal server: concurrency, restarts, continue-as-new, refusals."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowFailureError
from temporalio.common import RetryPolicy
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.ipam import IpamActivities
from domain.ipam import (
    AllocateAddresses,
    AllocateRequest,
    AllocateResult,
    IpPoolSpec,
    ListAddresses,
    ReleaseAddresses,
)
from starters.client import KubegateClient, KubegateError
from tests.support import record_history
from workflows.ip_pool import IpPoolWorkflow

pytestmark = pytest.mark.integration


def unique_gateway() -> str:
    return f"gw-{uuid.uuid4().hex[:8]}"


def pool_spec(gateway: str, **changes: Any) -> IpPoolSpec:
    data: dict[str, Any] = {
        "name": "pool-a",
        "gateway": gateway,
        "kind": "subnet",
        "subnet": "10.50.0.0/24",
        "network_gateway": "10.50.0.1",
        "nameservers": ["10.50.0.2"],
    }
    return IpPoolSpec.model_validate({**data, **changes})


async def test_allocate_release_and_reuse(kubegate: KubegateClient) -> None:
    gw = unique_gateway()
    created = await kubegate.create_pool(pool_spec(gw))
    # 254 hosts less the network gateway and the name server (never handed out)
    assert (created.capacity, created.used) == (252, 0)

    first = await kubegate.allocate(gw, "pool-a", "cluster/a", ["vip", "cp-0", "cp-1"])
    again = await kubegate.allocate(gw, "pool-a", "cluster/a", ["vip", "cp-0", "cp-1"])
    assert first.addresses == again.addresses  # idempotent
    assert first.prefix == 24 and first.network_gateway == "10.50.0.1"

    await kubegate.release(gw, "pool-a", "cluster/a", ["cp-1"])
    status = await kubegate.pool_status(gw, "pool-a")
    assert status.used == 2
    await kubegate.release(gw, "pool-a", "cluster/a")
    later = await kubegate.allocate(gw, "pool-a", "cluster/b", ["n0", "n1", "n2"])
    assert set(later.addresses.values()) == set(first.addresses.values())  # they came back
    await record_history(kubegate.client, kubegate.pool_handle(gw, "pool-a").id, "ippool_live")


async def test_fifty_concurrent_allocators_get_distinct_addresses(
    kubegate: KubegateClient,
) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(pool_spec(gw, subnet="10.51.0.0/22", network_gateway="10.51.0.1"))

    results = await asyncio.gather(
        *(
            kubegate.allocate(gw, "pool-a", f"cluster/c{i}", ["vip", "cp-0", "cp-1", "w-0"])
            for i in range(50)
        )
    )
    addresses = [a for r in results for a in r.addresses.values()]
    assert len(addresses) == 200 == len(set(addresses))
    network = ipaddress.ip_network("10.51.0.0/22")
    assert all(ipaddress.ip_address(a) in network for a in addresses)
    assert "10.51.0.1" not in addresses and "10.51.0.0" not in addresses
    allocations = await kubegate.pool_allocations(gw, "pool-a")
    assert {a.address for a in allocations} == set(addresses)


async def test_restricted_pool_refuses_a_second_cluster_naming_the_first(
    kubegate: KubegateClient,
) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(pool_spec(gw, restrict_to_single_cluster=True))
    await kubegate.allocate(gw, "pool-a", "cluster/first", ["vip"])

    with pytest.raises(KubegateError, match="belongs to cluster/first"):
        await kubegate.allocate(gw, "pool-a", "cluster/second", ["vip"])
    assert (await kubegate.pool_status(gw, "pool-a")).claimed_by == "cluster/first"


async def test_out_of_addresses_states_free_and_requested_and_allocates_nothing(
    kubegate: KubegateClient,
) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(
        pool_spec(
            gw,
            kind="range",
            subnet=None,
            first="10.52.0.10",
            last="10.52.0.14",
            prefix=24,
            network_gateway="10.52.0.1",
        )
    )
    await kubegate.allocate(gw, "pool-a", "cluster/a", ["a", "b", "c"])
    with pytest.raises(KubegateError, match="2 free address\\(es\\), 4 requested"):
        await kubegate.allocate(gw, "pool-a", "cluster/b", ["a", "b", "c", "d"])
    status = await kubegate.pool_status(gw, "pool-a")
    assert status.used == 3 and "cluster/b" not in status.owners


async def test_delete_is_refused_while_allocations_exist(kubegate: KubegateClient) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(pool_spec(gw))
    await kubegate.allocate(gw, "pool-a", "cluster/a", ["vip"])

    with pytest.raises(KubegateError, match="held by cluster/a"):
        await kubegate.delete_pool(gw, "pool-a")
    await kubegate.release(gw, "pool-a", "cluster/a")
    await kubegate.delete_pool(gw, "pool-a")
    await record_history(kubegate.client, kubegate.pool_handle(gw, "pool-a").id, "ippool_deleted")
    with pytest.raises(KubegateError, match="does not exist"):
        await kubegate.pool_status(gw, "pool-a")
    assert (await kubegate.create_pool(pool_spec(gw))).used == 0  # the name is free again


async def test_overlapping_and_duplicate_pools_are_refused(kubegate: KubegateClient) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(pool_spec(gw))
    with pytest.raises(KubegateError, match="already exists"):
        await kubegate.create_pool(
            pool_spec(gw, subnet="10.60.0.0/24", network_gateway="10.60.0.1")
        )
    with pytest.raises(KubegateError, match="overlaps pool pool-a"):
        await kubegate.create_pool(
            pool_spec(
                gw,
                name="pool-b",
                kind="range",
                subnet=None,
                first="10.50.0.200",
                last="10.50.1.10",
                prefix=23,
                network_gateway="10.50.0.1",
            )
        )
    # the same range on another gateway is another network: allowed
    assert await kubegate.create_pool(pool_spec(unique_gateway()))


async def test_continue_as_new_keeps_every_allocation(
    kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(
        pool_spec(gw, subnet="10.53.0.0/16", network_gateway="10.53.0.1"),
        continue_as_new_after=60,
    )
    handle = kubegate.pool_handle(gw, "pool-a")
    first_run = (await handle.describe()).run_id

    given: dict[tuple[str, str], str] = {}
    for i in range(100):  # 10,000 allocations, 100 per request
        owner = f"cluster/c{i % 10}"
        slots = [f"n{i}-{j}" for j in range(100)]
        result = await kubegate.allocate(gw, "pool-a", owner, slots)
        given.update({(owner, s): a for s, a in result.addresses.items()})

    assert (await handle.describe()).run_id != first_run  # it continued as new
    status = await kubegate.pool_status(gw, "pool-a")
    assert status.used == 10_000
    stored = await kubegate.pool_allocations(gw, "pool-a")
    assert {(a.owner, a.slot): a.address for a in stored} == given
    assert len(set(given.values())) == 10_000
    # and the pool still answers the same owner and slot with the same address
    again = await kubegate.allocate(gw, "pool-a", "cluster/c3", ["n3-0", "n3-99"])
    assert again.addresses == {
        "n3-0": given[("cluster/c3", "n3-0")],
        "n3-99": given[("cluster/c3", "n3-99")],
    }


async def test_worker_restart_mid_stream_loses_and_duplicates_nothing(
    kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    from workers.control import build_worker

    gw = unique_gateway()
    queue = f"ipam-restart-{uuid.uuid4().hex[:6]}"
    first = build_worker(temporal.client, task_queue=queue)
    first_run = asyncio.create_task(first.run())
    await kubegate.create_pool(
        pool_spec(gw, subnet="10.54.0.0/22", network_gateway="10.54.0.1"), task_queue=queue
    )
    done = 0

    async def stream(n: int) -> list[tuple[str, str, str]]:
        nonlocal done
        got = []
        for i in range(40):
            owner, slot = f"cluster/s{n}", f"node-{i}"
            result = await kubegate.allocate(gw, "pool-a", owner, [slot])
            got.append((owner, slot, result.addresses[slot]))
            done += 1
        return got

    streams = asyncio.gather(*(stream(n) for n in range(5)))

    async def under_way() -> None:
        while done < 60:  # noqa: ASYNC110 - waiting for the stream to be well under way
            await asyncio.sleep(0.01)

    await asyncio.wait_for(under_way(), 60)
    await first.shutdown()  # the only worker of the pool goes away mid-stream
    await first_run
    await asyncio.sleep(0.5)
    async with build_worker(temporal.client, task_queue=queue):
        results = [a for s in await asyncio.wait_for(streams, 120) for a in s]
        stored = await kubegate.pool_allocations(gw, "pool-a")

    assert len(results) == 200
    assert len({address for _, _, address in results}) == 200
    assert {(a.owner, a.slot, a.address) for a in stored} == set(results)


@workflow.defn(sandboxed=False)
class AllocateThroughActivities:
    """Stands in for a cluster workflow: reaches IPAM only through the activities."""

    @workflow.run
    async def run(self, request: AllocateAddresses) -> AllocateResult:
        retry = RetryPolicy(maximum_attempts=3)
        result: AllocateResult = await workflow.execute_activity(
            "allocate_addresses",
            request,
            result_type=AllocateResult,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=retry,
        )
        await workflow.execute_activity(
            "list_addresses",
            ListAddresses(gateway=request.gateway, pool=request.pool, owner=request.owner),
            start_to_close_timeout=timedelta(seconds=30),
        )
        return result


async def test_workflows_allocate_and_release_through_the_activities(
    kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    gw = unique_gateway()
    await kubegate.create_pool(pool_spec(gw, restrict_to_single_cluster=False))
    queue = f"ipam-activities-{uuid.uuid4().hex[:6]}"
    ipam = IpamActivities(temporal.client)
    async with Worker(
        temporal.client,
        task_queue=queue,
        workflows=[AllocateThroughActivities],
        activities=[ipam.allocate_addresses, ipam.release_addresses, ipam.list_addresses],
    ):
        results = await asyncio.gather(
            *(
                temporal.client.execute_workflow(
                    AllocateThroughActivities.run,
                    AllocateAddresses(
                        gateway=gw, pool="pool-a", owner=f"cluster/w{i}", slots=["vip", "cp-0"]
                    ),
                    id=f"alloc-{uuid.uuid4()}",
                    task_queue=queue,
                )
                for i in range(20)
            )
        )
        addresses = [a for r in results for a in r.addresses.values()]
        assert len(addresses) == 40 == len(set(addresses))

        with pytest.raises(WorkflowFailureError) as info:
            await temporal.client.execute_workflow(
                AllocateThroughActivities.run,
                AllocateAddresses(gateway=gw, pool="no-such-pool", owner="cluster/x", slots=["a"]),
                id=f"alloc-{uuid.uuid4()}",
                task_queue=queue,
            )
        assert "PoolNotFound" in repr(info.value.cause.cause)  # type: ignore[union-attr]

    released = await ipam.release_addresses(
        ReleaseAddresses(gateway=gw, pool="pool-a", owner="cluster/w0")
    )
    assert len(released.released) == 2
    assert (await kubegate.pool_status(gw, "pool-a")).used == 38


async def test_a_cancelled_queued_allocation_is_never_sent(
    kubegate: KubegateClient, temporal: WorkflowEnvironment
) -> None:
    from workers.control import build_worker

    gw = unique_gateway()
    queue = f"ipam-cancel-{uuid.uuid4().hex[:6]}"
    async with build_worker(temporal.client, task_queue=queue):
        await kubegate.create_pool(pool_spec(gw), task_queue=queue)
    # no worker now: the first two batches wait in flight, the third request waits queued
    first = asyncio.create_task(kubegate.allocate(gw, "pool-a", "cluster/a", ["vip"]))
    await asyncio.sleep(0.3)
    second = asyncio.create_task(kubegate.allocate(gw, "pool-a", "cluster/b", ["vip"]))
    await asyncio.sleep(0.3)
    queued = asyncio.create_task(kubegate.allocate(gw, "pool-a", "cluster/x", ["vip"]))
    await asyncio.sleep(0.3)
    queued.cancel()  # e.g. the cluster was aborted
    with pytest.raises(asyncio.CancelledError):
        await queued
    release = asyncio.create_task(kubegate.release(gw, "pool-a", "cluster/x"))
    async with build_worker(temporal.client, task_queue=queue):
        await asyncio.wait_for(asyncio.gather(first, second, release), 60)
        await asyncio.sleep(0.5)  # anything still queued would land now
        status = await kubegate.pool_status(gw, "pool-a")
    assert status.owners == ["cluster/a", "cluster/b"]  # nothing leaked to cluster/x


async def test_concurrent_updates_across_continue_as_new_lose_nothing(
    kubegate: KubegateClient,
) -> None:
    from plumbing.updates import send_update

    gw = unique_gateway()
    await kubegate.create_pool(
        pool_spec(gw, subnet="10.55.0.0/22", network_gateway="10.55.0.1"),
        continue_as_new_after=40,
    )
    handle = kubegate.pool_handle(gw, "pool-a")
    first_run = (await handle.describe()).run_id

    async def one(i: int) -> str:
        request = AllocateRequest(owner=f"cluster/r{i}", slots=["vip"])
        result: AllocateResult = await send_update(
            handle.id, lambda: handle.execute_update(IpPoolWorkflow.allocate, request)
        )
        return result.addresses["vip"]

    # plain updates, not batched: many runs end while updates are in flight
    addresses = await asyncio.gather(*(one(i) for i in range(150)))
    assert len(set(addresses)) == 150
    assert (await handle.describe()).run_id != first_run
    stored = await kubegate.pool_allocations(gw, "pool-a")
    assert {a.address for a in stored} == set(addresses)
