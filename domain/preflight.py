"""Preflight checks of a cloud account and placement: request, results, report."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from domain.account import Placement, VCenterCredentials

#: vSphere 6.7 Update 3 (GA build of vCenter Server 6.7 U3).
MIN_VERSION = (6, 7, 0)
MIN_BUILD_FOR_6_7 = 14367737


class CheckStatus(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIPPED = "skipped"


class CheckResult(BaseModel):
    """One check: what was checked, on which object, the outcome and what to do about it."""

    check: str = Field(description="Stable check id, e.g. 'vcenter.version'.")
    title: str = Field(description="What was checked, in words.")
    status: CheckStatus
    object: str = Field(default="", description="The vSphere object the result concerns.")
    detail: str = Field(default="", description="What was found.")
    remedy: str = Field(default="", description="What to change when it did not pass.")


class PreflightRequest(BaseModel):
    """Input of PreflightWorkflow."""

    account: str = Field(description="Name of the cloud account being checked.")
    gateway: str = Field(description="Gateway whose agent runs the checks.")
    credentials: VCenterCredentials
    placement: Placement | None = None


class CheckBatch(BaseModel):
    """Results of one preflight activity."""

    results: list[CheckResult] = Field(default_factory=list)
    vcenter_requests: int = 0


class InventoryBatch(CheckBatch):
    #: role (datacenter, compute_cluster, …) -> managed object id, for the objects found
    found: dict[str, str] = Field(default_factory=dict)


class ObjectChecksRequest(BaseModel):
    """Input of the privilege and host checks: the objects the inventory check found."""

    credentials: VCenterCredentials
    placement: Placement
    found: dict[str, str]


class PreflightReport(BaseModel):
    """Output of PreflightWorkflow."""

    account: str
    gateway: str
    server: str
    username: str
    results: list[CheckResult]
    vcenter_requests: int = Field(description="vCenter API requests the checks made.")

    @property
    def passed(self) -> bool:
        return not any(r.status is CheckStatus.FAIL for r in self.results)

    def count(self, status: CheckStatus) -> int:
        return sum(1 for r in self.results if r.status is status)


def parse_version(text: str) -> tuple[int, ...]:
    """'6.7.0' -> (6, 7, 0); missing or non-numeric parts count as 0."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def version_supported(version: str, build: str) -> bool:
    """True for vCenter 6.7 Update 3 or later."""
    v = parse_version(version)
    if v[:2] != (6, 7):
        return v >= MIN_VERSION
    return build.isdigit() and int(build) >= MIN_BUILD_FOR_6_7


def skipped(check: str, title: str, why: str) -> CheckResult:
    return CheckResult(check=check, title=title, status=CheckStatus.SKIPPED, detail=why)
