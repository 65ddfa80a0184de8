"""A quiet kfp.local run: every task's output in a log file, one progress line per task on the terminal.

kfp.local's SubprocessRunner copies each task's whole output (its executor input, every
library's logging, its outputs with every metric) to this process's stdout and logs its own
progress there too: about 1,200 lines for one demo run. `capture_task_logs` points file
descriptors 1 and 2 at `pipeline.log` for the duration of a run, so everything this process,
kfp.local and native code print lands there, while a thread following that file copies each
task's lines to `<task>.log` and prints one line per task (name, status, seconds) to the
terminal; a failed task's line is followed by the tail of its log and the log's path.

Task boundaries are kfp.local's own log records (`Executing task 'NAME'`, `Task 'NAME' finished
with status STATUS`, formatted `HH:MM:SS.mmm - LEVEL - message`); kfp.local runs a pipeline's
tasks one after another. Should a kfp release word them differently, the run still works and
`pipeline.log` still holds everything; only the progress lines are missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Iterator, TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*m")  # kfp.local colours task names and statuses
_RECORD = r"^(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d\.\d+) - \w+ - "
STARTED = re.compile(_RECORD + r"Executing task '(?P<task>[^']+)'$")
FINISHED = re.compile(_RECORD + r"Task '(?P<task>[^']+)' finished with status (?P<status>\w+)$")
PIPELINE_FINISHED = re.compile(_RECORD + r"Pipeline '[^']+' finished with status")
TAIL_LINES = 40
POLL_SECONDS = 0.2
PIPELINE_LOG = "pipeline.log"


def _clock(record: re.Match) -> float:
    """Seconds since midnight of a kfp.local log record's timestamp."""
    return int(record["h"]) * 3600 + int(record["m"]) * 60 + float(record["s"])


class TaskLogSplitter:
    """Routes the lines of a kfp.local run's output: a task's lines (from its `Executing task`
    record to the next task's or the pipeline's end) to `log_dir/<task>.log`, one progress line
    per task to `terminal`, and a failed task's last `tail_lines` lines after its progress line.
    A retried task's attempts share one log file.
    """

    def __init__(self, log_dir: Path, terminal: TextIO, tail_lines: int = TAIL_LINES) -> None:
        self.log_dir, self.terminal = log_dir, terminal
        self._task: str | None = None
        self._file: TextIO | None = None
        self._started = 0.0
        self._finished = False
        self._tail: deque[str] = deque(maxlen=tail_lines)

    def line(self, raw: str) -> None:
        """Route one line of output (without its newline)."""
        line = ANSI.sub("", raw)
        if started := STARTED.match(line):
            self._open(started["task"], _clock(started))
        elif PIPELINE_FINISHED.match(line):
            self._close()
        if self._file is None:
            return
        self._file.write(line + "\n")
        self._tail.append(line)
        finished = FINISHED.match(line)
        if finished and finished["task"] == self._task:
            # Modulo a day: a task may run past midnight.
            self._report(finished["status"], (_clock(finished) - self._started) % 86400)

    def close(self) -> None:
        """End of the run: a task still open did not finish (the run was interrupted)."""
        self._close()
        self.terminal.flush()

    def log_path(self, task: str) -> Path:
        return self.log_dir / f"{task}.log"

    def _open(self, task: str, clock: float) -> None:
        self._close()
        self._task, self._started, self._finished = task, clock, False
        self._file = open(self.log_path(task), "a", encoding="utf-8")
        self._tail.clear()
        # Name first, status when it ends: the terminal shows which task is running.
        self.terminal.write(f"  {task:<24}")
        self.terminal.flush()

    def _report(self, status: str, seconds: float) -> None:
        self._finished = True
        self.terminal.write(f"{status:<8}{seconds:8.1f} s\n")
        if status != "SUCCESS":
            self._show_tail()
        self.terminal.flush()

    def _show_tail(self) -> None:
        self.terminal.write("".join(f"    | {line}\n" for line in self._tail))
        self.terminal.write(f"    full log: {self.log_path(self._task)}\n")

    def _close(self) -> None:
        if self._file is None:
            return
        if not self._finished:
            self.terminal.write("did not finish\n")
            self._show_tail()
        self._file.close()
        self._file, self._task = None, None


def _follow(path: Path, splitter: TaskLogSplitter, stop: threading.Event) -> None:
    """Feed `path`'s lines to `splitter` as they are written, until `stop` is set and all is read."""
    pending = b""
    with open(path, "rb") as fh:
        while True:
            stopping = stop.is_set()  # before reading: the last read then sees everything
            pending += fh.read()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                splitter.line(line.decode("utf-8", "replace").rstrip("\r"))
            if stopping:
                break
            stop.wait(POLL_SECONDS)
    if pending:
        splitter.line(pending.decode("utf-8", "replace"))


def _terminal(stack: contextlib.ExitStack) -> TextIO:
    """Where progress goes: a copy of stdout's descriptor taken before it is redirected, or
    stdout itself when it has no descriptor (then redirecting descriptors does not touch it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return sys.stdout
    return stack.enter_context(open(os.dup(fd), "w", buffering=1, encoding=sys.stdout.encoding or "utf-8",
                                    errors="replace"))


@contextlib.contextmanager
def capture_task_logs(log_dir: Path) -> Iterator[Path]:
    """Within the block, all output goes to `log_dir/pipeline.log` (yielded) and, split by
    `TaskLogSplitter`, to one log per kfp.local task; the terminal gets one line per task."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / PIPELINE_LOG
    with contextlib.ExitStack() as stack:
        splitter = TaskLogSplitter(log_dir, _terminal(stack))
        streams = sys.stdout, sys.stderr
        for stream in streams:
            stream.flush()
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        with open(path, "ab") as log:
            for fd in saved:
                os.dup2(log.fileno(), fd)
        # Python-level writers reach the descriptors line by line even where sys.stdout was not
        # descriptor 1 (pytest's capture). Never closed: a logging handler created meanwhile
        # keeps writing through them, to the restored descriptors.
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(path, splitter, stop), name="task-logs", daemon=True)
        follower.start()
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = streams
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            stop.set()
            follower.join()
            splitter.close()
