"""Under ``CI=true`` a skip nobody expected fails the run.

A module-level ``importorskip`` (``libtpu`` missing: every plan and Mosaic test) or a setup error
turned into a skip hides a whole area of tests behind one "s"; in CI that must be a failure.
The expected skips are listed here, by marker: ``accelerator`` tests on a host without a TPU or
GPU (CI runs on CPU). ``tests/conftest.py`` registers ``SkipPolicy`` on the controlling process
(with xdist, the workers' reports reach it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytest

EXPECTED_SKIP_MARKERS = {"accelerator": "needs a TPU or GPU; CI runs on a CPU"}


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get("CI", "").lower() in ("1", "true", "yes")


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr)
    return text.removeprefix("Skipped: ")


def register(config: pytest.Config) -> None:
    """``pytest_configure``: the policy on the controlling process of a CI run, else nothing."""
    if in_ci() and not hasattr(config, "workerinput"):
        config.pluginmanager.register(SkipPolicy(), "dflash-skip-policy")


class SkipPolicy:
    """Collects skipped tests and modules without an expected marker; fails the session on any."""

    def __init__(self, expected_markers: Mapping[str, str] = EXPECTED_SKIP_MARKERS):
        self.expected = set(expected_markers)
        self.unexpected: list[str] = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a whole module (or class) skipped at collection
            self.unexpected.append(f"{report.nodeid}: {_reason(report)}")

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail") and not self.expected & set(report.keywords):
            self.unexpected.append(f"{report.nodeid}: {_reason(report)}")

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.unexpected:
            terminalreporter.section("unexpected skips (CI=true): each fails the run", red=True)
            for line in self.unexpected:
                terminalreporter.line(line)
            terminalreporter.line(f"expected skips: tests marked {', '.join(sorted(self.expected))} "
                                  "(tests/skip_policy.py)")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.unexpected and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
