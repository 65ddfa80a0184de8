"""Submitting the compiled pipeline to Vertex AI Pipelines, and recurring retraining schedules.

The requests are built by pure functions (`pipeline_job_kwargs`, `schedule_kwargs`),
tested field by field; the thin `submit_pipeline` / `create_schedule` / `manage_schedule`
wrappers hand them to `google-cloud-aiplatform`, which is what a user runs with
credentials.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from visrec.errors import UserError

_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?]+$")
_LABEL = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


@dataclass
class VertexPipelineConfig:
    """Where and how a pipeline run is submitted (from `configs/vertex.yaml` and flags)."""

    project: str
    region: str
    pipeline_root: str
    template_path: str = "pipeline.yaml"
    display_name: str = "visual-recommender"
    service_account: str | None = None
    network: str | None = None
    enable_caching: bool = True
    labels: dict[str, str] = field(default_factory=lambda: {"app": "visrec"})
    parameter_values: dict[str, Any] = field(default_factory=dict)
    encryption_spec_key_name: str | None = None


def validate_config(config: VertexPipelineConfig) -> None:
    """Fail with a clear message before any request is sent."""
    if not config.project:
        raise UserError("--project is required")
    if not config.region:
        raise UserError("--region is required")
    if not config.pipeline_root.startswith("gs://"):
        raise UserError(f"--pipeline-root must be a gs:// URI, got {config.pipeline_root!r}")
    for key, value in config.labels.items():
        if not _LABEL.match(key) or not re.match(r"^[a-z0-9_-]{0,63}$", str(value)):
            raise UserError(f"invalid Vertex label {key}={value!r} (lower-case letters, digits, _ and -)")
    if "data_snapshot" in config.parameter_values and not str(config.parameter_values["data_snapshot"]):
        raise UserError("data_snapshot must be a non-empty version string")


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
    validate_config(config)
    kwargs: dict[str, Any] = {
        "display_name": config.display_name,
        "template_path": config.template_path,
        "pipeline_root": config.pipeline_root,
        "parameter_values": dict(config.parameter_values),
        "enable_caching": config.enable_caching,
        "labels": dict(config.labels),
        "project": config.project,
        "location": config.region,
    }
    if config.encryption_spec_key_name:
        kwargs["encryption_spec_key_name"] = config.encryption_spec_key_name
    return kwargs


def submit_kwargs(config: VertexPipelineConfig) -> dict[str, Any]:
    """Keyword arguments for `PipelineJob.submit(...)`."""
    out: dict[str, Any] = {}
    if config.service_account:
        out["service_account"] = config.service_account
    if config.network:
        out["network"] = config.network
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
    kwargs.update(submit_kwargs(config))
    return kwargs


def _aiplatform(project: str, region: str) -> Any:
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region)
    return aiplatform


def submit_pipeline(config: VertexPipelineConfig) -> str:
    """Submit one run; returns the PipelineJob resource name."""
    aiplatform = _aiplatform(config.project, config.region)
    job = aiplatform.PipelineJob(**pipeline_job_kwargs(config))
    job.submit(**submit_kwargs(config))
    return job.resource_name


def create_schedule(config: VertexPipelineConfig, cron: str, display_name: str | None = None,
                    max_concurrent_run_count: int = 1, max_run_count: int | None = None) -> str:
    """Create a recurring retraining schedule; returns the schedule resource name."""
    aiplatform = _aiplatform(config.project, config.region)
    job = aiplatform.PipelineJob(**pipeline_job_kwargs(config))
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
    aiplatform = _aiplatform(project, region)
    schedules = aiplatform.PipelineJobSchedule.list()
    rows = []
    for schedule in schedules:
        if action != "list" and name not in (schedule.display_name, schedule.resource_name):
            continue
        if action == "pause":
            schedule.pause()
        elif action == "resume":
            schedule.resume()
        elif action == "delete":
            schedule.delete()
        rows.append({"name": schedule.resource_name, "display_name": schedule.display_name,
                     "cron": getattr(schedule, "cron", None), "state": str(getattr(schedule, "state", "")),
                     "action": action})
    if action != "list" and not rows:
        raise UserError(f"no schedule named {name!r} in {project}/{region}")
    return rows
