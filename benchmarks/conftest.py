"""Benchmark plumbing: each suite records (name, value, unit, note) rows and ratios against a
baseline measured in the same run; they are printed together at the end of the session.

Run: python -m pytest benchmarks/ --benchmark-only  (or benchmarks/gpu_check.sh on a GPU)
"""
import platform
import time

import pytest

ROWS: list[tuple[str, str, str]] = []


def record(name: str, value: str, note: str = "") -> None:
    ROWS.append((name, value, note))


@pytest.fixture
def report():
    return record


def pytest_terminal_summary(terminalreporter):
    if not ROWS:
        return
    tr = terminalreporter
    tr.section(f"pyasgd results ({time.strftime('%Y-%m-%d')}, {platform.node()}, {platform.processor() or platform.machine()})")
    width = max(len(r[0]) for r in ROWS)
    for name, value, note in ROWS:
        tr.write_line(f"{name:<{width}}  {value:>14}  {note}")
