"""The kubegate command (`kubegate …`, `python -m starters.cli …`).

Laid out one module per noun, with no import cycle:

- `common.py`: the typer apps (the root app and one per noun), the consoles, the output
  enum, the shared options and helpers, the `version` command and `main()`. It imports no
  other module of this package.
- `account.py`, `audit.py` (`audit`), `cluster.py`, `codec.py` (`codec-server`), `config.py`,
  `dev.py`,
  `gateway.py`, `ippool.py`, `worker.py`: each registers its commands on the apps of
  `common.py`, the only module of this package it imports.
- this module imports every noun module, so that their commands are registered, and
  re-exports `app` and `main`; `__main__.py` runs `main()`.

Exit codes (docs/cli.md): 0 success; 1 the request ran and failed (e.g. a check failed) or
kubegate could not carry it out; 2 bad input or refused (nothing was started or changed).
"""

from __future__ import annotations

from starters.cli import account, audit, cluster, codec, config, dev, gateway, ippool, worker
from starters.cli.common import app, main

__all__ = [
    "account",
    "app",
    "audit",
    "cluster",
    "codec",
    "config",
    "dev",
    "gateway",
    "ippool",
    "main",
    "worker",
]
