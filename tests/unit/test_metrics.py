"""kubegate's process-side instruments, read back through the SDK's metric buffer."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig

from plumbing import metrics


@pytest.fixture
def buffer() -> Iterator[MetricBuffer]:
    """The instruments on a buffer of their own for the test; the process's meter after."""
    kept = metrics.instruments()
    buffer = MetricBuffer(10_000)
    metrics.use_meter(Runtime(telemetry=TelemetryConfig(metrics=buffer)).metric_meter)
    yield buffer
    metrics._instruments = kept


def updates(buffer: MetricBuffer, name: str) -> list[tuple[dict[str, object], float]]:
    found = []
    for update in buffer.retrieve_updates():
        if update.metric.name == name:
            labels = dict(update.attributes)
            labels.pop("service_name", None)
            found.append((labels, float(update.value)))
    return found


def test_tasks_in_flight_count_up_and_down_per_object(buffer: MetricBuffer) -> None:
    inside, release = threading.Barrier(3), threading.Event()

    def hold() -> None:
        with metrics.task_in_flight("host", "vc", "HostSystem:host-1", 8):
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for thread in threads:
        thread.start()
    inside.wait()
    with metrics.task_in_flight("datastore", "vc", "ds-1", 128):
        pass
    release.set()
    for thread in threads:
        thread.join()
    host = {"kind": "host", "vcenter": "vc", "object": "HostSystem:host-1"}
    datastore = {"kind": "datastore", "vcenter": "vc", "object": "ds-1"}
    seen = updates(buffer, "kubegate_vcenter_tasks_in_flight")
    assert [v for labels, v in seen if labels == host] == [1, 2, 1, 0]
    assert [v for labels, v in seen if labels == datastore] == [1, 0]


def test_requests_and_faults_by_method(buffer: MetricBuffer) -> None:
    metrics.vcenter_request("vc", "CloneVM_Task")
    metrics.vcenter_request("vc", "Login", fault="vim.fault.InvalidLogin")
    every = buffer.retrieve_updates()
    requests = [dict(u.attributes) for u in every if u.metric.name.endswith("requests_total")]
    faults = [dict(u.attributes) for u in every if u.metric.name.endswith("faults_total")]
    assert [(r["method"], r["vcenter"]) for r in requests] == [
        ("CloneVM_Task", "vc"),
        ("Login", "vc"),
    ]
    assert [f["fault"] for f in faults] == ["vim.fault.InvalidLogin"]
