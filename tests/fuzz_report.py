"""What a fuzz module tried, appended as one JSON line to DIFFPRUNE_FUZZ_REPORT when it is set
(benchmarks/reliability.py reads the file)."""

from __future__ import annotations

import json
import os

REPORT_ENV = "DIFFPRUNE_FUZZ_REPORT"


def append_report(record: dict) -> None:
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(record) + "\n")
