"""`python -m starters.cli ARGS`: the kubegate command, as the `kubegate` script runs it."""

from __future__ import annotations

from starters.cli import main

if __name__ == "__main__":
    main()
