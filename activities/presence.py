"""The agent's side of presence (domain/presence.py): hold the task, heartbeating (the guard
does), and answer with this release; an agent that is stopping says so at once."""

from __future__ import annotations

import asyncio
import socket

from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain.presence import PresenceAnswer, PresenceRequest
from domain.version import VERSION


@activity.defn(name="agent_presence")
async def agent_presence(request: PresenceRequest) -> PresenceAnswer:
    """Here: hold the task for the round the gateway asked (the guard's keepalive heartbeats
    it; a dead agent's task times out), then answer. A stopping agent fails it at once, so
    its gateway knows without waiting out the silence (and the agent's shutdown is not held)."""
    try:
        await asyncio.wait_for(activity.wait_for_worker_shutdown(), timeout=request.hold_seconds)
    except TimeoutError:
        return PresenceAnswer(release=VERSION, host=socket.gethostname())
    raise ApplicationError("the agent is stopping", type="AgentStopping", non_retryable=True)
