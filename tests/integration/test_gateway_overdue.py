"""A gateway whose installer does not register: overdue after 10 minutes, with the hints.

Runs GatewayWorkflow on Temporal's time-skipping test server: the ten minutes pass at once.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from domain.gateway import TROUBLESHOOTING_HINTS, GatewayStatus
from domain.names import SEARCH_ATTRIBUTES
from domain.sealing import AgentKey
from plumbing.codec import ReadableMetadata, data_converter
from plumbing.settings import Settings, tool_path
from starters.client import KubegateClient, RequestRefused
from workers.control import workflow_runner
from workflows.gateway import GatewayWorkflow

pytestmark = pytest.mark.integration


async def test_unregistered_gateway_is_overdue_after_ten_minutes_and_keeps_waiting() -> None:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(tool_path("temporal-test-server")),
        data_converter=data_converter(),
        interceptors=[ReadableMetadata()],
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
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[GatewayWorkflow],
            workflow_runner=workflow_runner(),
        ):
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
            # paired: no longer overdue, but Registered only once the operator approves it
            assert state.status is GatewayStatus.PENDING and not state.overdue
            assert key.fingerprint in state.reason
            state = await kubegate.approve_agent("late", key.fingerprint)
            assert state.status is GatewayStatus.REGISTERED and not state.overdue

            # paired in time (its agent approved in advance): never overdue
            early = AgentKey.generate()
            _, code3 = await kubegate.create_gateway(
                "early", task_queue=queue, fingerprint=early.fingerprint
            )
            await env.sleep(timedelta(minutes=2))
            await kubegate.register_agent("early", early, code3)
            await env.sleep(timedelta(minutes=10))
            state = await kubegate.gateway_state("early")
            assert state.status is GatewayStatus.REGISTERED and not state.overdue, state.reason

            # wrong codes are counted; five of them lock pairing for a minute, even for
            # the right code, then it pairs
            _, code4 = await kubegate.create_gateway("guessed", task_queue=queue)
            for _ in range(5):
                with pytest.raises(RequestRefused, match="wrong pairing code"):
                    await kubegate.register_agent("guessed", AgentKey.generate(), "ABCDE-FGHJK")
            with pytest.raises(RequestRefused, match="5 wrong pairing codes: locked until"):
                await kubegate.register_agent("guessed", AgentKey.generate(), code4)
            await env.sleep(timedelta(seconds=61))
            state = await kubegate.register_agent("guessed", AgentKey.generate(), code4)
            assert state.agent is not None and state.pairing.failures == 5

            # a code is single use and expires after 24 h (a second gateway shows it)
            _, code2 = await kubegate.create_gateway("later", task_queue=queue)
            await env.sleep(timedelta(hours=25))
            with pytest.raises(RequestRefused, match="expired"):
                await kubegate.register_agent("later", AgentKey.generate(), code2)
    finally:
        await env.shutdown()
