"""Version rule and report verdicts."""

from __future__ import annotations

import pytest

from domain.preflight import CheckResult, CheckStatus, PreflightReport, version_supported


@pytest.mark.parametrize(
    ("version", "build", "ok"),
    [
        ("6.5.0", "7312210", False),
        ("6.7.0", "13643870", False),  # 6.7 U2
        ("6.7.0", "14367737", True),  # 6.7 U3 GA
        ("6.7.0", "", False),
        ("7.0.0", "15952498", True),
        ("8.0.2", "22617221", True),
        ("10.0", "1", True),
    ],
)
def test_version_supported(version: str, build: str, ok: bool) -> None:
    assert version_supported(version, build) is ok


def test_report_passes_unless_something_failed() -> None:
    def report(*statuses: CheckStatus) -> PreflightReport:
        return PreflightReport(
            account="a",
            gateway="g",
            server="s",
            username="u",
            vcenter_requests=0,
            results=[CheckResult(check="c", title="t", status=s) for s in statuses],
        )

    assert report(CheckStatus.PASS, CheckStatus.WARN, CheckStatus.SKIPPED).passed
    assert not report(CheckStatus.PASS, CheckStatus.FAIL).passed
