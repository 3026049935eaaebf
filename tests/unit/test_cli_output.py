"""What the CLI prints is data, printed verbatim: no emoji codes, no highlighting, and outside
a terminal no wrapping and no cutting (starters/cli/common.py)."""

from __future__ import annotations

import pytest
from rich.table import Table

from starters.cli import common

THUMBPRINT = "5B:E3:2C:41:AB:43:9D:0F:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:12"


def test_a_thumbprint_is_printed_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    console = common._console()
    console.print(f"thumbprint {THUMBPRINT}")
    assert capsys.readouterr().out.strip() == f"thumbprint {THUMBPRINT}"


def test_outside_a_terminal_nothing_is_wrapped_or_cut(capsys: pytest.CaptureFixture[str]) -> None:
    console = common._console()
    long = "x" * 300
    console.print(f"line {long}")
    table = Table()
    table.add_column("detail")
    table.add_row(common._short(long, 60))
    console.print(table)
    printed = capsys.readouterr().out
    assert f"line {long}\n" in printed
    assert long in printed and "…" not in printed


def test_ages_read_as_kubectl_prints_them() -> None:
    from datetime import timedelta

    from starters.cli.cluster import age

    assert [age(timedelta(seconds=s)) for s in (0, 45, 60, 7200, 3 * 86400 + 5)] == [
        "0s",
        "45s",
        "1m",
        "2h",
        "3d",
    ]
