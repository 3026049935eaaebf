"""Names shared by every process: task queues, workflow ids, search attributes."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import AfterValidator
from temporalio.common import SearchAttributeKey

CONTROL_TASK_QUEUE = "kubegate-control"

KIND = SearchAttributeKey.for_keyword("KubegateKind")
STATUS = SearchAttributeKey.for_keyword("KubegateStatus")
GATEWAY = SearchAttributeKey.for_keyword("KubegateGateway")
SEARCH_ATTRIBUTES = (KIND, STATUS, GATEWAY)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def is_dns_label(value: str) -> bool:
    """True if value is a lower-case RFC 1123 label (1-63 chars)."""
    return bool(_DNS_LABEL.match(value))


def check_dns_label(value: str) -> str:
    if not is_dns_label(value):
        raise ValueError("must be a DNS label: lower-case letters, digits and '-', 1-63 chars")
    return value


#: A name that must be a DNS label (clusters, gateways, pools, accounts).
DnsLabel = Annotated[str, AfterValidator(check_dns_label)]

_HOST_LABEL = re.compile(r"^[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9_])?$")


def is_host(value: str) -> bool:
    """True if value is an IP address (no zone id) or a DNS host name (labels of 1-63 letters,
    digits, '-' or '_', at most 253 characters, an optional final dot)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return not (isinstance(address, ipaddress.IPv6Address) and address.scope_id)
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_HOST_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def check_host(value: str) -> str:
    value = value.strip()
    if not is_host(value):
        raise ValueError(f"{value!r} is not a host name or IP address")
    return value


#: A host name or IP address (NTP servers, vCenter, proxies).
HostName = Annotated[str, AfterValidator(check_host)]


def gateway_task_queue(gateway: str) -> str:
    """The task queue a gateway's agent polls; all vSphere work for it runs there."""
    return f"kubegate-gateway-{gateway}"


def presence_task_queue(gateway: str) -> str:
    """The task queue of a gateway's presence task (domain/presence.py): the agent serves it
    with slots of its own, so a busy agent is never taken for an absent one."""
    return f"kubegate-gateway-{gateway}-presence"


def preflight_workflow_id(request_id: str) -> str:
    return f"preflight/{request_id}"


def ippool_workflow_id(gateway: str, pool: str) -> str:
    return f"ippool/{gateway}/{pool}"


def cluster_workflow_id(cluster: str) -> str:
    return f"cluster/{cluster}"


def gateway_workflow_id(gateway: str) -> str:
    return f"gateway/{gateway}"


#: owners of IP addresses that are lifecycles: only they (or their end) give them back
LIFECYCLE_PREFIXES = ("cluster/", "gateway/")


#: the histogram of step durations: recorded by the workflows, bucketed by the runtime
STEP_DURATION_METRIC = "kubegate_step_duration_seconds"
