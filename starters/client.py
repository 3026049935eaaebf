"""The one way to reach Temporal (`connect`) and the typed client the CLI is built on.

Programmatic use: see docs/client.md and examples/validate_account.py.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import timedelta

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, TLSConfig
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter

from domain import names
from domain.account import CloudAccountSpec, VCenterCredentials, VCenterEndpoint
from domain.preflight import PreflightReport, PreflightRequest
from domain.sealing import PASSWORD_PURPOSE, seal
from starters.settings import Settings
from workflows.preflight import PreflightWorkflow


class KubegateError(Exception):
    """A request kubegate refused or could not carry out; the message says why."""


async def connect(settings: Settings | None = None) -> Client:
    """Connect to Temporal with the project's data converter and TLS settings."""
    settings = settings or Settings()
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
        data_converter=pydantic_data_converter,
        tls=tls,
        api_key=settings.temporal_api_key,
    )


def _read(path: object) -> bytes | None:
    from pathlib import Path

    return Path(str(path)).read_bytes() if path else None


class KubegateClient:
    """Typed operations on kubegate; every CLI command goes through here."""

    def __init__(self, client: Client, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings or Settings()

    @classmethod
    async def connect(cls, settings: Settings | None = None) -> KubegateClient:
        settings = settings or Settings()
        return cls(await connect(settings), settings)

    def gateway_public_key(self, gateway: str) -> bytes:
        """The public key of the gateway's agent, which secrets are sealed to."""
        path = self.settings.agent_public_key_path(gateway)
        try:
            return base64.b64decode(path.read_text().strip())
        except FileNotFoundError:
            raise KubegateError(
                f"gateway {gateway!r} has no agent key at {path}: start its agent "
                f"(kubegate gateway agent {gateway}) or `kubegate dev up`"
            ) from None

    async def agent_is_polling(self, gateway: str, wait: float = 5.0) -> bool:
        """True if an agent of the gateway polls its task queue (waits up to `wait` seconds)."""
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            response = await self.client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=self.client.namespace,
                    task_queue=TaskQueue(name=names.gateway_task_queue(gateway)),
                    task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY,
                )
            )
            if response.pollers:
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.25)

    def seal_credentials(
        self, gateway: str, endpoint: VCenterEndpoint, username: str, password: str
    ) -> VCenterCredentials:
        sealed = seal(password, self.gateway_public_key(gateway), PASSWORD_PURPOSE)
        return VCenterCredentials(endpoint=endpoint, username=username, password=sealed)

    async def validate_account(
        self,
        spec: CloudAccountSpec,
        password: str,
        *,
        timeout: timedelta = timedelta(minutes=5),
        workflow_id: str | None = None,
    ) -> PreflightReport:
        """Run the preflight of a cloud account (and its placement) on its gateway's agent."""
        if not await self.agent_is_polling(spec.gateway):
            raise KubegateError(
                f"no agent of gateway {spec.gateway!r} is connected (task queue "
                f"{names.gateway_task_queue(spec.gateway)} has no pollers): start it first"
            )
        endpoint = VCenterEndpoint.model_validate(
            spec.vcenter.model_dump(include=set(VCenterEndpoint.model_fields))
        )
        request = PreflightRequest(
            account=spec.name,
            gateway=spec.gateway,
            credentials=self.seal_credentials(
                spec.gateway, endpoint, spec.vcenter.username, password
            ),
            placement=spec.placement,
        )
        return await self.client.execute_workflow(
            PreflightWorkflow.run,
            request,
            id=workflow_id or names.preflight_workflow_id(str(uuid.uuid4())),
            task_queue=names.CONTROL_TASK_QUEUE,
            execution_timeout=timeout,
            static_summary=f"Preflight of cloud account {spec.name} on gateway {spec.gateway}",
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(names.KIND, "preflight"),
                    SearchAttributePair(names.STATUS, "Running"),
                    SearchAttributePair(names.GATEWAY, spec.gateway),
                ]
            ),
        )
