"""`kubegate codec-server`: decode kubegate's encrypted payloads for the Temporal Web UI.

Registers on the root app of starters/cli/common.py.
"""

from __future__ import annotations

from typing import Annotated

import typer

from starters.cli.common import _bad_input, _failed, app, out


@app.command("codec-server")
def codec_server(
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on (default KUBEGATE_CODEC_SERVER_PORT, 8234)."),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="Origin of a Web UI allowed to call it (repeatable; default the dev "
            "stack's UI, e.g. http://127.0.0.1:8233)."
        ),
    ] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; anyone reaching it can decode.")
    ] = "127.0.0.1",
) -> None:
    """Serve Temporal's codec server protocol (POST /encode, /decode) with the payload keys.

    Point the Web UI at it (its Codec Server setting, or KUBEGATE_UI_CODEC_ENDPOINT before
    `kubegate dev up`) to see payloads decoded; without it they show as encrypted.
    """
    from plumbing.codec import CodecKeyError, load_keys
    from plumbing.settings import Settings
    from starters.codec_server import CodecServer

    settings = Settings()
    try:
        keys = load_keys(settings)
    except CodecKeyError as exc:
        _bad_input(f"payload encryption keys: {exc}")
    if not keys:
        _bad_input(
            "no payload key configured (KUBEGATE_CODEC_KEY_FILE, KUBEGATE_CODEC_KEYS or "
            f"{settings.default_codec_key_file}): nothing to decode with"
        )
    origins = cors_origin or [settings.ui_address]
    try:
        server = CodecServer(
            (host, port or settings.codec_server_port), keys, settings.temporal_namespace, origins
        )
    except OSError as exc:
        _failed(f"cannot listen on {host}:{port or settings.codec_server_port}: {exc.strerror}")
    out.print(
        f"codec server  {server.url}  (namespace {settings.temporal_namespace}, "
        f"keys {', '.join(k.key_id for k in keys)}; CORS {', '.join(origins)})",
        highlight=False,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
