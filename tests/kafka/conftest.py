"""Scenarios that account for every record print one summary line each; the lines are shown at the
end of the run (also when output is captured), as the fault scenarios' are."""

from __future__ import annotations

import pytest

LINES: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if LINES:
        terminalreporter.section("record accounting")
        for line in LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def summary_line():
    """summary_line(text): print it and show it again at the end of the run."""

    def record(text: str) -> None:
        print(text)
        LINES.append(text)

    return record
