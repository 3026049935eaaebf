"""The agent's guard refuses an audit removal of anything a live lifecycle of its gateway
owns, or anything unmarked, whatever the workflow asking says (activities/guard.py)."""

from __future__ import annotations

from activities.guard import removal_problems
from domain.audit import AuditItem, RemovalRequest, is_audit_id
from domain.trust import AgentAuthorization


def auth(status: str = "Running") -> AgentAuthorization:
    return AgentAuthorization(
        gateway="lab",
        status=status,
        lifecycles=["gateway/lab", "cluster/live", "audit/lab/20260101t000000-abc123"],
    )


def request(*items: AuditItem) -> list[RemovalRequest]:
    return [
        RemovalRequest.model_construct(
            credentials=None, account="lab-default", datacenter="DC0", items=list(items)
        )
    ]


def item(kind: str, owner: str, id: str = "VirtualMachine:vm-1") -> AuditItem:
    return AuditItem(kind=kind, id=id, name="x", owner=owner)  # type: ignore[arg-type]


def test_items_of_gone_owners_pass() -> None:
    args = request(item("vm", "cluster/ghost"), item("file", "cluster/ghost", "[ds] ghost-cp-0"))
    assert removal_problems(auth(), args) == []


def test_a_live_clusters_vm_folder_or_file_is_refused() -> None:
    for kind in ("vm", "folder", "file"):
        (problem,) = removal_problems(auth(), request(item(kind, "cluster/live")))
        assert "cluster/live is a live lifecycle" in problem


def test_the_gateways_own_nodes_are_refused() -> None:
    assert removal_problems(auth(), request(item("vm", "gateway/lab")))


def test_unmarked_items_and_allocations_are_refused() -> None:
    assert removal_problems(auth(), request(item("vm", "")))
    assert removal_problems(auth(), request(item("allocation", "cluster/ghost", "p:x")))


def test_the_gateways_installer_only_once_it_runs() -> None:
    installer = item("installer", "gateway/lab")
    assert removal_problems(auth("Running"), request(installer)) == []
    assert removal_problems(auth("Provisioning"), request(installer))


def test_audit_ids_belong_to_their_gateway() -> None:
    assert is_audit_id("audit/lab/20260101t000000-abc123", "lab")
    assert not is_audit_id("audit/lab/20260101t000000-abc123", "other")
    assert not is_audit_id("cluster/lab", "lab")
    assert not is_audit_id("audit/lab/../x", "lab")


def tag(owner: str, name: str, path: str | None = None) -> AuditItem:
    return AuditItem(
        kind="tag", id="urn:tag:1", name=name, owner=owner, path=path or f"kubegate/{name}"
    )


def test_an_owner_tag_of_a_gone_owner_passes() -> None:
    assert removal_problems(auth(), request(tag("cluster/ghost", "cluster:ghost"))) == []
    assert removal_problems(auth(), request(tag("gateway/old", "gateway-nodes:old"))) == []


def test_a_live_owners_tag_is_refused() -> None:
    (problem,) = removal_problems(auth(), request(tag("cluster/live", "cluster:live")))
    assert "live lifecycle" in problem
    assert removal_problems(auth(), request(tag("gateway/lab", "gateway-nodes:lab")))


def test_only_owner_tags_of_the_kubegate_category_are_deleted() -> None:
    for bad in (
        tag("cluster/ghost", "pool:cp"),
        tag("cluster/ghost", "gateway:lab"),
        tag("cluster/ghost", "cluster:other"),
        tag("cluster/ghost", "cluster:ghost", "kubegate-tags/cluster:ghost"),
        tag("pool/cp", "pool:cp"),
        tag("", "cluster:ghost"),
    ):
        assert removal_problems(auth(), request(bad)), bad


def test_a_vm_found_by_its_tag_gets_the_same_protection() -> None:
    by_tag = AuditItem(
        kind="vm", id="VirtualMachine:vm-2", name="x", owner="cluster/ghost", tag="t"
    )
    assert removal_problems(auth(), request(by_tag)) == []
    live = by_tag.model_copy(update={"owner": "cluster/live"})
    assert removal_problems(auth(), request(live))
    odd = by_tag.model_copy(update={"owner": "pool/cp"})
    assert removal_problems(auth(), request(odd))
