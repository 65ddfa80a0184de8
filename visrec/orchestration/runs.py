"""Pipeline run records: how every run ended, kept in the registry (`REGISTRY/runs.jsonl`).

The pipeline's exit handler calls `record_run` whether the run succeeded or failed, so a
scheduled retraining that failed at 3 a.m. is seen by `visrec runs` (and by anyone who
reads the registry) instead of only in the Vertex AI console.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from visrec.core import io

log = logging.getLogger(__name__)

RUNS = "runs.jsonl"
_VERTEX_JOB = "/pipelineJobs/"


def failed_tasks(pipeline_job: str) -> list[str]:
    """Names of the failed tasks of a Vertex AI pipeline job (its task details); [] elsewhere.

    Best effort: the record is written even when the job cannot be read.
    """
    if _VERTEX_JOB not in pipeline_job:
        return []
    try:
        from google.cloud import aiplatform

        job = aiplatform.PipelineJob.get(pipeline_job)
        return sorted(t.task_name for t in job.task_details if t.state.name == "FAILED")
    except Exception as exc:  # noqa: BLE001 - a run record must not fail on a lookup
        log.warning("could not read the task details of %s: %s", pipeline_job, exc)
        return []


def record_run(registry: str, state: str, pipeline_job: str, error: str | None = None,
               parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append how a pipeline run ended (`state`: SUCCEEDED | FAILED | CANCELLED, ...) to
    `REGISTRY/runs.jsonl`; returns the record."""
    record = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "run": pipeline_job,
              "state": state, "failed_tasks": failed_tasks(pipeline_job) if state != "SUCCEEDED" else [],
              "error": error or None, "parameters": parameters or {}}
    io.append_jsonl(io.join(registry, RUNS), record)
    (log.info if state == "SUCCEEDED" else log.error)("run %s ended %s%s", pipeline_job, state,
                                                      f": {error}" if error else "")
    return record


def list_runs(registry: str) -> list[dict[str, Any]]:
    """Every recorded run, oldest first."""
    return io.read_jsonl(io.join(registry, RUNS))
