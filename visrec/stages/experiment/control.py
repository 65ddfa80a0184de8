"""Starting, stopping and reading the registry's A/B experiment.

    REGISTRY/EXPERIMENT          the running experiment (JSON), read by every serving replica
    REGISTRY/experiments.jsonl   every start and stop: who, when, why (the audit trail)

Control is the release in production (`CURRENT`); the treatment a release of the same
registry. The start and the stop are also recorded in the treatment release's own audit trail,
as approvals are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from typing import Any

from visrec.core import io
from visrec.core.clock import utc_now
from visrec.core.errors import UserError
from visrec.stages.experiment.config import ExperimentConfig
from visrec.stages.release.registry import append_audit, current_version, release_ref

log = logging.getLogger(__name__)

EXPERIMENT = "EXPERIMENT"
EXPERIMENTS_LOG = "experiments.jsonl"


def read_experiment(registry: str) -> dict[str, Any] | None:
    """The running experiment of `registry`, or None."""
    uri = io.join(registry, EXPERIMENT)
    if not io.exists(uri):
        return None
    try:
        return json.loads(io.read_text(uri))
    except ValueError as exc:
        raise UserError(f"{uri} is not valid JSON: {exc}") from None


def start_experiment(registry: str, config: ExperimentConfig, who: str, why: str) -> dict[str, Any]:
    """Start an experiment of `config.treatment` against CURRENT; returns its record.

    `UserError` if one is running, there is no release in production, or the treatment is not a
    complete release of the registry other than the control."""
    if read_experiment(registry) is not None:
        raise UserError(f"an experiment is already running in {registry}: stop it first (visrec experiment stop)")
    control = current_version(registry)
    if control is None:
        raise UserError(f"registry {registry} has no release in production to be the control")
    if config.treatment == control:
        raise UserError(f"the treatment {config.treatment} is the release in production; an experiment needs two")
    if release_ref(registry, config.treatment) is None:
        raise UserError(f"release {config.treatment} is not a complete release of {registry}")
    experiment_id = f"exp-{utc_now().replace(':', '').replace('-', '')[:15]}-{uuid.uuid4().hex[:6]}"
    record = {"id": experiment_id, "control": control, **dataclasses.asdict(config),
              "salt": config.salt or experiment_id, "started_at": utc_now(), "started_by": who, "why": why}
    io.write_json(io.join(registry, EXPERIMENT), record)
    io.append_jsonl(io.join(registry, EXPERIMENTS_LOG), {"action": "start", **record})
    append_audit(registry, config.treatment, "experiment_start", who, why, experiment=experiment_id,
                 control=control, share=config.share)
    log.info("experiment %s: %s (control) vs %s (treatment, %.0f%% of users)", experiment_id, control,
             config.treatment, 100 * config.share)
    return record


def stop_experiment(registry: str, who: str, why: str) -> dict[str, Any]:
    """Stop the running experiment (every user back on CURRENT); returns its record with the stop."""
    record = read_experiment(registry)
    if record is None:
        raise UserError(f"no experiment is running in {registry}")
    stopped = {**record, "stopped_at": utc_now(), "stopped_by": who, "stop_why": why}
    io.append_jsonl(io.join(registry, EXPERIMENTS_LOG), {"action": "stop", **stopped})
    io.remove(io.join(registry, EXPERIMENT))
    append_audit(registry, record["treatment"], "experiment_stop", who, why, experiment=record["id"])
    log.info("experiment %s stopped", record["id"])
    return stopped


def experiment_status(registry: str) -> dict[str, Any]:
    """The running experiment (or None) and, when CURRENT moved since it started, a warning."""
    record = read_experiment(registry)
    status: dict[str, Any] = {"running": record}
    if record is not None and current_version(registry) != record["control"]:
        status["warning"] = (f"CURRENT is {current_version(registry)}, not the control {record['control']} the "
                             "experiment started with: control users now see the new CURRENT")
    return status
