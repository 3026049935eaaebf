"""Names shared by every process: task queues, workflow ids, search attributes."""

from __future__ import annotations

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


def gateway_task_queue(gateway: str) -> str:
    """The task queue a gateway's agent polls; all vSphere work for it runs there."""
    return f"kubegate-gateway-{gateway}"


def preflight_workflow_id(request_id: str) -> str:
    return f"preflight/{request_id}"


def ippool_workflow_id(gateway: str, pool: str) -> str:
    return f"ippool/{gateway}/{pool}"


def cluster_workflow_id(cluster: str) -> str:
    return f"cluster/{cluster}"


def gateway_workflow_id(gateway: str) -> str:
    return f"gateway/{gateway}"
