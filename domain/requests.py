"""The base of every request the gateway agent is sent.

A request refuses fields it does not know: an agent of the release before never acts on a
request it did not fully understand. Fields at their defaults are not sent at all
(plumbing/codec.py leaves them out of every payload), so a later release may add a field,
and the release before's agents fail only the requests that set it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

#: marks a request field added after 0.1.0, whose agents sign only the full request:
#: `Field(..., json_schema_extra=SINCE_0_3)`. Kept histories of such agents verify against
#: the request without these fields while they are at their defaults
#: (domain/trust.released_request); a field a later release adds takes this mark too.
SINCE_0_3: dict[str, Any] = {"since": "0.3.0"}


class AgentRequest(BaseModel):
    """A request to the gateway agent (an activity's argument); unknown fields refused."""

    model_config = ConfigDict(extra="forbid")
