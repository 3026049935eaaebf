"""Every request the gateway agent is sent refuses fields it does not know, so an agent of
the release before never acts on a request it understood only in part."""

from __future__ import annotations

import inspect
import typing

from pydantic import BaseModel
from temporalio import activity

from activities.bootstrap import BootstrapActivities
from activities.kube import KubeActivities
from activities.preflight import PreflightActivities
from activities.vsphere.events import EventActivities
from activities.vsphere.vm import VmActivities
from domain.requests import AgentRequest


def agent_requests() -> dict[str, type[BaseModel]]:
    """Activity name -> its request model, for every activity the agent registers."""
    found: dict[str, type[BaseModel]] = {}
    for cls in (
        PreflightActivities,
        BootstrapActivities,
        VmActivities,
        EventActivities,
        KubeActivities,
    ):
        for _, fn in inspect.getmembers(cls, inspect.isfunction):
            defn = activity._Definition.from_callable(fn)
            if defn is None:
                continue
            hints = typing.get_type_hints(fn)
            (request,) = [t for name, t in hints.items() if name not in ("self", "return")]
            found[str(defn.name)] = request
    return found


def test_every_agent_request_refuses_unknown_fields() -> None:
    requests = agent_requests()
    assert {
        "vm_create",
        "preflight_all",
        "bootstrap_secrets",
        "vm_events",
        "cluster_node_leave",
    } <= requests.keys()
    lenient = sorted(n for n, r in requests.items() if not issubclass(r, AgentRequest))
    assert lenient == []
