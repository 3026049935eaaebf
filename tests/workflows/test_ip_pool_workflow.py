"""IpPoolWorkflow's own logic on a Temporal dev server of its own: allocations that repeat,
addresses it never hands out, exhaustion, releases only by (or for) their owner, and the
allocations carried across continue-as-new.

Releases of a lifecycle's addresses are confirmed with Temporal by the real control worker
(`confirm_release`: the owner has ended, or its own `releasing` query says so); the gateway
that owns addresses here is a real GatewayWorkflow with the agent's stand-ins."""

from __future__ import annotations

from pathlib import Path

from temporalio.testing import WorkflowEnvironment

from domain import errors, names
from domain.gateway import GatewayStatus
from domain.ipam import (
    AllocateRequest,
    AllocateResult,
    AllocationsQuery,
    IpPoolInput,
    IpPoolSpec,
    ReleaseRequest,
)
from tests.workflows.world import Entity, Gateway, Stage, accepted_updates, runs, unique
from workflows.gateway import GatewayWorkflow
from workflows.ip_pool import IpPoolWorkflow


def small_pool(gateway: str) -> IpPoolSpec:
    """.1 to .6, its gateway .1 and name server .3 inside the range: four addresses to give."""
    return IpPoolSpec(
        name=unique("pool"),
        gateway=gateway,
        kind="range",
        first="10.20.0.1",
        last="10.20.0.6",
        prefix=24,
        network_gateway="10.20.0.1",
        nameservers=["10.20.0.3", "10.99.0.3"],
    )


class Pool(Entity):
    """A pool's workflow on the stage's task queue."""

    def __init__(self, stage: Stage, spec: IpPoolSpec) -> None:
        super().__init__(stage, names.ippool_workflow_id(spec.gateway, spec.name))
        self.spec = spec

    async def start(self, continue_as_new_after: int = 4_000) -> Pool:
        await self.stage.client.start_workflow(
            IpPoolWorkflow.run,
            IpPoolInput(spec=self.spec, continue_as_new_after=continue_as_new_after),
            id=self.handle.id,
            task_queue=self.stage.queue,
        )
        return self

    async def allocate(self, owner: str, *slots: str) -> dict[str, str]:
        result: AllocateResult = await self.update(
            IpPoolWorkflow.allocate, AllocateRequest(owner=owner, slots=list(slots))
        )
        return result.addresses

    async def release(self, owner: str, *slots: str) -> list[str]:
        request = ReleaseRequest(owner=owner, slots=list(slots) or None)
        return list((await self.update(IpPoolWorkflow.release, request)).released)

    async def held(self) -> dict[tuple[str, str], str]:
        """(owner, slot) -> address, as the pool's allocations query says."""
        page = await self.handle.query(IpPoolWorkflow.allocations, AllocationsQuery())
        return {(a.owner, a.slot): a.address for a in page.allocations}


async def test_allocations_repeat_skip_reserved_addresses_and_exhaustion_names_the_pool(
    env: WorkflowEnvironment,
) -> None:
    async with Stage(env) as stage:
        pool = await Pool(stage, small_pool(stage.world.gateway)).start()
        a = await pool.allocate("tool/a", "x", "y")
        assert await pool.allocate("tool/a", "y", "x") == a  # the same owner and slots again
        b = await pool.allocate("tool/b", "p", "q")
        given = [*a.values(), *b.values()]
        # every address but the network's gateway and its name server, each once
        assert sorted(given) == ["10.20.0.2", "10.20.0.4", "10.20.0.5", "10.20.0.6"]

        full = await pool.refused(
            IpPoolWorkflow.allocate, AllocateRequest(owner="tool/c", slots=["z"])
        )
        assert full.type == errors.OUT_OF_ADDRESSES
        assert f"pool {pool.spec.name} has 0 free address(es), 1 requested" in full.message
        # all or nothing: a held slot and a new one, refused whole, the held one kept
        await pool.refused(
            IpPoolWorkflow.allocate, AllocateRequest(owner="tool/a", slots=["x", "w"])
        )
        assert await pool.held() == {
            ("tool/a", "x"): a["x"],
            ("tool/a", "y"): a["y"],
            ("tool/b", "p"): b["p"],
            ("tool/b", "q"): b["q"],
        }

        assert await pool.release("tool/b", "p") == [b["p"]]
        assert await pool.release("tool/b", "p") == []  # again: nothing more
        assert await pool.allocate("tool/c", "z") == {"z": b["p"]}  # given again
        # the refusals never entered the history
        assert await accepted_updates(stage.client, pool.handle.id) == [
            "allocate",
            "allocate",
            "allocate",
            "release",
            "release",
            "allocate",
        ]


async def test_a_lifecycles_addresses_go_back_only_when_it_releases_them(
    env: WorkflowEnvironment, tmp_path: Path
) -> None:
    """Anyone can send `release`: for a lifecycle's addresses the pool asks Temporal first
    (the real control worker). A forged release while the gateway runs is refused; the
    gateway's own, while it is deleted, is confirmed by its `releasing` query."""
    async with Stage(env, real_control=True) as stage:
        pool = await Pool(stage, small_pool(stage.world.gateway)).start()
        gw = Gateway(stage, tmp_path)
        owner = names.gateway_workflow_id(gw.name)
        await gw.running(ip_pool=pool.spec.name)  # its node and VIP from the real pool
        ours = {k: v for k, v in (await pool.held()).items() if k[0] == owner}
        assert len(ours) == 2
        tool = await pool.allocate("tool/x", "a")

        forged = await pool.refused(IpPoolWorkflow.release, ReleaseRequest(owner=owner))
        assert forged.type == errors.NOT_AUTHORIZED
        assert f"{owner} is not releasing from {pool.spec.name}" in forged.message
        # an owner releases only its own: a slot it does not hold is no one's
        assert await pool.release("tool/x", *(slot for _, slot in ours)) == []
        assert await pool.release("tool/x") == [tool["a"]]
        # a lifecycle that does not exist (any more) cannot object: its addresses go back
        ghost = await pool.allocate("cluster/ghost", "cp-0")
        assert await pool.release("cluster/ghost") == [ghost["cp-0"]]
        assert await pool.held() == ours

        await gw.update(GatewayWorkflow.delete)
        final = await gw.handle.result()
        assert final.status is GatewayStatus.DELETED
        assert await pool.held() == {}
        release = next(s for s in final.steps if s.name == "release")
        assert release.state.value == "done", release


async def test_continue_as_new_keeps_every_allocation(env: WorkflowEnvironment) -> None:
    async with Stage(env) as stage:
        spec = IpPoolSpec(
            name=unique("pool"),
            gateway=stage.world.gateway,
            kind="subnet",
            subnet="10.30.0.0/24",
            network_gateway="10.30.0.1",
        )
        pool = await Pool(stage, spec).start(continue_as_new_after=30)
        first_run = (await pool.handle.describe()).run_id
        given: dict[tuple[str, str], str] = {}
        for n in range(40):
            owner = f"tool/o{n}"
            given[(owner, "s")] = (await pool.allocate(owner, "s"))["s"]
            if (await pool.handle.describe()).run_id != first_run:
                break
        else:
            raise AssertionError("the pool never continued as new")
        assert len(await runs(stage.client, pool.handle.id)) >= 2
        assert await pool.held() == given
        again = {key: (await pool.allocate(key[0], key[1]))[key[1]] for key in given}
        assert again == given  # the same owners and slots: the same addresses
        new = await pool.allocate("tool/new", "s")
        assert new["s"] not in given.values()
        status = await pool.handle.query(IpPoolWorkflow.status)
        assert status.used == len(given) + 1
