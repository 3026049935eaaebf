"""The one way to reach Temporal: address, namespace, TLS/mTLS, API key and the project's
data converter, from `KUBEGATE_*` settings."""

from __future__ import annotations

from pathlib import Path

from temporalio.client import Client, Interceptor, TLSConfig
from temporalio.runtime import Runtime

from plumbing.codec import CodecKeyError, ReadableMetadata, settings_data_converter
from plumbing.errors import KubegateError
from plumbing.settings import Settings
from plumbing.tracing import tracing_interceptor


async def connect(
    settings: Settings | None = None,
    *,
    worker: bool = False,
    runtime: Runtime | None = None,
    service: str = "kubegate",
) -> Client:
    """Connect to Temporal with the project's data converter (payloads encrypted with the
    configured codec keys, see plumbing/codec.py) and TLS settings. A worker's converter
    passes a payload it cannot decrypt on unopened (its workflows refuse it).

    `runtime`: the SDK runtime (a worker's serves its metrics: plumbing/metrics.py); traces
    go out as `service` when tracing is on (plumbing/tracing.py)."""
    settings = settings or Settings()
    interceptors: list[Interceptor] = [ReadableMetadata()]
    tracing = tracing_interceptor(settings, service)
    if tracing is not None:
        interceptors.append(tracing)
    try:
        converter = settings_data_converter(settings, strict=not worker)
    except CodecKeyError as exc:
        raise KubegateError(f"payload encryption keys: {exc}") from None
    tls: TLSConfig | bool = False
    if settings.temporal_tls or settings.temporal_tls_cert:
        tls = TLSConfig(
            server_root_ca_cert=_read(settings.temporal_tls_ca),
            client_cert=_read(settings.temporal_tls_cert),
            client_private_key=_read(settings.temporal_tls_key),
            domain=settings.temporal_tls_server_name,
        )
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=converter,
        interceptors=interceptors,
        tls=tls,
        api_key=settings.temporal_api_key,
        runtime=runtime,
    )


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path else None
