"""kubegate's own metrics, served with the Temporal SDK's on one Prometheus endpoint a process.

A worker or agent started with a metrics address builds its Temporal runtime with
`metrics_runtime` (the SDK binds the endpoint, one per process) and every instrument below
records through that runtime's meter; without one they record nothing. Workflows record
through `workflow.metric_meter()` instead (workflows/metrics.py), which the SDK keeps quiet
during replay. Labels stay bounded: vCenters, methods, hosts, datastores, gateways, pools,
statuses and step names; never a VM or a cluster name.

docs/operations.md#metrics-traces-and-logs lists every metric and the queries that matter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from temporalio.common import MetricMeter
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
)

from domain.names import STEP_DURATION_METRIC
from plumbing.errors import KubegateError
from plumbing.settings import Settings

#: buckets of the step duration histogram (recorded by the workflows), in seconds
STEP_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


def metrics_runtime(address: str | None, *, forward_logs: bool = False) -> Runtime:
    """A Temporal runtime serving Prometheus metrics on `address` (HOST:PORT, /metrics), if
    given (kubegate's instruments record through it from now on); with `forward_logs`, the
    SDK core's own log lines go through Python's logging (e.g. as JSON) instead of straight
    to stdout."""
    logs = LoggingConfig.default
    if forward_logs:
        logs = LoggingConfig(
            filter=logs.filter,
            forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
        )
    metrics = None
    if address is not None:
        metrics = PrometheusConfig(
            bind_address=address,
            histogram_bucket_overrides={STEP_DURATION_METRIC: list(STEP_BUCKETS)},
        )
    try:
        runtime = Runtime(telemetry=TelemetryConfig(logging=logs, metrics=metrics))
    except Exception as exc:  # the SDK raises a plain error for a port in use
        raise KubegateError(f"metrics address {address}: {exc}") from None
    if address is not None:
        use_meter(runtime.metric_meter)
    return runtime


def process_runtime(settings: Settings) -> Runtime | None:
    """The runtime a worker or agent process connects with: one serving its metrics
    (KUBEGATE_METRICS_ADDRESS) and, with JSON logs, forwarding the SDK core's log lines;
    None (the SDK's default runtime) when neither is asked for."""
    json_logs = settings.log_format == "json"
    if settings.metrics_address is None and not json_logs:
        return None
    return metrics_runtime(settings.metrics_address, forward_logs=json_logs)


class Instruments:
    """Every process-side instrument, made from one meter."""

    def __init__(self, meter: MetricMeter) -> None:
        self.vcenter_requests = meter.create_counter(
            "kubegate_vcenter_requests_total", "SOAP requests sent to vCenter, by method."
        )
        self.vcenter_faults = meter.create_counter(
            "kubegate_vcenter_faults_total",
            "vCenter requests that failed, by method and fault (or network error).",
        )
        self.tasks_in_flight = meter.create_gauge(
            "kubegate_vcenter_tasks_in_flight",
            "VM operations holding a slot of a host or datastore now.",
        )
        self.task_slots = meter.create_gauge(
            "kubegate_vcenter_task_slots",
            "Slots of a host or datastore (KUBEGATE_MAX_OPS_PER_HOST / _PER_DATASTORE).",
        )
        self.lifecycles = meter.create_gauge(
            "kubegate_lifecycles", "Open lifecycles (workflows) by kind, status and gateway."
        )
        self.pool_capacity = meter.create_gauge(
            "kubegate_ip_pool_capacity", "Addresses an IP pool can hand out."
        )
        self.pool_used = meter.create_gauge(
            "kubegate_ip_pool_used", "Addresses of an IP pool allocated now."
        )
        self.agent_connected = meter.create_gauge(
            "kubegate_agent_connected", "1 while the gateway hears its agent, else 0."
        )
        self.agent_last_seen = meter.create_gauge_float(
            "kubegate_agent_last_seen_seconds",
            "Seconds since the gateway last heard its agent (0 while it hears it).",
            "s",
        )


_lock = threading.Lock()
_instruments = Instruments(MetricMeter.noop)
_in_flight: dict[tuple[str, str, str], int] = {}


def use_meter(meter: MetricMeter) -> None:
    """Record kubegate's metrics through this meter (a runtime's) from now on."""
    global _instruments
    with _lock:
        _instruments = Instruments(meter)
        _in_flight.clear()


def instruments() -> Instruments:
    return _instruments


def vcenter_request(vcenter: str, method: str, fault: str | None = None) -> None:
    """Count one request to vCenter, and its fault if it failed."""
    labels = {"vcenter": vcenter, "method": method}
    _instruments.vcenter_requests.add(1, labels)
    if fault is not None:
        _instruments.vcenter_faults.add(1, {**labels, "fault": fault})


@contextmanager
def task_in_flight(kind: str, vcenter: str, obj: str, limit: int) -> Iterator[None]:
    """Count a VM operation holding one of the slots of a host or datastore (`kind`)."""
    labels = {"kind": kind, "vcenter": vcenter, "object": obj}
    key = (kind, vcenter, obj)
    instruments = _instruments
    with _lock:
        _in_flight[key] = now = _in_flight.get(key, 0) + 1
        instruments.tasks_in_flight.set(now, labels)
        instruments.task_slots.set(limit, labels)
    try:
        yield
    finally:
        with _lock:
            _in_flight[key] = now = max(_in_flight.get(key, 1) - 1, 0)
            instruments.tasks_in_flight.set(now, labels)
