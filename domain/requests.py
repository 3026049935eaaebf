"""The base of every request the gateway agent is sent.

A request refuses fields it does not know: an agent of the release before never acts on a
request it did not fully understand. Fields at their defaults are not sent at all
(plumbing/codec.py leaves them out of every payload), so a later release may add a field,
and the release before's agents fail only the requests that set it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class AgentRequest(BaseModel):
    """A request to the gateway agent (an activity's argument); unknown fields refused."""

    model_config = ConfigDict(extra="forbid")
