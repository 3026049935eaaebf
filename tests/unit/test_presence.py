"""The agent's presence task and what is shown of it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.presence import agent_presence
from domain.gateway import GatewayState, GatewayStatus, PairingState
from domain.presence import AgentPresence, PresenceRequest
from domain.version import VERSION, version_at_least


async def test_an_agent_answers_at_once_or_after_its_round() -> None:
    answer = await ActivityEnvironment().run(agent_presence, PresenceRequest(hold_seconds=0))
    assert answer.release == VERSION and answer.host


async def test_a_stopping_agent_fails_its_held_task_at_once() -> None:
    env = ActivityEnvironment()
    held = asyncio.create_task(env.run(agent_presence, PresenceRequest(hold_seconds=3600)))
    await asyncio.sleep(0.1)
    assert not held.done()
    env.worker_shutdown()
    with pytest.raises(ApplicationError, match="stopping") as refused:
        await asyncio.wait_for(held, 5)
    assert refused.value.type == "AgentStopping"


def test_a_running_gateway_whose_agent_is_away_shows_disconnected() -> None:
    pairing = PairingState.model_validate(
        {"code_hash": "x", "salt": "y", "expires_at": "2026-12-07T00:00:00Z"}
    )
    state = GatewayState(name="lab", pairing=pairing, status=GatewayStatus.RUNNING)
    assert state.shown_status == "Running"
    state.agent_connected = False
    assert state.shown_status == "Disconnected"
    state.status = GatewayStatus.UPGRADING
    assert state.shown_status == "Upgrading"  # only a Running gateway shows it


def test_a_waiting_step_names_the_gateway_and_when_its_agent_was_seen() -> None:
    seen = datetime(2026, 12, 6, 14, 5, 12, tzinfo=UTC)
    note = AgentPresence(gateway="lab", connected=False, seen_at=seen).waiting_note()
    assert note == "waiting for the agent of gateway lab (last seen 2026-12-06 14:05:12 UTC)"


def test_releases_compare_by_number() -> None:
    assert version_at_least("0.3.0", "0.3.0") and version_at_least("0.10.1", "0.3.0")
    assert not version_at_least("0.2.9", "0.3.0") and not version_at_least("", "0.3.0")
