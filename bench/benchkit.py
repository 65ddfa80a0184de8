"""What every benchmark script shares: the machine description, result tables, the JSON file.

Figures from these scripts are only comparable with the machine named next to them, so
each JSON records it; tables print aligned so a run's output can be pasted into docs.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (title, value: a row key or a function of the row, format spec including the width)
Column = tuple[str, str | Callable[[dict], Any], str]


def machine_info(**extra: Any) -> dict[str, Any]:
    """Platform, processor, cores and Python of this machine, plus `extra` (e.g. the GPU)."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), **extra}


def print_table(rows: Sequence[dict], columns: Sequence[Column]) -> None:
    """`rows` as an aligned text table with a header and a rule."""
    def width(spec: str) -> int:
        digits = "".join(c for c in spec.lstrip("<>^=").split(".")[0].split(",")[0] if c.isdigit())
        return int(digits or 0)

    header = " ".join(f"{title:{'<' if spec.startswith('<') else '>'}{width(spec)}}" for title, _, spec in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        print(" ".join(format(value(row) if callable(value) else row[value], spec) for _, value, spec in columns))


def write_results(path: str | Path, results: dict[str, Any]) -> None:
    """Write a benchmark's results as JSON (creating the directory) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")
