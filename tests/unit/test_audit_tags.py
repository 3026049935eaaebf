"""The audit's use of vSphere tags: which tags name an owner, which owner a VM is judged by,
and what the agent reads over the vAPI (a fake vAPI session counts the requests)."""

from __future__ import annotations

from typing import Any

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.vsphere import audit as audit_activities
from activities.vsphere.rest import RestError
from activities.vsphere.tags import objects_on_tags, owner_tag_problem, owner_tags
from domain import errors
from domain.audit import InventoryRequest, InventoryResult, MarkedVm, vm_owner
from domain.tags import owner_tag, tag_owner

CAT = "urn:cat:kubegate"


def test_only_owner_tags_name_an_owner() -> None:
    assert tag_owner("cluster:demo") == "cluster/demo"
    assert tag_owner("gateway-nodes:lab") == "gateway/lab"
    for shared in ("pool:cp", "gateway:lab", "k8s-zone:a", "cluster:", "cluster:Bad_Name", "x"):
        assert tag_owner(shared) is None, shared
    for owner in ("cluster/demo", "gateway/lab"):
        assert tag_owner(owner_tag(owner)) == owner


def vm(owner: str = "", **tags: str) -> MarkedVm:
    return MarkedVm(ref="VirtualMachine:vm-1", name="x", owner=owner, tags=tags)


def test_the_extraconfig_mark_wins_over_tags() -> None:
    tagged = vm("cluster/live", **{"cluster/gone": "t1"})
    assert vm_owner(tagged, {"cluster/live"}) == ("cluster/live", "")
    assert vm_owner(tagged, set()) == ("cluster/live", "")


def test_an_unmarked_vm_is_judged_by_its_tag_a_live_owner_first() -> None:
    assert vm_owner(vm(**{"cluster/gone": "t1"}), set()) == ("cluster/gone", "t1")
    both = vm(**{"cluster/gone": "t1", "cluster/live": "t2"})
    assert vm_owner(both, {"cluster/live"}) == ("cluster/live", "t2")
    assert vm_owner(vm(), set()) == ("", "")


class FakeVapi:
    """Categories and tags as vCenter's /rest tagging answers them; counts requests."""

    def __init__(self, tags: dict[str, tuple[str, str]], batch: bool = True) -> None:
        self.tags = tags  # id -> (category id, name)
        self.attached: dict[str, list[dict[str, str]]] = {}
        self.batch = batch
        self.categories = [CAT, "urn:cat:other"]
        self.calls: list[tuple[str, str, str | None]] = []

    def request(
        self, method: str, path: str, body: Any = None, action: str | None = None, **_: Any
    ) -> Any:
        self.calls.append((method, path, action))
        if path == "/com/vmware/cis/tagging/category":
            return self.categories
        if path.startswith("/com/vmware/cis/tagging/category/id:"):
            return {"name": "kubegate" if path.split("id:", 1)[1] == CAT else "other"}
        if action == "list-tags-for-category":
            category = path.split("id:", 1)[1]
            return [i for i, (c, _) in self.tags.items() if c == category]
        if action == "list-attached-objects-on-tags":
            if not self.batch:
                raise RestError(404, "not_found", "")
            return [{"tag_id": t, "object_ids": self.attached.get(t, [])} for t in body["tag_ids"]]
        if action == "list-attached-objects":
            return self.attached.get(path.split("id:", 1)[1], [])
        if method == "GET" and path.startswith("/com/vmware/cis/tagging/tag/id:"):
            tag_id = path.split("id:", 1)[1]
            if tag_id not in self.tags:
                raise RestError(404, "not_found", "")
            category, name = self.tags[tag_id]
            return {"id": tag_id, "name": name, "category_id": category}
        raise AssertionError((method, path, action))


def vapi(batch: bool = True) -> FakeVapi:
    fake = FakeVapi(
        {
            "t-live": (CAT, "cluster:live"),
            "t-gone": (CAT, "cluster:gone"),
            "t-gw": (CAT, "gateway-nodes:lab"),
            "t-pool": (CAT, "pool:cp"),
            "t-gateway": (CAT, "gateway:lab"),
            "t-other": ("urn:cat:other", "cluster:elsewhere"),
        },
        batch,
    )
    fake.attached["t-gone"] = [{"type": "VirtualMachine", "id": "vm-9"}]
    return fake


def test_owner_tags_of_the_kubegate_category_only_with_their_objects() -> None:
    fake, known = vapi(), {"kubegate": CAT, "kubegate/cluster:live": "t-live"}
    found = owner_tags(fake, known)  # type: ignore[arg-type]
    assert [(t.name, t.owner, t.objects) for t in found] == [
        ("cluster:gone", "cluster/gone", ["VirtualMachine:vm-9"]),
        ("gateway-nodes:lab", "gateway/lab", []),
        ("cluster:live", "cluster/live", []),
    ]
    # one listing, a read of each tag not known yet (4: the known one is not read), one batch
    reads = [c for c in fake.calls if c[0] == "GET"]
    assert len(reads) == 4 and len(fake.calls) == 6
    assert known["kubegate/cluster:gone"] == "t-gone"
    again = FakeVapi(fake.tags)
    owner_tags(again, known)  # type: ignore[arg-type]
    assert len(again.calls) == 2  # every name known now: the listing and the batch


def test_without_the_batch_call_one_listing_per_owner_tag() -> None:
    fake = vapi(batch=False)
    found = owner_tags(fake, {"kubegate": CAT})  # type: ignore[arg-type]
    assert {t.name: t.objects for t in found}["cluster:gone"] == ["VirtualMachine:vm-9"]
    singles = [c for c in fake.calls if c[2] == "list-attached-objects"]
    assert len(singles) == 3


def test_no_category_no_tags() -> None:
    fake = FakeVapi({})
    fake.categories = ["urn:cat:other"]
    assert owner_tags(fake, {}) == []  # type: ignore[arg-type]
    assert len(fake.calls) == 2  # the categories, the one not known


def test_a_privilege_missing_for_the_batch_is_not_hidden() -> None:
    fake = vapi()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RestError(403, "unauthorized", "no privilege")

    fake.request = refuse  # type: ignore[method-assign]
    with pytest.raises(RestError):
        objects_on_tags(fake, ["t-gone"])  # type: ignore[arg-type]


def test_an_owner_tag_is_read_again_before_it_counts() -> None:
    fake, known = vapi(), {"kubegate": CAT}
    check = owner_tag_problem
    assert check(fake, known, "t-gone", "cluster:gone", "cluster/gone") is None  # type: ignore[arg-type]
    assert "gone" in str(check(fake, known, "t-nope", "cluster:gone", "cluster/gone"))  # type: ignore[arg-type]
    fake.tags["t-gone"] = (CAT, "cluster:other")
    assert "now named" in str(check(fake, known, "t-gone", "cluster:gone", "cluster/gone"))  # type: ignore[arg-type]
    fake.tags["t-gone"] = ("urn:cat:other", "cluster:gone")
    assert "category" in str(check(fake, known, "t-gone", "cluster:gone", "cluster/gone"))  # type: ignore[arg-type]


class FakeVms:
    """The VM activities' part the inventory uses: the SOAP read answers a marked VM."""

    key = None
    sessions = None

    def _call(self, credentials: Any, context: str, run: Any) -> InventoryResult:
        return InventoryResult(vms=[vm("cluster/ghost")])


@pytest.mark.parametrize(
    ("error", "retryable"),
    [(errors.MISSING_PRIVILEGE, False), (errors.VCENTER_UNREACHABLE, True)],
)
def test_tags_unreadable_the_inventory_goes_by_the_marks_and_says_so(
    monkeypatch: pytest.MonkeyPatch, error: str, retryable: bool
) -> None:
    def refuse(*args: Any) -> Any:
        raise ApplicationError(
            f"read kubegate's tags: {error}", type=error, non_retryable=not retryable
        )

    monkeypatch.setattr(audit_activities, "call_rest", refuse)
    request = InventoryRequest.model_construct(
        credentials=None, account="lab-default", datacenter="DC0"
    )
    activities = audit_activities.AuditActivities(FakeVms())  # type: ignore[arg-type]
    result = ActivityEnvironment().run(activities.inventory, request)
    assert [v.owner for v in result.vms] == ["cluster/ghost"]
    assert not result.tags_read and error in result.tags_problem and result.tags == []
