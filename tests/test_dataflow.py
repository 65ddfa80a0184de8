"""Dataflow launches at most once per pipeline task, through the real clients.

Beam's DataflowRunner and visrec's attach-or-launch logic both talk to Dataflow through the
`google-cloud-dataflow-client` GAPIC clients. Only their methods are fake here: they record
the request protos and answer from a small in-memory Dataflow; staging goes to the GCS
emulator. So the tests see the CreateJob request Beam really sends (its job name, worker
image, accelerator options), and that a retried task sends none when its job still runs.
"""

from __future__ import annotations

import copy
import itertools
import os
import signal
import time

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import dataflow_v1beta3 as dataflow

from visrec.stages.dataflow import (cancel_on_sigterm, find_active_job, job_name, make_pipeline, run_pipeline,
                             task_options, with_job_name)
from visrec.core.errors import UserError

PROJECT, REGION = "my-proj", "us-central1"
IMAGE = "us-docker.pkg.dev/my-proj/visrec/beam:build-42"
State = dataflow.JobState


class FakeDataflow:
    """Dataflow's jobs, in memory. `requests` holds (method, request proto) of every call; a job
    runs for `runs_for` polls of `get_job` and then ends `ends`."""

    def __init__(self, runs_for: int = 1, ends: State = State.JOB_STATE_DONE):
        self.requests: list[tuple[str, object]] = []
        self.jobs: dict[str, dataflow.Job] = {}
        self.polls: dict[str, int] = {}
        self.runs_for, self.ends = runs_for, ends
        self._ids = itertools.count(1)

    def install(self, monkeypatch) -> None:
        import google.auth

        # No credentials here: the clients (and Beam's) get anonymous ones; their calls are faked.
        monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), PROJECT))
        fakes = {dataflow.JobsV1Beta3Client: ("create_job", "get_job", "list_jobs", "update_job"),
                 dataflow.MessagesV1Beta3Client: ("list_job_messages",),
                 dataflow.MetricsV1Beta3Client: ("get_job_metrics",)}
        for client, methods in fakes.items():
            for name in methods:
                monkeypatch.setattr(client, name, self._rpc(name))

    def _rpc(self, method: str):
        request_type = getattr(dataflow, "".join(p.capitalize() for p in method.split("_")) + "Request")

        def call(client, request=None, **fields):
            for ignored in ("timeout", "retry", "metadata"):
                fields.pop(ignored, None)
            message = copy.deepcopy(request_type(request if request is not None else fields))
            self.requests.append((method, message))
            return getattr(self, f"_{method}")(message)

        return call

    def requests_of(self, method: str) -> list:
        return [r for m, r in self.requests if m == method]

    def add_job(self, name: str, state: State) -> dataflow.Job:
        job = dataflow.Job(id=f"2026-12-01_00_00_00-{next(self._ids)}", name=name, project_id=PROJECT,
                           location=REGION, current_state=state)
        self.jobs[job.id] = job
        return job

    def _create_job(self, req):
        if any(j.name == req.job.name and j.current_state.name not in TERMINAL for j in self.jobs.values()):
            raise AssertionError(f"Dataflow refuses a second active job named {req.job.name}")
        job = self.add_job(req.job.name, State.JOB_STATE_RUNNING)
        job.environment = req.job.environment
        return copy.deepcopy(job)

    def _get_job(self, req):
        job = self.jobs[req.job_id]
        self.polls[job.id] = self.polls.get(job.id, 0) + 1
        if job.current_state.name not in TERMINAL and self.polls[job.id] > self.runs_for:
            job.current_state = self.ends
        return copy.deepcopy(job)

    def _list_jobs(self, req):
        assert req.filter == dataflow.ListJobsRequest.Filter.ACTIVE
        return [copy.deepcopy(j) for j in self.jobs.values() if j.current_state.name not in TERMINAL]

    def _update_job(self, req):
        job = self.jobs[req.job_id]
        if req.job.requested_state == State.JOB_STATE_CANCELLED:
            job.current_state = State.JOB_STATE_CANCELLED
        return copy.deepcopy(job)

    def _list_job_messages(self, req):
        return []

    def _get_job_metrics(self, req):
        return dataflow.JobMetrics()


TERMINAL = {"JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_UPDATED", "JOB_STATE_DRAINED"}


@pytest.fixture
def fake_dataflow(monkeypatch):
    fake = FakeDataflow()
    fake.install(monkeypatch)
    return fake


def dataflow_options(bucket: str, name: str | None, *extra: str) -> list[str]:
    return [f"--project={PROJECT}", f"--region={REGION}", f"--temp_location=gs://{bucket}/tmp",
            f"--sdk_container_image={IMAGE}", "--sdk_location=container", "--experiments=use_runner_v2",
            *([f"--job_name={name}"] if name else []), *extra]


def tiny_pipeline(options: list[str]):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    pipeline = beam.Pipeline(options=PipelineOptions(["--runner=DataflowRunner", *options]))
    pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x + 1)  # noqa: B018 - building the graph
    return pipeline


def test_job_names_are_per_run_and_task_and_valid():
    first = job_name("0f7c2b9e-5d1a-4a61-9c2e-31b8f2a7d001", "prepare-dataset")
    assert first == job_name("0f7c2b9e-5d1a-4a61-9c2e-31b8f2a7d001", "prepare-dataset")  # a retry: the same
    others = {job_name("0f7c2b9e-5d1a-4a61-9c2e-31b8f2a7d001", "embed"),
              job_name("0f7c2b9e-5d1a-4a61-9c2e-31b8f2a7d001", "embed-2"),
              job_name("1a2b3c4d-0000-0000-0000-000000000000", "prepare-dataset")}
    assert first not in others and len(others) == 3
    import re

    for name in (first, *others, job_name("X" * 300, "Some_Task " * 30)):
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    assert first.startswith("visrec-prepare-dataset-")
    with pytest.raises(UserError):
        job_name("", "prepare-dataset")


def test_task_options_name_only_dataflow_jobs_and_keep_a_users_name():
    assert task_options("DirectRunner", ["--direct_num_workers=2"], "run", "prepare") == ["--direct_num_workers=2"]
    named = task_options("DataflowRunner", ["--project=p"], "run", "prepare")
    assert named == ["--project=p", f"--job_name={job_name('run', 'prepare')}"]
    assert with_job_name(["--job_name=mine"], "other") == ["--job_name=mine"]


def test_a_first_attempt_launches_one_named_job(fake_dataflow, gcs_emulator):
    name = job_name("run-1", "embed")
    gpu = "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
    run_pipeline(tiny_pipeline(dataflow_options(gcs_emulator(), name, gpu, "--machine_type=g2-standard-8")),
                 poll_seconds=0)
    assert [m for m, _ in fake_dataflow.requests][:2] == ["list_jobs", "create_job"]
    [create] = fake_dataflow.requests_of("create_job")
    assert create.job.name == name and create.project_id == PROJECT and create.location == REGION
    [pool] = create.job.environment.worker_pools
    assert pool.sdk_harness_container_images[0].container_image == IMAGE and pool.machine_type == "g2-standard-8"
    assert list(create.job.environment.service_options) == [gpu.split("=", 1)[1]]


def test_a_retry_waits_for_the_job_still_running_instead_of_launching(fake_dataflow, gcs_emulator, caplog):
    name = job_name("run-1", "prepare-dataset")
    running = fake_dataflow.add_job(name, State.JOB_STATE_RUNNING)
    fake_dataflow.add_job("someone-elses-job", State.JOB_STATE_RUNNING)
    fake_dataflow.runs_for = 2
    run_pipeline(tiny_pipeline(dataflow_options(gcs_emulator(), name)), poll_seconds=0)
    assert fake_dataflow.requests_of("create_job") == []
    assert {r.job_id for r in fake_dataflow.requests_of("get_job")} == {running.id}
    assert fake_dataflow.jobs[running.id].current_state == State.JOB_STATE_DONE
    assert "already running" in caplog.text


def test_a_job_that_fails_fails_the_task(fake_dataflow, gcs_emulator):
    name = job_name("run-1", "prepare-dataset")
    fake_dataflow.add_job(name, State.JOB_STATE_RUNNING)
    fake_dataflow.ends = State.JOB_STATE_FAILED
    with pytest.raises(RuntimeError, match="JOB_STATE_FAILED"):
        run_pipeline(tiny_pipeline(dataflow_options(gcs_emulator(), name)), poll_seconds=0)


def test_finished_jobs_of_that_name_do_not_block_a_new_launch(fake_dataflow, gcs_emulator):
    name = job_name("run-1", "prepare-dataset")
    fake_dataflow.add_job(name, State.JOB_STATE_CANCELLED)
    assert find_active_job(PROJECT, REGION, name) is None
    run_pipeline(tiny_pipeline(dataflow_options(gcs_emulator(), name)), poll_seconds=0)
    assert len(fake_dataflow.requests_of("create_job")) == 1


def test_sigterm_while_waiting_cancels_the_dataflow_job(fake_dataflow):
    """A cancelled pipeline run stops its task's container with SIGTERM: the job is cancelled too."""
    from visrec.stages.dataflow import cancel_job

    job = fake_dataflow.add_job("visrec-embed-x", State.JOB_STATE_RUNNING)
    with pytest.raises(SystemExit) as stopped:
        with cancel_on_sigterm(lambda: cancel_job(PROJECT, REGION, job.id)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert stopped.value.code == 128 + signal.SIGTERM
    [update] = fake_dataflow.requests_of("update_job")
    assert update.job_id == job.id and update.job.requested_state == State.JOB_STATE_CANCELLED
    assert fake_dataflow.jobs[job.id].current_state == State.JOB_STATE_CANCELLED
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


@pytest.mark.integration
def test_a_retried_prepare_task_reports_the_stats_of_the_job_it_attached_to(fake_dataflow, gcs_emulator, tmp_path):
    """The first attempt's job wrote the outputs; the retry waits for it and reads them."""
    import json

    from PIL import Image

    from visrec.core import io
    from visrec.stages.configs import PrepareConfig
    from visrec.stages.prepare import run_prepare

    bucket = gcs_emulator()
    rows = []
    for i in range(4):
        local = tmp_path / f"k{i}.jpg"
        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(local)
        io.upload_file(local, f"gs://{bucket}/market/images/k{i}.jpg")
        rows.append({"item_id": f"k{i}", "title": f"item {i}", "image_uri": f"images/k{i}.jpg",
                     "category": "Men/Shoes", "price": 1000 + i, "status": "on_sale",
                     "listed_at": "2024-05-01T00:00:00Z"})
    listings, out = f"gs://{bucket}/market/listings.jsonl", f"gs://{bucket}/prepared"
    io.write_text(listings, "".join(json.dumps(r) + "\n" for r in rows))
    first = run_prepare(PrepareConfig(listings_uri=listings, out_dir=out, val_fraction=0.0, image_size=8, shards=1))
    name = job_name("run-1", "prepare-dataset")
    fake_dataflow.add_job(name, State.JOB_STATE_RUNNING)
    retry = run_prepare(PrepareConfig(listings_uri=listings, out_dir=out, val_fraction=0.0, image_size=8, shards=1,
                                      runner="DataflowRunner", beam_options=dataflow_options(bucket, name)))
    assert fake_dataflow.requests_of("create_job") == []
    assert retry.train_pairs == first.train_pairs == 4


def test_the_direct_runner_runs_in_process_without_reaching_for_prism():
    """`DirectRunner` is Beam's in-process FnApiRunner: Beam's own DirectRunner would first try to
    download the Prism runner binary, which these machines cannot."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    pipeline = make_pipeline("DirectRunner", ["--direct_num_workers=1"])
    assert isinstance(pipeline.runner, FnApiRunner)
    _ = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: x * 2)
    assert pipeline.run().wait_until_finish() == "DONE"
    with pytest.raises(UserError, match="NoSuchRunner"):
        make_pipeline("NoSuchRunner", [])
