"""`kubegate dev up` with any KUBEGATE_HOME and simulator options holding spaces."""

from __future__ import annotations

from pathlib import Path

import pytest

from plumbing.settings import CHECKOUT_VCSIM, Settings, vcsim_binary
from starters.dev import DevStack, DevStackError


def test_the_simulator_is_found_with_a_home_outside_the_checkout(tmp_path: Path) -> None:
    home = Settings(home=tmp_path / "elsewhere")
    if CHECKOUT_VCSIM.exists():  # (`make setup` built it: the tests' own run has)
        assert vcsim_binary(home) == CHECKOUT_VCSIM
    own = tmp_path / "own" / "bin" / "vcsim"
    own.parent.mkdir(parents=True)
    own.write_text("")
    assert vcsim_binary(Settings(home=tmp_path / "own")) == own  # the home's own first
    chosen = tmp_path / "chosen"
    assert vcsim_binary(Settings(home=tmp_path, vcsim_binary=chosen)) == chosen


def test_simulator_options_may_quote_values_with_spaces(tmp_path: Path) -> None:
    settings = Settings(
        home=tmp_path, vcsim_options='-clusters 2 -dhcp "VM Network=10.20.0.100-10.20.0.199"'
    )
    vcsim = next(c for c in DevStack(settings).components("pw") if c.name == "vcsim")
    at = vcsim.argv.index("-dhcp")
    assert vcsim.argv[at + 1] == "VM Network=10.20.0.100-10.20.0.199"
    broken = Settings(home=tmp_path, vcsim_options='-dhcp "VM Network=1')
    with pytest.raises(DevStackError, match="KUBEGATE_VCSIM_OPTIONS"):
        DevStack(broken).components("pw")
