"""A gateway whose installer does not register: overdue after 10 minutes, with the hints.

Runs GatewayWorkflow on Temporal's time-skipping test server: the ten minutes pass at once.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from domain.gateway import TROUBLESHOOTING_HINTS, GatewayStatus
from domain.names import SEARCH_ATTRIBUTES
from domain.sealing import AgentKey
from starters.client import KubegateClient, RequestRefused
from starters.settings import Settings, tool_path
from workflows.gateway import GatewayWorkflow

pytestmark = pytest.mark.integration


async def test_unregistered_gateway_is_overdue_after_ten_minutes_and_keeps_waiting() -> None:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(tool_path("temporal-test-server")),
        data_converter=pydantic_data_converter,
    )
    try:
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
                    for key in SEARCH_ATTRIBUTES
                },
            )
        )
        queue = f"overdue-{uuid.uuid4()}"
        async with Worker(env.client, task_queue=queue, workflows=[GatewayWorkflow]):
            kubegate = KubegateClient(env.client, Settings())
            state, code = await kubegate.create_gateway("late", task_queue=queue)
            assert state.status is GatewayStatus.PENDING and not state.overdue

            await env.sleep(timedelta(minutes=9))
            state = await kubegate.gateway_state("late")
            assert not state.overdue and state.hints == []

            await env.sleep(timedelta(minutes=2))
            state = await kubegate.gateway_state("late")
            assert state.status is GatewayStatus.PENDING and state.overdue
            assert state.hints == list(TROUBLESHOOTING_HINTS)
            assert "not registered 10 minutes" in state.reason

            # still waiting: the right code pairs it, and it is no longer overdue
            key = AgentKey.generate()
            with pytest.raises(RequestRefused, match="wrong pairing code"):
                await kubegate.register_agent("late", key, "ABCDE-FGHJK")
            state = await kubegate.register_agent("late", key, code)
            assert state.status is GatewayStatus.REGISTERED and not state.overdue

            # paired in time: never overdue, also after the ten minutes
            _, code3 = await kubegate.create_gateway("early", task_queue=queue)
            await env.sleep(timedelta(minutes=2))
            await kubegate.register_agent("early", AgentKey.generate(), code3)
            await env.sleep(timedelta(minutes=10))
            state = await kubegate.gateway_state("early")
            assert state.status is GatewayStatus.REGISTERED and not state.overdue, state.reason

            # a code is single use and expires after 24 h (a second gateway shows it)
            _, code2 = await kubegate.create_gateway("later", task_queue=queue)
            await env.sleep(timedelta(hours=25))
            with pytest.raises(RequestRefused, match="expired"):
                await kubegate.register_agent("later", AgentKey.generate(), code2)
    finally:
        await env.shutdown()
