"""Whether a gateway's agent is there: what the gateway asks it, what it answers, and what
the gateway tells its clusters.

The gateway keeps one `agent_presence` task on its agent's queue at a time: one that returns
as soon as an agent takes it (while the agent is away), else one the agent holds for a round
(while it is there), kept alive by the agent's heartbeats. An agent that dies stops
heartbeating and the held task times out; one that comes back takes the waiting task. The
gateway's history grows by one task per round or change, never per heartbeat.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from pydantic import BaseModel, Field

from domain.requests import AgentRequest

#: how long the agent holds a presence task while it is there (one task per round)
PRESENCE_ROUND = timedelta(hours=1)


class PresenceRequest(AgentRequest):
    """Hold this task for `hold_seconds` (0: answer at once), heartbeating meanwhile."""

    hold_seconds: int = Field(ge=0, le=86400)


class PresenceAnswer(BaseModel):
    """The agent was there: its release and host (signed, as every agent result)."""

    release: str
    host: str = ""


class AgentPresence(BaseModel):
    """What a gateway tells its clusters when its agent goes away or comes back."""

    gateway: str
    connected: bool
    seen_at: datetime | None = Field(default=None, description="When it was last there.")

    def waiting_note(self) -> str:
        """'waiting for the agent of gateway lab (last seen 14:05:12 UTC)'."""
        seen = f" (last seen {self.seen_at:%Y-%m-%d %H:%M:%S} UTC)" if self.seen_at else ""
        return f"{WAITING} {self.gateway}{seen}"


#: how a step waiting for an absent agent begins its detail
WAITING = "waiting for the agent of gateway"
