"""Contexts (plumbing/contexts.py, `kubegate config …`) and the output formats every command
shares (`-o table|wide|json|yaml`), run through the real CLI app."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from domain.lifecycle import ClusterState, ClusterStatus
from plumbing.contexts import CONFIG_ENV, CONTEXT_ENV, SOURCE_ENV
from plumbing.settings import Settings
from starters.cli import app
from starters.cli.cluster import load_cluster

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cfg" / "config.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(path))
    for variable in (CONTEXT_ENV, SOURCE_ENV, "KUBEGATE_TEMPORAL_ADDRESS", "KUBEGATE_GATEWAY"):
        monkeypatch.delenv(variable, raising=False)
    return path


def kubegate(*args: str) -> tuple[int, str, str]:
    """One command, as its own process would run it (`--context` sets its environment)."""
    before = {v: os.environ.get(v) for v in (CONTEXT_ENV, SOURCE_ENV)}
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        for variable, value in before.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value
    return result.exit_code, result.stdout, result.stderr


def test_contexts_name_endpoints_and_the_environment_still_wins(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().temporal_address == "127.0.0.1:7233"  # no file: the defaults
    code, out, _ = kubegate(
        "config", "set-context", "lab", "--address", "temporal.lab:7233", "--gateway", "lab"
    )
    assert code == 0 and "(current)" in out
    code, _, _ = kubegate(
        "config", "set-context", "prod", "--address", "t.prod:7233", "--namespace", "kg"
    )
    assert code == 0
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700

    # the first context became current; its values are the settings' defaults
    settings = Settings()
    assert (settings.temporal_address, settings.gateway) == ("temporal.lab:7233", "lab")
    assert kubegate("config", "current-context")[1].strip() == "lab"

    assert kubegate("config", "use-context", "prod")[0] == 0
    settings = Settings()
    assert (settings.temporal_address, settings.temporal_namespace) == ("t.prod:7233", "kg")
    assert settings.gateway == "local"  # prod names no gateway
    assert yaml.safe_load(config.read_text())["current-context"] == "prod"

    # KUBEGATE_CONTEXT picks another for one shell; a KUBEGATE_* variable beats any context
    monkeypatch.setenv(CONTEXT_ENV, "lab")
    assert Settings().temporal_address == "temporal.lab:7233"
    monkeypatch.setenv("KUBEGATE_GATEWAY", "other")
    assert (Settings().temporal_address, Settings().gateway) == ("temporal.lab:7233", "other")
    monkeypatch.delenv("KUBEGATE_GATEWAY")
    monkeypatch.setenv("KUBEGATE_TEMPORAL_ADDRESS", "127.0.0.1:9999")
    assert Settings().temporal_address == "127.0.0.1:9999"
    assert Settings().gateway == "local"  # another endpoint: nothing of the context applies

    rows = json.loads(kubegate("config", "get-contexts", "-o", "json")[1])
    assert [(r["name"], r["current"]) for r in rows] == [("lab", True), ("prod", False)]

    assert kubegate("config", "delete-context", "lab")[0] == 0
    monkeypatch.delenv(CONTEXT_ENV)
    assert list(yaml.safe_load(config.read_text())["contexts"]) == ["prod"]


def test_a_context_that_is_not_there_or_a_bad_file_is_exit_2_naming_it(config: Path) -> None:
    kubegate("config", "set-context", "lab", "--address", "temporal.lab:7233")
    code, _, err = kubegate("--context", "nope", "cluster", "list")
    assert code == 2 and "--context: no context 'nope'" in err and "lab" in err
    code, _, err = kubegate("config", "use-context", "nope")
    assert code == 2 and "no context 'nope'" in err
    code, _, err = kubegate("config", "set-context", "x", "--address", "https://t:7233")
    assert code == 2 and "address: must be host:port" in err
    code, _, err = kubegate("config", "set-context", "y")
    assert code == 2 and "--address" in err
    assert "x" not in yaml.safe_load(config.read_text())["contexts"]  # nothing written

    config.write_text("current-context: lab\ncontexts:\n  lab: {address: 't:1', token: s3cret}\n")
    code, _, err = kubegate("cluster", "list")
    assert code == 2 and "contexts.lab.token" in err and "s3cret" not in err
    config.write_text("contexts: [\n")
    code, _, err = kubegate("config", "get-contexts")
    assert code == 2 and "not valid YAML" in err


def test_an_api_key_is_read_from_its_file_and_never_written_in_the_config(
    config: Path, tmp_path: Path
) -> None:
    key = tmp_path / "api.key"
    key.write_text("k-123\n")
    code, _, _ = kubegate(
        "config", "set-context", "cloud", "--address", "ns.tmprl.cloud:7233", "--tls",
        "--api-key-file", str(key),
    )  # fmt: skip
    assert code == 0
    assert "k-123" not in config.read_text()
    settings = Settings()
    assert settings.temporal_api_key == "k-123" and settings.temporal_tls
    viewed = kubegate("config", "view")[1]
    assert "k-123" not in viewed and str(key) in viewed


def test_yaml_and_json_are_the_data_alone(config: Path) -> None:
    kubegate("config", "set-context", "lab", "--address", "temporal.lab:7233")
    code, out, _ = kubegate("config", "get-contexts", "-o", "yaml")
    assert code == 0
    assert yaml.safe_load(out) == json.loads(kubegate("config", "get-contexts", "-o", "json")[1])
    code, out, _ = kubegate("config", "get-contexts", "-o", "wide")
    assert code == 0 and "api key file" in out


def test_get_output_round_trips_to_apply(tmp_path: Path) -> None:
    """`cluster get -o yaml|json` carries the spec; deploy/apply -f take that document."""
    spec = load_cluster(EXAMPLES / "cluster.yaml")
    state = ClusterState(
        name=spec.name,
        spec=spec,
        account=spec.cloud_account,
        gateway="lab",
        status=ClusterStatus.RUNNING,
    )
    for dump, suffix in ((yaml.safe_dump, "yaml"), (json.dumps, "json")):
        document = tmp_path / f"got.{suffix}"
        document.write_text(dump(json.loads(state.model_dump_json())))
        assert load_cluster(document) == spec


def test_the_dev_stack_uses_no_context(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dev` commands run this machine's stack whatever context is current, and say so."""
    kubegate("config", "set-context", "lab", "--address", "temporal.lab:7233")
    monkeypatch.setenv("KUBEGATE_HOME", str(config.parent / "home"))
    code, out, err = kubegate("dev", "status", "-o", "json")
    assert code == 0, out + err
    assert "context lab is not used by the dev stack" in err
    assert json.loads(out)  # the data alone on stdout
    monkeypatch.setenv(CONTEXT_ENV, "none")
    assert Settings().temporal_address == "127.0.0.1:7233"
    code, _, err = kubegate("config", "set-context", "none", "--address", "x:1")
    assert code == 2 and "kept for 'no context'" in err


def test_a_context_is_one_unit_and_workers_need_one_named(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address given otherwise takes none of the context's values (its TLS, API key and
    namespace belong to its endpoint); a worker or agent uses a context only when named."""
    key = tmp_path / "api.key"
    key.write_text("k-cloud\n")
    kubegate(
        "config", "set-context", "cloud", "--address", "ns.tmprl.cloud:7233", "--tls",
        "--namespace", "prod", "--api-key-file", str(key),
    )  # fmt: skip
    assert Settings().temporal_api_key == "k-cloud"
    assert Settings(temporal_address="installer.local:7233").temporal_api_key is None
    monkeypatch.setenv("KUBEGATE_TEMPORAL_ADDRESS", "127.0.0.1:7233")
    settings = Settings()
    assert (settings.temporal_api_key, settings.temporal_tls) == (None, False)
    assert settings.temporal_namespace == "default"
    monkeypatch.delenv("KUBEGATE_TEMPORAL_ADDRESS")

    from starters.cli.common import process_options

    monkeypatch.delenv(CONTEXT_ENV, raising=False)
    process_options(None, None)  # (what `worker control` and `gateway agent` do first)
    assert Settings().temporal_address == "127.0.0.1:7233"  # the current one is not used
    monkeypatch.setenv(CONTEXT_ENV, "cloud")  # named: used
    process_options(None, None)
    assert Settings().temporal_address == "ns.tmprl.cloud:7233"
