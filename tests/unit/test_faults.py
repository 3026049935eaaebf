"""The fault table classifies vSphere faults and connection errors."""

from __future__ import annotations

import socket

import pytest
from pyVmomi import Security, vim, vmodl

from activities.vsphere.faults import classify
from domain import errors


@pytest.mark.parametrize(
    ("exc", "type_", "non_retryable"),
    [
        (vim.fault.InvalidLogin(), errors.INVALID_CREDENTIALS, True),
        (
            vim.fault.NoPermission(privilegeId="VirtualMachine.Provisioning.Clone"),
            errors.MISSING_PRIVILEGE,
            True,
        ),
        (vim.fault.NotAuthenticated(), errors.VCENTER_BUSY, False),
        (vmodl.fault.ManagedObjectNotFound(), errors.OBJECT_NOT_FOUND, True),
        (vim.fault.InvalidPowerState(), errors.INVALID_STATE, False),
        (vim.fault.DuplicateName(), errors.INVALID_SPEC, True),
        (vim.fault.InsufficientResourcesFault(), errors.VCENTER_BUSY, False),
        (vmodl.fault.InvalidArgument(), errors.INVALID_SPEC, True),
        (vim.fault.VimFault(), errors.VCENTER_FAULT, False),
        (ConnectionRefusedError(), errors.VCENTER_UNREACHABLE, False),
        (socket.gaierror(), errors.VCENTER_UNREACHABLE, False),
        (Security.ThumbprintMismatchException("aa", "bb"), errors.TLS_VERIFICATION_FAILED, True),
    ],
)
def test_classification(exc: BaseException, type_: str, non_retryable: bool) -> None:
    error = classify(exc, "clone vm-1")
    assert error.type == type_
    assert error.non_retryable is non_retryable
    assert error.message.startswith("clone vm-1: ")


def test_no_permission_names_the_privilege() -> None:
    error = classify(vim.fault.NoPermission(privilegeId="Folder.Create"), "create folder")
    assert "Folder.Create" in error.message


def test_every_non_retryable_type_is_listed_for_retry_policies() -> None:
    from activities.vsphere.faults import FAULT_TABLE

    for rule in FAULT_TABLE.values():
        if not rule.retryable:
            assert rule.type in errors.NON_RETRYABLE, rule
