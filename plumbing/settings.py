"""Settings from the environment (KUBEGATE_*), shared by the CLI, workers and tests; the
context in use (plumbing/contexts.py) gives defaults that the environment overrides."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from plumbing.contexts import active_context


class ContextSource(PydanticBaseSettingsSource):
    """The values of the context in use (KUBEGATE_CONTEXT or the file's current-context),
    unless the Temporal address comes from elsewhere."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        # a context is one unit: with the address given otherwise (KUBEGATE_TEMPORAL_ADDRESS,
        # an argument) none of its values apply — its TLS, API key and namespace are that
        # endpoint's, never to be sent to another
        if "temporal_address" in self.current_state:
            return {}
        active = active_context()
        return {} if active is None else active[1].settings()


class Settings(BaseSettings):
    """Every value can be set as KUBEGATE_<NAME>, e.g. KUBEGATE_TEMPORAL_ADDRESS."""

    model_config = SettingsConfigDict(env_prefix="KUBEGATE_", extra="ignore")

    home: Path = Field(default=Path(".kubegate"), description="State, logs and keys.")
    temporal_address: str = Field(default="127.0.0.1:7233", description="Temporal frontend.")
    temporal_namespace: str = Field(default="default")
    temporal_tls: bool = Field(default=False, description="Use TLS to reach Temporal.")
    temporal_tls_ca: Path | None = Field(default=None, description="CA bundle (PEM).")
    temporal_tls_cert: Path | None = Field(default=None, description="Client cert for mTLS.")
    temporal_tls_key: Path | None = Field(default=None, description="Client key for mTLS.")
    temporal_tls_server_name: str | None = Field(default=None)
    temporal_api_key: str | None = Field(default=None, description="API key (Temporal Cloud).")
    ui_port: int = Field(default=8233, description="Temporal Web UI port of the dev stack.")
    ui_url: str | None = Field(
        default=None,
        description="The Web UI's address for links; default http://<Temporal host>:<ui_port>.",
    )
    vcsim_address: str = Field(default="127.0.0.1:8989", description="Simulator listen address.")
    vcsim_binary: Path | None = Field(
        default=None, description="Simulator binary; default <home>/bin/vcsim."
    )
    vcsim_options: str = Field(
        default="-clusters 2 -hosts 3 -ntp 0.pool.ntp.org,1.pool.ntp.org",
        description="Flags for the dev simulator's inventory (see tools/vcsim/README.md).",
    )
    gateway: str = Field(default="local", description="Gateway the dev stack's agent serves.")
    pairing_code_file: Path | None = Field(
        default=None,
        description="File holding the pairing code an agent registers with (first start only; "
        "never the code itself in the environment or on a command line).",
    )
    worker_deployment: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
        description="Worker deployment of the control worker (Temporal worker versioning); "
        "unset: unversioned. Each release's workers register as a version of it; new runs go "
        "to the current version (see docs/operations.md#upgrading-kubegate).",
    )
    worker_promote: bool = Field(
        default=False,
        description="A versioned control worker makes its version current when it starts: "
        "for deployments that replace the worker in place (docker-compose); otherwise a "
        "later version waits for `kubegate worker promote`.",
    )
    worker_build_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,62}$",  # plumbing.versioning.BUILD_ID
        description="Build id of this control worker in its deployment; default the release.",
    )
    agent_threads: int = Field(
        default=8,
        ge=1,
        description="Threads for the agent's vCenter requests and short activities; waits on "
        "vCenter hold none (more threads only contend for the interpreter with the event loop "
        "that waits and heartbeats).",
    )
    workflow_sandbox: bool = Field(
        default=True,
        description="Run workflows in Temporal's sandbox (the control worker). Off, the worker "
        "spends less CPU per workflow task but nothing stops a non-deterministic call.",
    )
    agent_max_tasks: int = Field(
        default=256,
        ge=1,
        description="Tasks an agent runs at once (its global cap; vCenter's per-host and "
        "per-datastore limits apply within it).",
    )
    agent_shutdown_grace: float = Field(
        default=10.0,
        ge=0,
        description="Seconds a stopping agent lets short tasks finish; waits on vCenter stop at "
        "once either way, leaving vCenter's tasks running for the next agent.",
    )
    codec_key_file: Path | None = Field(
        default=None,
        description="Payload encryption keys, one 'KEY_ID BASE64KEY' a line, the last one "
        "encrypts; default <home>/codec.key if it exists (dev up creates it).",
    )
    codec_keys: str | None = Field(
        default=None,
        description="The same keys inline, 'KEY_ID:BASE64KEY,...' (the last one encrypts); "
        "a secret: never given to the dev stack's processes.",
    )
    codec_server_port: int = Field(default=8234, description="Port of `kubegate codec-server`.")
    ui_codec_endpoint: str | None = Field(
        default=None,
        description="Codec server the dev stack's Web UI decodes payloads with "
        "(--ui-codec-endpoint of the dev server), e.g. http://127.0.0.1:8234.",
    )
    metrics_address: str | None = Field(
        default=None,
        pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]*):[0-9]{1,5}$",
        description="HOST:PORT where a worker or agent serves Prometheus metrics (/metrics): "
        "the Temporal SDK's and kubegate's own; unset: none.",
    )
    dev_metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="First metrics port of the dev stack's processes: the control worker, the "
        "system gateway's agent, then `dev agent` agents on the next free ones; 0: free ports.",
    )
    metrics_interval: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between the control worker's counts of lifecycles, IP pools and "
        "agents for its metrics.",
    )
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP endpoint traces are sent to (e.g. http://collector:4318); unset: "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing. Needs the `tracing` extra.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="Log lines as text, or one JSON object per line."
    )
    max_ops_per_host: int = Field(
        default=8, ge=1, description="Concurrent VM operations per ESXi host (vCenter: 8-16 units)."
    )
    max_ops_per_datastore: int = Field(
        default=128, ge=1, description="Concurrent clones per datastore (vCenter's limit: 128)."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then KUBEGATE_* variables, then the context in use, then defaults."""
        return init_settings, env_settings, ContextSource(settings_cls)

    @field_validator("metrics_address", "otel_endpoint", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        """An empty variable (e.g. compose's `${KUBEGATE_OTEL_ENDPOINT:-}`) means unset."""
        return None if value == "" else value

    @property
    def ui_address(self) -> str:
        if self.ui_url:
            return self.ui_url
        host = self.temporal_address.rsplit(":", 1)[0]
        return f"http://{host}:{self.ui_port}"

    @property
    def default_codec_key_file(self) -> Path:
        """Where `dev up` keeps the local stack's payload key."""
        return self.home / "codec.key"

    def account_path(self, name: str) -> Path:
        """Where `cluster deploy` looks for a cloud account file by default."""
        return self.home / "accounts" / f"{name}.yaml"

    def agent_dir(self, gateway: str) -> Path:
        return self.home / "agents" / gateway

    def agent_key_path(self, gateway: str) -> Path:
        return self.agent_dir(gateway) / "agent.key"

    def agent_log_path(self, gateway: str) -> Path:
        return self.agent_dir(gateway) / "agent.log"


def settings_with(**overrides: Any) -> Settings:
    """The settings, with the overrides that are not None (command-line options) winning."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def tool_path(name: str) -> Path:
    """A binary installed beside this Python (temporal, temporal-test-server)."""
    return Path(sys.executable).parent / name


#: where `make setup` builds the simulator: the checkout's own .kubegate/bin
CHECKOUT_VCSIM = Path(__file__).resolve().parents[1] / ".kubegate" / "bin" / "vcsim"


def vcsim_binary(settings: Settings) -> Path:
    """KUBEGATE_VCSIM_BINARY, else the home's bin/vcsim, else the one `make setup` built in
    this checkout (a KUBEGATE_HOME outside the checkout has none of its own)."""
    if settings.vcsim_binary is not None:
        return settings.vcsim_binary
    own = settings.home / "bin" / "vcsim"
    if not own.exists() and CHECKOUT_VCSIM.exists():
        return CHECKOUT_VCSIM
    return own
