"""Vertex AI Pipelines submit/schedule: the exact requests handed to google-cloud-aiplatform.

No credentials exist here, so `aiplatform.PipelineJob` / `PipelineJobSchedule` / `init`
are replaced by recorders; everything up to that call is the real code.
"""

from __future__ import annotations

import pytest
from google.cloud import aiplatform

from visrec.cli import main
from visrec.errors import UserError
from visrec.vertex_pipelines import (VertexPipelineConfig, pipeline_job_kwargs, schedule_kwargs,
                                     validate_cron)


class Recorder:
    def __init__(self):
        self.calls = []


@pytest.fixture
def fake_aiplatform(monkeypatch):
    rec = Recorder()

    class FakeSchedule:
        def __init__(self, display_name, resource_name):
            self.display_name, self.resource_name = display_name, resource_name
            self.cron, self.state = "0 3 * * 1", "ACTIVE"

        def pause(self):
            rec.calls.append(("pause", self.display_name))

        def resume(self):
            rec.calls.append(("resume", self.display_name))

        def delete(self):
            rec.calls.append(("delete", self.display_name))

        @classmethod
        def list(cls):
            return [cls("weekly", "projects/p/locations/r/schedules/1"),
                    cls("daily", "projects/p/locations/r/schedules/2")]

    class FakeJob:
        resource_name = "projects/p/locations/us-central1/pipelineJobs/run-1"

        def __init__(self, **kwargs):
            rec.calls.append(("PipelineJob", kwargs))

        def submit(self, **kwargs):
            rec.calls.append(("submit", kwargs))

        def create_schedule(self, **kwargs):
            rec.calls.append(("create_schedule", kwargs))
            return FakeSchedule(kwargs["display_name"], "projects/p/locations/r/schedules/9")

    monkeypatch.setattr(aiplatform, "init", lambda **kw: rec.calls.append(("init", kw)))
    monkeypatch.setattr(aiplatform, "PipelineJob", FakeJob)
    monkeypatch.setattr(aiplatform, "PipelineJobSchedule", FakeSchedule)
    return rec


def _config(**kw):
    base = dict(project="my-proj", region="us-central1", pipeline_root="gs://bucket/root",
                template_path="gs://bucket/templates/abc123/pipeline.yaml",
                parameter_values={"listings_uri": "gs://b/listings.jsonl", "data_snapshot": "2026-11-23"},
                service_account="runner@my-proj.iam.gserviceaccount.com")
    base.update(kw)
    return VertexPipelineConfig(**base)


def test_pipeline_job_kwargs_field_by_field():
    kw = pipeline_job_kwargs(_config())
    assert kw == {
        "display_name": "visual-recommender",
        "template_path": "gs://bucket/templates/abc123/pipeline.yaml",
        "pipeline_root": "gs://bucket/root",
        "parameter_values": {"listings_uri": "gs://b/listings.jsonl", "data_snapshot": "2026-11-23"},
        "enable_caching": True,
        "labels": {"app": "visrec"},
        "project": "my-proj",
        "location": "us-central1",
    }


@pytest.mark.parametrize("bad", [dict(pipeline_root="/local/root"), dict(project=""),
                                 dict(labels={"App": "x"}),
                                 dict(parameter_values={"data_snapshot": ""})])
def test_invalid_configs_fail_before_any_request(bad):
    with pytest.raises(UserError):
        pipeline_job_kwargs(_config(**bad))


def test_cron_validation():
    assert validate_cron("0 3 * * 1") == "0 3 * * 1"
    assert validate_cron("TZ=Asia/Tokyo 0 3 * * MON") == "TZ=Asia/Tokyo 0 3 * * MON"
    for bad in ("every monday", "0 3 * *", "0 3 * * 1 2"):
        with pytest.raises(UserError):
            validate_cron(bad)


def test_schedule_kwargs_default_to_one_concurrent_run():
    kw = schedule_kwargs(_config(), "0 3 * * 1")
    assert kw == {"cron": "0 3 * * 1", "display_name": "visual-recommender-schedule",
                  "max_concurrent_run_count": 1,
                  "service_account": "runner@my-proj.iam.gserviceaccount.com"}


def test_default_config_names_the_paper_defaults(fake_aiplatform):
    """Without --config, configs/vertex.yaml supplies the run: paper hyper-parameters, real checkpoints."""
    assert main(["submit", "--data-snapshot", "2026-11-23"]) == 0
    kwargs = fake_aiplatform.calls[1][1]
    params = kwargs["parameter_values"]
    assert params["siglip_model"] == "google/siglip-base-patch16-256-multilingual"
    assert params["baseline_model"] == "google/mobilenet_v2_1.4_224"
    assert (params["epochs"], params["batch_size"], params["lr"], params["pca_dims"]) == (5, 256, 5e-5, 128)
    assert params["data_snapshot"] == "2026-11-23"
    assert kwargs["pipeline_root"].startswith("gs://")


def test_submit_cli_sends_exact_requests(fake_aiplatform, tmp_path, capsys):
    cfg = tmp_path / "vertex.yaml"
    cfg.write_text("vertex:\n  project: my-proj\n  region: us-central1\n  pipeline_root: gs://bucket/root\n"
                   "  template_path: gs://bucket/t/pipeline.yaml\n"
                   "parameters:\n  epochs: 5\n  batch_size: 256\n")
    rc = main(["submit", "--config", str(cfg), "--data-snapshot", "snap-7", "--param", "lr=1e-5",
               "--service-account", "sa@p.iam.gserviceaccount.com"])
    assert rc == 0
    assert fake_aiplatform.calls[0] == ("init", {"project": "my-proj", "location": "us-central1"})
    name, kwargs = fake_aiplatform.calls[1]
    assert name == "PipelineJob"
    assert kwargs["parameter_values"] == {"epochs": 5, "batch_size": 256, "lr": 1e-5, "data_snapshot": "snap-7"}
    assert kwargs["template_path"] == "gs://bucket/t/pipeline.yaml"
    assert fake_aiplatform.calls[2] == ("submit", {"service_account": "sa@p.iam.gserviceaccount.com"})
    assert "pipelineJobs/run-1" in capsys.readouterr().out


def test_schedule_cli_creates_weekly_schedule(fake_aiplatform, tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("parameters: {}\n")
    rc = main(["schedule", "--config", str(empty), "--project", "p", "--region", "us-central1", "--pipeline-root", "gs://b/r",
               "--template", "gs://b/t.yaml", "--cron", "0 3 * * 1", "--name", "weekly-retrain",
               "--data-snapshot", "latest"])
    assert rc == 0
    kinds = [c[0] for c in fake_aiplatform.calls]
    assert kinds == ["init", "PipelineJob", "create_schedule"]
    assert fake_aiplatform.calls[2][1] == {"cron": "0 3 * * 1", "display_name": "weekly-retrain",
                                           "max_concurrent_run_count": 1}


def test_schedules_pause_only_the_named_one(fake_aiplatform, capsys):
    assert main(["schedules", "pause", "weekly", "--project", "p", "--region", "r"]) == 0
    assert ("pause", "weekly") in fake_aiplatform.calls
    assert ("pause", "daily") not in fake_aiplatform.calls
    assert main(["schedules", "delete", "nope", "--project", "p", "--region", "r"]) == 2
    assert main(["schedules", "--project", "p", "--region", "r"]) == 0
    assert "daily" in capsys.readouterr().out
