"""Which agent releases a kubegate release works with: its own minor and the one before."""

from __future__ import annotations

from domain.version import VERSION, accepted_agents, agent_version_problem


def test_the_same_and_the_previous_minor_release_are_accepted() -> None:
    assert agent_version_problem("1.4.0", "1.4.2") is None
    assert agent_version_problem("1.3.9", "1.4.2") is None
    assert accepted_agents("1.4.2") == "1.4.x and 1.3.x"


def test_older_newer_and_unknown_agents_are_refused_with_the_reason() -> None:
    for agent in ("1.2.7", "1.5.0", "2.4.0", "0.4.0"):
        problem = agent_version_problem(agent, "1.4.2")
        assert problem is not None and agent in problem and "1.4.x and 1.3.x" in problem
    unknown = agent_version_problem("", "1.4.2")
    assert unknown is not None and "no version" in unknown


def test_this_release_accepts_its_own_agents() -> None:
    assert agent_version_problem(VERSION) is None
