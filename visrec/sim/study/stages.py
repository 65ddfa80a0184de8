"""Stage bookkeeping of the study: each stage's wall and CPU seconds, and with `resume` the reuse
of stages an earlier run of the same config finished."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from visrec.sim.study.config import StudyConfig

log = logging.getLogger(__name__)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (loader workers, servers): on a shared
    machine it says what a stage costs when the wall clock says how busy the machine was."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageRunner:
    """Runs the study's stages in order, timing each; with `resume`, a stage that finished in an
    earlier run of the same config (its marker in `stages/`) is not run again."""

    def __init__(self, root: Path, config: StudyConfig):
        self.root = root / "stages"
        self.root.mkdir(parents=True, exist_ok=True)
        self.resume = config.resume
        self.fingerprint = json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k != "resume"},
                                      sort_keys=True, default=str)
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.reused: list[str] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        marker = self.root / f"{name}.json"
        if self.resume and marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("config") == self.fingerprint:
                self.seconds[name], self.cpu_seconds[name] = saved["seconds"], saved.get("cpu_seconds")
                self.reused.append(name)
                log.info("study: reusing stage %s (%.1fs when it ran)", name, saved["seconds"])
                return saved["result"]
        log.info("study: stage %s ...", name)
        started, cpu = time.monotonic(), cpu_seconds()
        result = fn()
        self.seconds[name] = round(time.monotonic() - started, 2)
        self.cpu_seconds[name] = round(cpu_seconds() - cpu, 2)
        marker.write_text(json.dumps({"seconds": self.seconds[name], "cpu_seconds": self.cpu_seconds[name],
                                      "config": self.fingerprint, "result": result}, default=str))
        log.info("study: stage %s done in %.1fs", name, self.seconds[name])
        return result
