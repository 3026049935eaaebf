"""The privilege table: complete, well-formed ids, no duplicates within a role."""

from __future__ import annotations

import re

from domain.privileges import CLUSTER_ROLE, ROLE_OF_OBJECT, ROOT_LEVEL_ROLE, all_privilege_ids

ID = re.compile(r"^[A-Z][A-Za-z]+(\.[A-Za-z0-9]+)+$")


def test_ids_are_well_formed_and_unique_per_role() -> None:
    for role in (ROOT_LEVEL_ROLE, CLUSTER_ROLE):
        ids = [p for p, _ in role]
        assert len(ids) == len(set(ids))
        assert all(ID.match(p) for p in ids), [p for p in ids if not ID.match(p)]


def test_roles_have_every_privilege_the_document_lists() -> None:
    # counted in the product document: 8 root-level privileges, 97 in the cluster role
    # (by category: 6+4+1+4+1+5+1+1+1+2+3+26+6+5+3+15+6+4+3)
    assert len(ROOT_LEVEL_ROLE) == 8
    assert len(CLUSTER_ROLE) == 97


def test_the_clone_privilege_is_in_the_cluster_role() -> None:
    assert "VirtualMachine.Provisioning.Clone" in dict(CLUSTER_ROLE)
    assert "VirtualMachine.Provisioning.Clone" in all_privilege_ids()


def test_every_placement_object_has_a_role() -> None:
    assert set(ROLE_OF_OBJECT) == {
        "root",
        "datacenter",
        "compute_cluster",
        "resource_pool",
        "datastore",
        "network",
        "folder",
        "template",
    }
