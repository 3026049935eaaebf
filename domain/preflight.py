"""Preflight checks of a cloud account and placement: request, results, report."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field, model_validator

from domain.account import Placement, VCenterCredentials
from domain.requests import AgentRequest

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


class PreflightRequest(AgentRequest):
    """Input of PreflightWorkflow."""

    account: str = Field(description="Name of the cloud account being checked.")
    gateway: str = Field(description="Gateway whose agent runs the checks.")
    credentials: VCenterCredentials
    placement: Placement | None = None
    more_placements: list[Placement] = Field(
        default_factory=list,
        description="Further placements (placement domains) in the same datacenter, checked in "
        "the same pass; each distinct object once.",
    )
    fresh_login: bool = Field(
        default=True,
        description="Log in anew for the Login check (and log out the worker's cached session); "
        "False reuses the cached session.",
    )
    agent_signing_key: str | None = Field(
        default=None,
        description="The approved agent's Ed25519 key: results must carry its "
        "signature (set by the gateway that starts the preflight).",
    )

    @model_validator(mode="after")
    def _same_datacenter(self) -> PreflightRequest:
        if self.more_placements and self.placement is None:
            raise ValueError("more_placements: needs placement as well")
        for i, extra in enumerate(self.more_placements):
            if self.placement is not None and extra.datacenter != self.placement.datacenter:
                raise ValueError(
                    f"more_placements.{i}.datacenter: must be the datacenter of placement "
                    f"({self.placement.datacenter!r}), not {extra.datacenter!r}"
                )
        return self

    def placements(self) -> list[Placement]:
        """The placement followed by more_placements (empty without placement)."""
        return [self.placement, *self.more_placements] if self.placement else []


class CheckBatch(BaseModel):
    """Results of one preflight activity."""

    results: list[CheckResult] = Field(default_factory=list)
    vcenter_requests: int = 0


class InventoryBatch(CheckBatch):
    #: role (datacenter, compute_cluster, …) -> 'Type:id', for the objects of `placement` found
    found: dict[str, str] = Field(default_factory=dict)
    #: inventory path -> 'Type:id', for every object found of every placement
    refs: dict[str, str] = Field(default_factory=dict)


class ObjectChecksRequest(AgentRequest):
    """Input of the privilege and host checks: the objects the inventory check found."""

    credentials: VCenterCredentials
    placement: Placement
    found: dict[str, str]
    more_placements: list[Placement] = Field(default_factory=list)
    #: inventory path -> 'Type:id' over all placements; empty means: use `found` only
    refs: dict[str, str] = Field(default_factory=dict)

    def objects(self) -> dict[str, tuple[str, str]]:
        """Every distinct object found: inventory path -> (role, 'Type:id'), in check order."""
        out: dict[str, tuple[str, str]] = {}
        if not self.refs:
            paths = self.placement.inventory_paths()
            return {paths[role]: (role, value) for role, value in self.found.items()}
        for placement in [self.placement, *self.more_placements]:
            for role, path in placement.inventory_paths().items():
                if path in self.refs and path not in out:
                    out[path] = (role, self.refs[path])
        return out


class PreflightReport(BaseModel):
    """Output of PreflightWorkflow."""

    account: str
    gateway: str
    server: str
    username: str
    results: list[CheckResult]
    vcenter_requests: int = Field(description="vCenter API requests the checks made.")
    refs: dict[str, str] = Field(
        default_factory=dict,
        description="Inventory path -> 'Type:id' of every placement object found, for reuse.",
    )

    def refs_of(self, placement: Placement) -> dict[str, str]:
        """role -> 'Type:id' of the objects of one checked placement that were found."""
        paths = placement.inventory_paths()
        return {role: self.refs[path] for role, path in paths.items() if path in self.refs}

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
