"""The simulator wrapper is our code too: its own end-to-end self-check runs in the suite."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import ROOT, ensure_vcsim_built

pytestmark = pytest.mark.integration


def test_vcsim_selfcheck_passes() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "vcsim" / "selfcheck.py"),
            "--binary",
            str(ensure_vcsim_built()),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " 0 failed" in result.stdout
