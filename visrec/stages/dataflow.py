"""Running a stage's Beam pipeline: locally, or on Dataflow at most once per pipeline task.

A Vertex AI pipeline task that launches a Dataflow job can be retried (a lost launcher VM,
a transient error) while its first job still runs. Each launch therefore uses a job name
derived from the pipeline run and the task (`job_name`), and before launching the launcher
looks for an active job of that name (`find_active_job`): if there is one it waits on it
instead of starting a second, which Dataflow would refuse anyway ("already an active job
named ..."). While the launcher waits, SIGTERM (what a cancelled pipeline run sends the
task's container) cancels the Dataflow job, so a cancelled run stops spending workers.
The Dataflow calls go through the `google-cloud-dataflow-client` GAPIC clients, the same
ones Beam's DataflowRunner uses to submit the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import signal
import time
from typing import Any, Callable, Iterator, Sequence

from visrec.core.errors import UserError

log = logging.getLogger(__name__)

DATAFLOW_RUNNER = "DataflowRunner"
_NAME_MAX = 63  # what the Dataflow console and gcloud accept for a job name
_TERMINAL = ("JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_UPDATED",
             "JOB_STATE_DRAINED")


def job_name(pipeline_job: str, task: str) -> str:
    """A Dataflow job name for one task of one pipeline run: `visrec-<task>-<12 hex digits of a
    hash of both>`, the same on every retry of the task and different for every other task and
    run; valid for Dataflow (`[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 characters)."""
    if not pipeline_job or not task:
        raise UserError(f"a Dataflow job name needs the pipeline run and the task, got {pipeline_job!r}, {task!r}")
    digest = hashlib.sha256(f"{pipeline_job}\0{task}".encode()).hexdigest()[:12]
    readable = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:_NAME_MAX - 20].strip("-")
    return f"visrec-{readable}-{digest}" if readable else f"visrec-{digest}"


def with_job_name(beam_options: list[str], name: str) -> list[str]:
    """`beam_options` with `--job_name=name`, unless the user already named the job."""
    if any(option.startswith("--job_name") for option in beam_options):
        return list(beam_options)
    return [*beam_options, f"--job_name={name}"]


def task_options(runner: str, beam_options: list, pipeline_job: str, task: str) -> list[str]:
    """A pipeline task's Beam flags: on Dataflow, named after the run and the task (`job_name`)."""
    options = [str(option) for option in beam_options]
    return with_job_name(options, job_name(pipeline_job, task)) if runner == DATAFLOW_RUNNER else options


def _jobs_client() -> Any:
    from google.cloud import dataflow_v1beta3

    return dataflow_v1beta3.JobsV1Beta3Client()


def find_active_job(project: str, region: str, name: str) -> Any | None:
    """The active (not yet terminal) Dataflow job named `name`, or None."""
    from google.cloud import dataflow_v1beta3 as dataflow

    request = dataflow.ListJobsRequest(project_id=project, location=region,
                                       filter=dataflow.ListJobsRequest.Filter.ACTIVE)
    for job in _jobs_client().list_jobs(request=request):
        if job.name == name:
            return job
    return None


def wait_for_job(project: str, region: str, job_id: str, poll_seconds: float = 30.0) -> str:
    """Poll a Dataflow job until it is terminal; returns its state's name (`JOB_STATE_DONE`, ...)."""
    from google.cloud import dataflow_v1beta3 as dataflow

    client = _jobs_client()
    request = dataflow.GetJobRequest(project_id=project, location=region, job_id=job_id)
    last = None
    while True:
        state = client.get_job(request=request).current_state.name
        if state != last:
            log.info("Dataflow job %s: %s", job_id, state)
            last = state
        if state in _TERMINAL:
            return state
        time.sleep(poll_seconds)


def cancel_job(project: str, region: str, job_id: str) -> None:
    """Ask Dataflow to cancel a job (it stops its workers; the job ends JOB_STATE_CANCELLED)."""
    from google.cloud import dataflow_v1beta3 as dataflow

    _jobs_client().update_job(request=dataflow.UpdateJobRequest(
        project_id=project, location=region, job_id=job_id,
        job=dataflow.Job(requested_state=dataflow.JobState.JOB_STATE_CANCELLED)))
    log.warning("asked Dataflow to cancel job %s", job_id)


@contextlib.contextmanager
def cancel_on_sigterm(cancel: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGTERM calls `cancel` and then ends the process (exit 143)."""
    def handler(signum: int, frame: Any) -> None:
        log.warning("SIGTERM: the pipeline task is being stopped")
        try:
            cancel()
        finally:
            raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def make_pipeline(runner: str, beam_options: Sequence[str]) -> Any:
    """A Beam pipeline for `runner` with `beam_options`; UserError for an unknown runner.

    `DirectRunner` means Beam's Python portable runner (FnApiRunner), which honours
    `--direct_num_workers` and `--direct_running_mode=multi_processing`. Beam's own
    DirectRunner would first try to download the Go Prism runner from GitHub, which
    offline machines cannot, and would run a different engine where it can.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions([f"--runner={runner}", *beam_options])
    try:
        if runner == "DirectRunner":
            from apache_beam.runners.portability.fn_api_runner import FnApiRunner

            return beam.Pipeline(runner=FnApiRunner(), options=options)
        return beam.Pipeline(options=options)
    except (ValueError, ImportError) as exc:  # unknown runner
        raise UserError(f"cannot create a Beam pipeline for runner {runner!r}: {exc}") from None


def run_pipeline(pipeline: Any, before_launch: Callable[[], None] = lambda: None, poll_seconds: float = 30.0) -> None:
    """Run a built Beam pipeline to the end; on Dataflow, attach to the active job of the same
    name instead of launching a second one. RuntimeError unless it ends done.

    `before_launch` runs only when this call launches the pipeline (e.g. clearing an earlier
    run's outputs), never while attaching to a job that is writing them.
    """
    from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions

    options = pipeline.options
    if options.view_as(StandardOptions).runner != DATAFLOW_RUNNER:
        before_launch()
        state = pipeline.run().wait_until_finish()
        if state not in (None, "DONE"):
            raise RuntimeError(f"the Beam pipeline ended in state {state}")
        return
    cloud = options.view_as(GoogleCloudOptions)
    project, region, name = cloud.project, cloud.region, cloud.job_name
    active = find_active_job(project, region, name) if name else None
    if active is not None:
        log.warning("Dataflow job %s (%s) is already running, from an earlier attempt of this task: "
                    "waiting for it instead of launching another", name, active.id)
        with cancel_on_sigterm(lambda: cancel_job(project, region, active.id)):
            state = wait_for_job(project, region, active.id, poll_seconds)
        if state != "JOB_STATE_DONE":
            raise RuntimeError(f"Dataflow job {name} ({active.id}) ended {state}")
        return
    before_launch()
    result = pipeline.run()
    with cancel_on_sigterm(result.cancel):
        state = result.wait_until_finish()
    if state != "DONE":
        raise RuntimeError(f"Dataflow job {name} ({result.job_id()}) ended {state}")
