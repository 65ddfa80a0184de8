"""A kfp.local run's output goes to log files; the terminal gets one line per task.

The markers `pipelines.task_logs` splits on are kfp.local's own log records, so these tests
run real (tiny) kfp.local pipelines: a kfp upgrade that rewords them fails here.
"""

# No `from __future__ import annotations` here: KFP reads the components' annotations as types.
import io
import os
import sys
from pathlib import Path

import pytest
from kfp import dsl, local

from pipelines.task_logs import TaskLogSplitter, capture_task_logs


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def shout(text: str) -> str:
    print(f"shouting {text}")
    return text.upper()


@dsl.component(base_image="python:3.11", install_kfp_package=False)
def fail(text: str) -> str:
    for i in range(60):
        print(f"working on line {i}")
    raise ValueError(f"cannot handle {text}")


@dsl.pipeline(name="tiny-ok")
def ok_pipeline(text: str = "hello"):
    first = shout(text=text)
    shout(text=first.output)


@dsl.pipeline(name="tiny-failing")
def failing_pipeline(text: str = "hello"):
    fail(text=shout(text=text).output)


def _run(pipeline, tmp_path: Path, capsys) -> tuple[Path, str, str]:
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)
    logs = tmp_path / "logs"
    with capture_task_logs(logs):
        print("a parent-process line", file=sys.stderr)
        os.write(2, b"a native write\n")
        try:
            pipeline()
            error = ""
        except RuntimeError as exc:
            error = str(exc)
    return logs, capsys.readouterr().out, error


def test_a_run_prints_one_line_per_task_and_logs_everything(tmp_path, capsys):
    logs, out, error = _run(ok_pipeline, tmp_path, capsys)
    assert not error
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["shout", "SUCCESS"], ["shout-2", "SUCCESS"]], out
    assert all(line.endswith(" s") for line in lines)
    assert "shouting hello" in (logs / "shout.log").read_text()
    assert "shouting HELLO" in (logs / "shout-2.log").read_text()
    assert "shouting hello" not in (logs / "shout-2.log").read_text()
    everything = (logs / "pipeline.log").read_text()
    assert "Got executor_input" in everything
    assert "a parent-process line" in everything and "a native write" in everything
    assert "Pipeline" in everything and "\x1b[" not in (logs / "shout.log").read_text()


def test_a_failed_task_shows_the_tail_of_its_log_and_where_it_is(tmp_path, capsys):
    logs, out, error = _run(failing_pipeline, tmp_path, capsys)
    assert "fail" in error
    assert out.splitlines()[0].split()[:2] == ["shout", "SUCCESS"]
    assert "  fail " in out and "FAILURE" in out
    assert "ValueError: cannot handle HELLO" in out
    assert "working on line 59" in out and "working on line 0\n" not in out  # the tail only
    assert f"full log: {logs / 'fail.log'}" in out
    assert "working on line 0" in (logs / "fail.log").read_text()


def test_a_task_the_run_stopped_in_is_reported(tmp_path):
    terminal = io.StringIO()
    splitter = TaskLogSplitter(tmp_path, terminal, tail_lines=2)
    splitter.line("12:00:00.000 - INFO - Running pipeline: \x1b[95m'p'\x1b[0m")
    splitter.line("12:00:00.100 - INFO - Executing task \x1b[96m'train'\x1b[0m")
    splitter.line("    step 1")
    splitter.line("    step 2")
    splitter.close()
    assert not (tmp_path / "p.log").exists()
    assert (tmp_path / "train.log").read_text().splitlines()[1:] == ["    step 1", "    step 2"]
    assert terminal.getvalue().split("\n")[0].split() == ["train", "did", "not", "finish"]
    assert "    |     step 2" in terminal.getvalue() and f"full log: {tmp_path / 'train.log'}" in terminal.getvalue()


@pytest.mark.parametrize("midnight", [False, True])
def test_seconds_come_from_kfp_timestamps(tmp_path, midnight):
    terminal = io.StringIO()
    splitter = TaskLogSplitter(tmp_path, terminal)
    start, end = ("23:59:59.500", "00:00:02.000") if midnight else ("12:00:00.500", "12:00:03.000")
    splitter.line(f"{start} - INFO - Executing task 'embed'")
    splitter.line(f"{end} - INFO - Task 'embed' finished with status SUCCESS")
    splitter.line(f"{end} - INFO - Pipeline 'p' finished with status SUCCESS")
    splitter.close()
    assert terminal.getvalue().split() == ["embed", "SUCCESS", "2.5", "s"]
    assert "Pipeline" not in (tmp_path / "embed.log").read_text()
