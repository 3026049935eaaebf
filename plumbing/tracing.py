"""OpenTelemetry tracing through the Temporal SDK's interceptor: off unless an OTLP endpoint
is set (KUBEGATE_OTEL_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT), and then for every client
of the process (the CLI's, a worker's, an agent's) and the workers built on it.

Spans carry what the SDK's interceptor puts in them (workflow and activity types and ids),
never a payload: no secret enters a span. Needs the `tracing` extra (opentelemetry-sdk and
its OTLP/HTTP exporter): `pip install 'kubegate[tracing]'`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from plumbing.errors import KubegateError
from plumbing.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer
    from temporalio.client import Interceptor

_lock = threading.Lock()
_tracers: dict[tuple[str, str], Tracer] = {}
#: the providers made here, flushed by `flush` (the CLI ends with os._exit: no atexit)
_flushes: list[Callable[[int], bool]] = []


def tracing_endpoint(settings: Settings) -> str | None:
    """Where spans go; None: tracing is off."""
    return settings.otel_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


def tracing_interceptor(settings: Settings, service: str) -> Interceptor | None:
    """The SDK's tracing interceptor exporting to the configured endpoint, or None."""
    endpoint = tracing_endpoint(settings)
    if endpoint is None:
        return None
    return interceptor_for(otlp_tracer(endpoint, service))


def interceptor_for(tracer: Tracer) -> Interceptor:
    """The SDK's interceptor on a tracer: spans for workflows (also when no caller traced),
    their activities, updates, signals and queries."""
    try:
        from temporalio.contrib.opentelemetry import TracingInterceptor
    except ImportError as exc:
        raise KubegateError(_missing(exc)) from None
    return TracingInterceptor(tracer, always_create_workflow_spans=True)


def otlp_tracer(endpoint: str, service: str) -> Tracer:
    """A tracer batching spans to an OTLP/HTTP endpoint (one provider per endpoint and
    service in a process; it flushes at exit)."""
    with _lock:
        tracer = _tracers.get((endpoint, service))
        if tracer is not None:
            return tracer
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise KubegateError(_missing(exc)) from None
        url = endpoint.rstrip("/")
        if not url.endswith("/v1/traces"):
            url += "/v1/traces"
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        tracer = _tracers[(endpoint, service)] = provider.get_tracer("kubegate")
        _flushes.append(provider.force_flush)
        return tracer


def flush(timeout_ms: int = 5000) -> None:
    """Send the spans still batched (before the process ends)."""
    with _lock:
        flushes = list(_flushes)
    for force_flush in flushes:
        force_flush(timeout_ms)


def _missing(exc: ImportError) -> str:
    return (
        f"tracing is on (an OTLP endpoint is set) but {exc.name} is missing: install "
        "kubegate with its tracing extra (pip install 'kubegate[tracing]')"
    )
