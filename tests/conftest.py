"""Shared test configuration: tiers, and a summary that says loudly which tiers did not run.

Tiers are pytest markers (unit, trainer, cluster, e2e, gpu). A test in a tier that cannot run on
this machine is skipped with a reason starting "NOT RUN:", and the summary at the end lists every
such tier, so a missing GPU or Docker engine is never mistaken for a pass.
"""

import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

pytest_plugins = ["tests.cluster.fixtures"]

REPO = Path(__file__).resolve().parents[1]
TIERS = ("unit", "trainer", "cluster", "e2e", "gpu")

_outcomes: dict[str, Counter] = defaultdict(Counter)
_not_run: dict[str, set[str]] = defaultdict(set)


def tier_of(item) -> str:
    for tier in ("gpu", "e2e", "cluster", "trainer", "unit"):  # most specific first
        if item.get_closest_marker(tier):
            return tier
    return "unit"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)
        if item.get_closest_marker("gpu") and not _cuda_available():
            item.add_marker(pytest.mark.skip(reason="NOT RUN: gpu tier needs a CUDA GPU; none on this machine"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        tier = dict(report.user_properties).get("tier", "unit")
        _outcomes[tier][report.outcome] += 1
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            if "NOT RUN" in reason:
                _not_run[tier].add(reason.removeprefix("Skipped: "))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.user_properties.append(("tier", tier_of(item)))


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    terminalreporter.section("kubetune test tiers")
    for tier in TIERS:
        counts = _outcomes.get(tier, Counter())
        line = f"{tier:8} passed={counts['passed']} failed={counts['failed']} skipped={counts['skipped']}"
        write(line)
    for tier, reasons in _not_run.items():
        for reason in sorted(reasons):
            write(f"!!! {tier} tier: {reason}", red=True, bold=True)
    if os.environ.get("CI") and _not_run:
        write("!!! some tiers did NOT run on this CI machine (see above)", red=True, bold=True)
