"""The Docker image holds every file the code opens at run time (no Docker engine needed:
the Dockerfile's COPY lines are read and compared with what the packages reference)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("domain", "plumbing", "workflows", "activities", "workers", "starters")


def copied_into_the_image() -> set[str]:
    """The repository paths the kubegate stage copies."""
    stage = ROOT.joinpath("Dockerfile").read_text().split("AS kubegate", 1)[1]
    copied: set[str] = set()
    for line in stage.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(line.split()[1:-1])
    return copied


def opened_beside_the_packages() -> set[str]:
    """Paths the packages build from their own location: Path(__file__) ... / "a" / "b"."""
    found: set[str] = set()
    for package in PACKAGES:
        for source in ROOT.joinpath(package).rglob("*.py"):
            for match in re.finditer(r"Path\(__file__\)[^\n]*", source.read_text()):
                parts = re.findall(r'/ "([^"]+)"', match.group(0))
                if parts:
                    found.add("/".join(parts[:2]))
    return found


#: paths the packages look for but use only when present, never in the image: the
#: checkout's simulator, which `make setup` builds for `kubegate dev up` (plumbing/settings.py)
CHECKOUT_ONLY = {".kubegate/bin"}


def test_the_image_copies_every_package_and_what_they_open() -> None:
    copied = copied_into_the_image()
    assert set(PACKAGES) <= copied, copied
    opened = opened_beside_the_packages()
    assert "tools/installer" in opened  # the check finds what it must
    assert opened >= CHECKOUT_ONLY  # (and what it lets pass is still looked for)
    for path in opened - CHECKOUT_ONLY:
        assert any(path == c or path.startswith(c + "/") for c in copied), (path, copied)
        assert ROOT.joinpath(path).exists(), path


def test_compose_runs_a_supported_server_after_its_schema_job_and_keeps_the_simulator() -> None:
    import yaml

    services = yaml.safe_load(ROOT.joinpath("docker-compose.yml").read_text())["services"]
    images = {name: str(s.get("image", "")) for name, s in services.items()}
    assert not any("auto-setup" in image for image in images.values())  # not for production
    server = images["temporal"].partition(":")[2]
    assert images["temporal"].startswith("temporalio/server:")
    assert images["temporal-schema"] == f"temporalio/admin-tools:{server}"
    assert services["temporal"]["depends_on"]["temporal-schema"] == {
        "condition": "service_completed_successfully"
    }
    schema = services["temporal-schema"]["command"][0]
    assert "update-schema" in schema and "temporal_visibility" in schema
    setup = services["temporal-setup"]["command"][0]
    assert "namespace create" in setup and "KubegateKind" in setup
    assert images["temporal-ui"].startswith("temporalio/ui:")
    assert ROOT.joinpath("deploy/compose/dynamicconfig/kubegate.yaml").exists()
    # the simulator: its certificate and password made once in a volume, never on a command line
    vcsim = services["vcsim"]
    flags = " ".join(vcsim["command"])
    assert "-password-file=/vcsim/password" in flags and "-password=" not in flags
    assert "-tls-cert=/vcsim/tls.pem" in flags
    assert any(str(v).startswith("vcsim:") for v in vcsim["volumes"])
    assert 'if not (home / "tls.pem").exists()' in services["vcsim-init"]["command"][0]


def test_compose_prometheus_scrapes_the_workers_the_agent_and_the_server() -> None:
    """Every scrape target is a service of the compose file listening where it is scraped."""
    import yaml

    services = yaml.safe_load(ROOT.joinpath("docker-compose.yml").read_text())["services"]
    prometheus = services["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    mount = "./deploy/compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
    assert mount in prometheus["volumes"]
    config = yaml.safe_load(ROOT.joinpath("deploy/compose/prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    listening = {
        "control-worker": services["control-worker"]["environment"]["KUBEGATE_METRICS_ADDRESS"],
        "gateway-agent": services["gateway-agent"]["environment"]["KUBEGATE_METRICS_ADDRESS"],
        "temporal": services["temporal"]["environment"]["PROMETHEUS_ENDPOINT"],
    }
    assert set(targets) == {"kubegate-control", "kubegate-agent", "temporal-server"}
    for target in targets.values():
        service, _, port = target.partition(":")
        assert listening[service] == f"0.0.0.0:{port}", (target, listening)
