"""Submitting the compiled pipeline to Vertex AI Pipelines, and recurring retraining schedules.

The keyword arguments are built by pure functions (`pipeline_job_kwargs`, `schedule_kwargs`);
the thin `submit_pipeline` / `create_schedule` / `manage_schedules` wrappers hand them to
the real `google-cloud-aiplatform` classes, and the tests record the GAPIC requests those
classes send (the SDK rewrites some arguments on the way: `enable_caching` overwrites every
task's caching option, so it is passed only when a user asks for that override).

Experiments: `visrec submit --experiment` passes `experiment=` to `PipelineJob.submit`. A
schedule's requests cannot name one (`create_schedule` takes none, and a scheduled run is
created by Vertex, not by this SDK), so a schedule passes the pipeline parameter
`experiment` instead and each run attaches itself (`associate_with_experiment`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from visrec.core.errors import UserError
from visrec.stages.release.vertex import aiplatform_for

_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?]+$")
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


@dataclass
class VertexPipelineConfig:
    """Where and how a pipeline run is submitted (from `visrec/configs/vertex.yaml` and flags)."""

    project: str
    region: str
    pipeline_root: str
    template_path: str = "pipeline.yaml"
    display_name: str = "visual-recommender"
    service_account: str | None = None
    network: str | None = None
    # None keeps each task's compiled caching option (data tasks cached, decisions never);
    # True/False overrides every task's, decision tasks included.
    enable_caching: bool | None = None
    experiment: str | None = None
    labels: dict[str, str] = field(default_factory=lambda: {"app": "visrec"})
    parameter_values: dict[str, Any] = field(default_factory=dict)
    encryption_spec_key_name: str | None = None

    def __post_init__(self) -> None:
        """Fail with a clear message before any request is sent."""
        if not self.project:
            raise UserError("--project is required")
        if not self.region:
            raise UserError("--region is required")
        if not self.pipeline_root.startswith("gs://"):
            raise UserError(f"--pipeline-root must be a gs:// URI, got {self.pipeline_root!r}")
        for key, value in self.labels.items():
            if not _LABEL.match(key) or not re.match(r"^[a-z0-9_-]{0,63}$", str(value)):
                raise UserError(f"invalid Vertex label {key}={value!r} (lower-case letters, digits, _ and -)")
        if self.experiment is not None and not re.match(r"^[a-z0-9][a-z0-9-]{0,127}$", self.experiment):
            raise UserError(f"invalid experiment name {self.experiment!r}: lower-case letters, digits and '-'")


def validate_cron(cron: str) -> str:
    """A five-field cron expression (optionally prefixed `TZ=Area/City `), as Vertex schedules take."""
    expr = cron.strip()
    body = expr.split(" ", 1)[1] if expr.startswith(("TZ=", "CRON_TZ=")) else expr
    fields = body.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
        raise UserError(f"invalid cron expression {cron!r}: expected 5 fields like '0 3 * * 1'")
    return expr


def pipeline_job_kwargs(config: VertexPipelineConfig) -> dict[str, Any]:
    """Keyword arguments for `aiplatform.PipelineJob(...)`."""
    kwargs: dict[str, Any] = {
        "display_name": config.display_name,
        "template_path": config.template_path,
        "pipeline_root": config.pipeline_root,
        "parameter_values": dict(config.parameter_values),
        "labels": dict(config.labels),
        "project": config.project,
        "location": config.region,
    }
    if config.enable_caching is not None:
        kwargs["enable_caching"] = config.enable_caching
    if config.encryption_spec_key_name:
        kwargs["encryption_spec_key_name"] = config.encryption_spec_key_name
    return kwargs


def _run_as_kwargs(config: VertexPipelineConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if config.service_account:
        out["service_account"] = config.service_account
    if config.network:
        out["network"] = config.network
    return out


def submit_kwargs(config: VertexPipelineConfig) -> dict[str, Any]:
    """Keyword arguments for `PipelineJob.submit(...)`."""
    out = _run_as_kwargs(config)
    if config.experiment:
        out["experiment"] = config.experiment
    return out


def schedule_kwargs(config: VertexPipelineConfig, cron: str, display_name: str | None = None,
                    max_concurrent_run_count: int = 1, max_run_count: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `PipelineJob.create_schedule(...)`.

    One concurrent run by default: two retrainings racing to deploy would make the
    champion comparison meaningless.
    """
    kwargs: dict[str, Any] = {
        "cron": validate_cron(cron),
        "display_name": display_name or f"{config.display_name}-schedule",
        "max_concurrent_run_count": max_concurrent_run_count,
    }
    if max_run_count is not None:
        kwargs["max_run_count"] = max_run_count
    kwargs.update(_run_as_kwargs(config))
    return kwargs


def schedule_job_kwargs(config: VertexPipelineConfig) -> dict[str, Any]:
    """`pipeline_job_kwargs` for the job a schedule repeats: its experiment goes in as the
    pipeline parameter `experiment`, since the schedule request has no field for one."""
    kwargs = pipeline_job_kwargs(config)
    if config.experiment:
        kwargs["parameter_values"]["experiment"] = config.experiment
    return kwargs


def submit_pipeline(config: VertexPipelineConfig) -> str:
    """Submit one run; returns the PipelineJob resource name."""
    aiplatform = aiplatform_for(config.project, config.region)
    job = aiplatform.PipelineJob(**pipeline_job_kwargs(config))
    job.submit(**submit_kwargs(config))
    return job.resource_name


def create_schedule(config: VertexPipelineConfig, cron: str, display_name: str | None = None,
                    max_concurrent_run_count: int = 1, max_run_count: int | None = None) -> str:
    """Create a recurring retraining schedule; returns the schedule resource name."""
    aiplatform = aiplatform_for(config.project, config.region)
    job = aiplatform.PipelineJob(**schedule_job_kwargs(config))
    schedule = job.create_schedule(**schedule_kwargs(config, cron, display_name,
                                                      max_concurrent_run_count, max_run_count))
    return schedule.resource_name


SCHEDULE_ACTIONS = ("list", "pause", "resume", "delete")


def manage_schedules(project: str, region: str, action: str = "list",
                     name: str | None = None) -> list[dict[str, Any]]:
    """List schedules, or pause/resume/delete the one named `name` (display name or resource name)."""
    if action not in SCHEDULE_ACTIONS:
        raise UserError(f"unknown action {action!r}; expected one of {SCHEDULE_ACTIONS}")
    if action != "list" and not name:
        raise UserError(f"'{action}' needs a schedule name")
    aiplatform = aiplatform_for(project, region)
    schedules = aiplatform.PipelineJobSchedule.list()
    rows = []
    for schedule in schedules:
        if action != "list" and name not in (schedule.display_name, schedule.resource_name):
            continue
        # Read before acting: the SDK re-reads a schedule for `state`, and a deleted one is gone.
        row = {"name": schedule.resource_name, "display_name": schedule.display_name, "cron": schedule.cron,
               "state": schedule.state.name, "action": action}
        if action == "pause":
            schedule.pause()
        elif action == "resume":
            schedule.resume()
        elif action == "delete":
            schedule.delete()
        rows.append(row)
    if action != "list" and not rows:
        raise UserError(f"no schedule named {name!r} in {project}/{region}")
    return rows


_PIPELINE_JOB = re.compile(r"^projects/([^/]+)/locations/([^/]+)/pipelineJobs/[^/]+$")


def associate_with_experiment(pipeline_job: str, experiment: str) -> str:
    """Attach a running pipeline job to a Vertex AI Experiment (created if absent), as
    `PipelineJob.submit(experiment=...)` does for a job it creates; returns the experiment's
    context name. Run by the pipeline's own `join-experiment` task for scheduled runs."""
    match = _PIPELINE_JOB.match(pipeline_job)
    if not match:
        raise UserError(f"not a Vertex AI pipeline job: {pipeline_job!r}")
    project, region = match.groups()
    aiplatform = aiplatform_for(project, region)
    job = aiplatform.PipelineJob.get(pipeline_job)
    run_context = job.gca_resource.job_detail.pipeline_run_context.name
    if not run_context:
        raise UserError(f"{pipeline_job} has no pipeline run context yet")
    aiplatform.Experiment.get_or_create(experiment, project=project, location=region)
    name = f"projects/{project}/locations/{region}/metadataStores/default/contexts/{experiment}"
    aiplatform.Context(name).add_context_children([aiplatform.Context(run_context)])
    return name
