"""The Web UI's first screen of a lifecycle (its current details): what is wrong comes first,
and tables are fixed-width text that lines up in any Markdown viewer."""

from __future__ import annotations

from pathlib import Path

from domain.lifecycle import ClusterState, ClusterStatus, Node, Step, StepState
from starters.cli.cluster import load_cluster
from workflows.cluster import render_details

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def state(status: ClusterStatus, **extra: object) -> ClusterState:
    spec = load_cluster(EXAMPLES / "cluster.yaml")
    return ClusterState.model_validate(
        {
            "name": spec.name,
            "spec": spec,
            "account": spec.cloud_account,
            "gateway": "lab",
            "status": status,
            **extra,
        }
    )


def test_a_failed_cluster_shows_its_failed_step_and_error_first() -> None:
    failed = state(
        ClusterStatus.FAILED,
        error="Create VMs: no compute cluster at /DC0/host/NOPE",
        steps=[
            Step(name="plan", title="Validate the spec, plan nodes", state=StepState.DONE),
            Step(
                name="create-vms",
                title="Create VMs",
                state=StepState.FAILED,
                error="no compute cluster at /DC0/host/NOPE; create it or correct the spec",
            ),
        ],
        nodes=[
            Node(
                name="demo-cp-0",
                pool="cp",
                index=0,
                control_plane=True,
                domain_index=0,
                compute_cluster="DC0_C0",
                instance_uuid="u",
                address="10.0.0.5",
            )
        ],
    )
    lines = render_details(failed).splitlines()
    assert lines[0] == "## Cluster `demo` — Failed"
    assert lines[2] == (
        "**Failed: Create VMs** — no compute cluster at /DC0/host/NOPE; create it or correct "
        "the spec"
    )
    # tables: a code block whose columns line up, no Markdown pipes
    assert "|" not in "\n".join(lines)
    start = lines.index("Steps") + 2
    assert lines[start] == "```"
    header, rule, *rows = lines[start + 1 : lines.index("```", start + 1)]
    assert set(rule) == {"-", " "} and len(rows) == 2
    assert header.split() == ["STEP", "STATE", "SECONDS", "ATTEMPTS", "DETAIL", "/", "ERROR"]
    column = header.index("STATE")
    assert all(row[column:].startswith(("done", "failed")) for row in rows)
    assert any(line.startswith("demo-cp-0") and "10.0.0.5" in line for line in lines)


def test_a_running_cluster_has_nothing_wrong_on_top() -> None:
    running = state(
        ClusterStatus.RUNNING,
        steps=[Step(name="create-vms", title="Create VMs", state=StepState.FAILED, error="x")],
    )
    lines = render_details(running).splitlines()
    assert not any(line.startswith("**Failed") for line in lines)  # (an earlier failure)
    assert lines[2].startswith("Current step:")
    degraded = state(ClusterStatus.DEGRADED, reason="repair of demo-w-1 given up")
    assert render_details(degraded).splitlines()[2] == "**repair of demo-w-1 given up**"
