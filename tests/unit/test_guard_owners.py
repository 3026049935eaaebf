"""The agent asks Temporal itself whether an audit's owners are gone (activities/guard.py):
never the audit workflow's word, so a lie about another gateway's live cluster, or a
forged audit, cannot get its VMs removed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.guard import AgentGuard
from domain.audit import AuditItem, RemovalRequest


@dataclass
class Described:
    status: WorkflowExecutionStatus


class Handle:
    def __init__(self, fate: Any) -> None:
        self.fate = fate

    async def describe(self, rpc_timeout: Any = None) -> Described:
        if self.fate is None:
            raise RPCError("not found", RPCStatusCode.NOT_FOUND, b"")
        status, _ = self.fate
        return Described(status)

    async def result(self, rpc_timeout: Any = None) -> Any:
        return self.fate[1]


class Temporal:
    """What Temporal records of each workflow id: None (never ran) or (status, result)."""

    def __init__(self, fates: dict[str, Any]) -> None:
        self.fates = fates

    def get_workflow_handle(self, workflow_id: str, **_: Any) -> Handle:
        return Handle(self.fates.get(workflow_id))


def guard(fates: dict[str, Any]) -> AgentGuard:
    g = AgentGuard.__new__(AgentGuard)
    g.client = Temporal(fates)  # type: ignore[assignment]
    g.gateway_id = "gateway/lab"
    return g


def removal(*items: AuditItem) -> list[Any]:
    return [
        RemovalRequest.model_construct(
            credentials=None, account="a", datacenter="DC0", items=list(items)
        )
    ]


def vm(owner: str, kind: str = "vm") -> AuditItem:
    return AuditItem(kind=kind, id="VirtualMachine:vm-9", name="x", owner=owner)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fate", "refused"),
    [
        (None, False),  # never ran
        ((WorkflowExecutionStatus.COMPLETED, {"status": "Deleted"}), False),
        ((WorkflowExecutionStatus.RUNNING, None), True),  # e.g. another gateway's live cluster
        ((WorkflowExecutionStatus.COMPLETED, {"status": "Running"}), True),
        ((WorkflowExecutionStatus.TERMINATED, None), True),  # ended, not deleted
    ],
)
async def test_an_owner_must_be_gone_by_temporals_own_record(fate: Any, refused: bool) -> None:
    problems = await guard({"cluster/b-prod": fate})._owners_gone(removal(vm("cluster/b-prod")))
    assert bool(problems) is refused, problems


async def test_anything_not_a_lifecycle_is_refused_and_the_own_installer_left_to_the_gateway() -> (
    None
):
    g = guard({"gateway/lab": (WorkflowExecutionStatus.RUNNING, None)})
    assert await g._owners_gone(removal(vm("somebody"))) == ["somebody is no kubegate lifecycle"]
    assert await g._owners_gone(removal(vm("gateway/lab", kind="installer"))) == []
    assert await g._owners_gone(removal(vm("gateway/lab")))  # its nodes: live
