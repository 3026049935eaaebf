"""Contexts: named Temporal endpoints in a config file, as kubectl keeps clusters.

The file (`KUBEGATE_CONFIG`, else `$XDG_CONFIG_HOME/kubegate/config.yaml`, else
`~/.config/kubegate/config.yaml`)::

    current-context: lab
    contexts:
      lab:
        address: temporal.lab.example.com:7233
        namespace: kubegate
        tls: true
        tls_ca: /etc/kubegate/ca.pem
        gateway: lab

The context in use is `KUBEGATE_CONTEXT` (the CLI's `--context`), else `current-context`.
Its values are defaults of the settings (plumbing/settings.py): a `KUBEGATE_*` variable set in
the environment still wins. The file holds no secret: an API key is named by a file
(`api_key_file`), never written in it.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from domain import errors

CONFIG_ENV = "KUBEGATE_CONFIG"
CONTEXT_ENV = "KUBEGATE_CONTEXT"
#: KUBEGATE_CONTEXT=none (`--context none`): no context, whatever the file says (the dev
#: stack runs so: its processes are this machine's, never a context's endpoint)
NO_CONTEXT = "none"
#: (set by the CLI with --context: errors name the option rather than the variable)
SOURCE_ENV = "KUBEGATE_CONTEXT_SOURCE"
#: a context's name: what `use-context` takes (a DNS-label-like word, dots allowed)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class ContextError(ValueError):
    """The config file cannot be read or broke a rule, or the context named is not in it."""


class Context(BaseModel):
    """One Temporal endpoint and what goes with it."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(description="Temporal frontend host:port")
    namespace: str = Field(default="default", min_length=1, max_length=255)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    api_key_file: Path | None = Field(
        default=None, description="a file whose first line is the API key (Temporal Cloud)"
    )
    gateway: str | None = Field(default=None, description="the default gateway")
    ui: str | None = Field(
        default=None, pattern=r"^https?://\S+$", description="the Web UI's address, for links"
    )

    @field_validator("address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or any(c.isspace() or c == "/" for c in host) or not port.isdigit():
            raise ValueError("must be host:port (no scheme), e.g. temporal.example.com:7233")
        if not 0 < int(port) < 65536:
            raise ValueError("the port must be 1-65535")
        return value

    def settings(self) -> dict[str, Any]:
        """The settings this context gives (names of plumbing.settings.Settings)."""
        values: dict[str, Any] = {
            "temporal_address": self.address,
            "temporal_namespace": self.namespace,
            "temporal_tls": self.tls,
        }
        for field in ("tls_ca", "tls_cert", "tls_key", "tls_server_name"):
            value = getattr(self, field)
            if value is not None:
                values[f"temporal_{field}"] = value
        if self.api_key_file is not None:
            try:
                values["temporal_api_key"] = self.api_key_file.read_text().splitlines()[0].strip()
            except (OSError, IndexError, UnicodeDecodeError):
                raise ContextError(
                    f"api_key_file: cannot read an API key from {self.api_key_file}"
                ) from None
        if self.gateway is not None:
            values["gateway"] = self.gateway
        if self.ui is not None:
            values["ui_url"] = self.ui.rstrip("/")
        return values


class ConfigFile(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    current_context: str | None = Field(default=None, alias="current-context")
    contexts: dict[str, Context] = Field(default_factory=dict)

    @field_validator("contexts")
    @classmethod
    def _names(cls, contexts: dict[str, Context]) -> dict[str, Context]:
        for name in contexts:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"context name {name!r} must match {NAME_PATTERN}")
            if name == NO_CONTEXT:
                raise ValueError(f"context name {NO_CONTEXT!r} is kept for 'no context'")
        return contexts

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def config_path() -> Path:
    """Where the config file is."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kubegate" / "config.yaml"


def load_config(path: Path | None = None) -> ConfigFile:
    """The file's contexts (none when there is no file); ContextError naming the field."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ConfigFile()
    except (OSError, UnicodeDecodeError) as exc:
        raise ContextError(f"{path}: cannot read it ({type(exc).__name__})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ContextError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return ConfigFile()
    if not isinstance(data, dict):
        raise ContextError(f"{path}: expected a mapping at the top level")
    try:
        return ConfigFile.model_validate(data)
    except ValidationError as exc:
        lines = [f"{path}: {exc.error_count()} invalid field(s)"]
        raise ContextError(
            "\n".join(lines + [f"  {e}" for e in errors.field_errors(exc)])
        ) from None


def save_config(config: ConfigFile, path: Path | None = None) -> Path:
    """Write the file whole (0600, its folder 0700), atomically."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = yaml.safe_dump(config.dump(), sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def context_name(config: ConfigFile) -> str | None:
    """The context in use: KUBEGATE_CONTEXT, else the file's current-context."""
    return os.environ.get(CONTEXT_ENV) or config.current_context


def active_context() -> tuple[str, Context] | None:
    """The context in use and its values; None without one. ContextError when the one
    named is not in the file."""
    path = config_path()
    config = load_config(path)
    name = context_name(config)
    if not name or name == NO_CONTEXT:
        return None
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none"
        source = (
            os.environ.get(SOURCE_ENV, CONTEXT_ENV)
            if os.environ.get(CONTEXT_ENV)
            else "current-context"
        )
        raise ContextError(f"{source}: no context {name!r} in {path} (contexts: {known})")
    return name, config.contexts[name]
