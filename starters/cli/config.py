"""`kubegate config …`: the contexts of the config file (plumbing/contexts.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from domain import errors
from plumbing.contexts import (
    CONTEXT_ENV,
    ConfigFile,
    Context,
    ContextError,
    config_path,
    context_name,
    load_config,
    save_config,
)
from starters.cli.common import (
    EXIT_FAILED,
    Output,
    OutputOption,
    _bad_input,
    config_app,
    err,
    out,
    print_data,
)

ContextArg = Annotated[str, typer.Argument(help="Context name.")]


def _config() -> tuple[Path, ConfigFile]:
    """The config file's path and contents; a bad file is exit 2 naming the field."""
    path = config_path()
    try:
        return path, load_config(path)
    except ContextError as exc:
        _bad_input(str(exc))


@config_app.command("view")
def config_view(output: OutputOption = Output.yaml) -> None:
    """The config file's contents (it holds no secret: API keys are named by a file)."""
    path, config = _config()
    err.print(f"# {path}", markup=False, highlight=False)
    print_data(Output.json if output is Output.json else Output.yaml, config.dump())


@config_app.command("get-contexts")
def config_get_contexts(output: OutputOption = Output.table) -> None:
    """Every context; the one in use is marked `*`."""
    _, config = _config()
    current = context_name(config)
    if output.data:
        rows = [
            {"name": n, "current": n == current, **c.model_dump(mode="json", exclude_none=True)}
            for n, c in config.contexts.items()
        ]
        print_data(output, rows)
        return
    table = Table()
    columns = ["current", "name", "address", "namespace", "gateway", "tls"]
    if output is Output.wide:
        columns += ["ui", "api key file"]
    for column in columns:
        table.add_column(column)
    for name, c in config.contexts.items():
        row = [
            "*" if name == current else "",
            name,
            c.address,
            c.namespace,
            c.gateway or "",
            "yes" if c.tls or c.tls_cert else "no",
        ]
        if output is Output.wide:
            row += [c.ui or "", str(c.api_key_file or "")]
        table.add_row(*row)
    out.print(table)


@config_app.command("current-context")
def config_current_context() -> None:
    """The name of the context in use (KUBEGATE_CONTEXT or the file's current-context)."""
    path, config = _config()
    name = context_name(config)
    if not name:
        err.print(
            f"error: no context is in use ({path} sets no current-context and "
            f"{CONTEXT_ENV} is not set)",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED)
    print(name)


@config_app.command("use-context")
def config_use_context(name: ContextArg) -> None:
    """Make NAME the file's current context."""
    path, config = _config()
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none"
        _bad_input(f"NAME: no context {name!r} in {path} (contexts: {known})")
    config.current_context = name
    save_config(config, path)
    out.print(f'switched to context "{name}"', markup=False, highlight=False)
    if os.environ.get(CONTEXT_ENV) and os.environ[CONTEXT_ENV] != name:
        err.print(
            f"note: {CONTEXT_ENV}={os.environ[CONTEXT_ENV]} is set and wins in this shell",
            markup=False,
            highlight=False,
        )


@config_app.command("set-context")
def config_set_context(
    name: ContextArg,
    address: Annotated[
        str | None, typer.Option(help="Temporal frontend, host:port (needed for a new context).")
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="Temporal namespace.")] = None,
    gateway: Annotated[str | None, typer.Option(help="The default gateway.")] = None,
    tls: Annotated[bool | None, typer.Option("--tls/--no-tls", help="TLS to Temporal.")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA bundle (PEM).")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate (mTLS).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client key (mTLS).")] = None,
    tls_server_name: Annotated[str | None, typer.Option(help="Server name to verify.")] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="File whose first line is the API key (never the key).")
    ] = None,
    ui: Annotated[str | None, typer.Option(help="The Web UI's address, for links.")] = None,
    use: Annotated[bool, typer.Option("--use", help="Also make it the current context.")] = False,
) -> None:
    """Add a context, or change the fields given of one. The first context becomes current."""
    path, config = _config()
    given = {
        "address": address,
        "namespace": namespace,
        "gateway": gateway,
        "tls": tls,
        "tls_ca": tls_ca.resolve() if tls_ca else None,
        "tls_cert": tls_cert.resolve() if tls_cert else None,
        "tls_key": tls_key.resolve() if tls_key else None,
        "tls_server_name": tls_server_name,
        "api_key_file": api_key_file.resolve() if api_key_file else None,
        "ui": ui,
    }
    existing = config.contexts.get(name)
    data = existing.model_dump(exclude_none=True) if existing else {}
    data.update({k: v for k, v in given.items() if v is not None})
    if "address" not in data:
        _bad_input(f"--address: context {name!r} is new and needs a Temporal address (host:port)")
    try:
        context = Context.model_validate(data)
        config.contexts[name] = context
        config = type(config).model_validate(config.dump())
    except ValidationError as exc:
        lines = [f"context {name}: {exc.error_count()} invalid field(s)"]
        _bad_input("\n".join(lines + [f"  {e}" for e in errors.field_errors(exc)]))
    if use or not config.current_context:
        config.current_context = name
    save_config(config, path)
    verb = "changed" if existing else "added"
    current = " (current)" if config.current_context == name else ""
    out.print(f"context {name} {verb}{current} in {path}", markup=False, highlight=False)


@config_app.command("delete-context")
def config_delete_context(name: ContextArg) -> None:
    """Remove a context (the current one too: then no context is current)."""
    path, config = _config()
    if name not in config.contexts:
        _bad_input(f"NAME: no context {name!r} in {path}")
    del config.contexts[name]
    if config.current_context == name:
        config.current_context = None
    save_config(config, path)
    out.print(f"context {name} deleted from {path}", markup=False, highlight=False)
