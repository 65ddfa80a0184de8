"""Putting a published release into production and taking it out again: approve, promote a
canary (by a person, or by the bake policy on a timer), roll back.

Every change re-verifies the release it puts into production (checksums, and the gate
decision in its own `metrics.json`), records who did it and why in the release's audit
trail, and moves `CURRENT` last. On Vertex AI (`visrec.stages.release.vertex`) a release
starts as a canary beside the champion; `CURRENT` stays on the champion until the canary is
promoted, and a rollback during a canary aborts it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from dataclasses import dataclass
from typing import Any

from visrec.core import io
from visrec.core.clock import utc_now
from visrec.core.errors import UserError
from visrec.stages.evaluate.gate import gate_refusal
from visrec.stages.release import vertex
from visrec.stages.release.registry import (CANARY, active_canary, append_audit, current_user, current_version,
                                            deployed_stack, read_history, read_manifest, release_ref, switch_current,
                                            write_manifest)
from visrec.stages.release.release import (APPROVED, CANARY_STATUS, DEPLOYED, ReleaseInvalid, open_release,
                                           release_uri)
from visrec.stages.release.vertex import VertexDeployConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Approval:
    """What `approve_release` did: status `deployed`, or `canary` when Vertex AI serves it as one;
    `previous_status` is the approval status it had (`pending`)."""

    status: str
    version: str
    path: str
    previous_status: str


@dataclass(frozen=True)
class Promotion:
    """A canary made champion: its version, the champion it replaced, how long it baked, and
    the smoke query it answered through the endpoint (None when skipped)."""

    status: str
    version: str
    previous: str | None
    baked_minutes: float
    smoke_query: dict[str, Any] | None = None


@dataclass
class BakePolicy:
    """When a canary may be promoted without a person (`visrec promote --auto`).

    min_minutes: how long it must have served its share of traffic.
    smoke_query: the canary's own deployed model must answer a similar-items query through
        the endpoint (the item the release's verification queried).
    """

    min_minutes: float = 60.0
    smoke_query: bool = True


def _require_who_why(who: str, why: str, what: str) -> None:
    if not who.strip() or not why.strip():
        raise UserError(f"{what} needs both who (--who) and why (--why)")


def _minutes_since(stamp: str) -> float:
    return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp)).total_seconds() / 60


def _kept_deployments(registry: str, champion: str, count: int) -> list[str]:
    """Deployed model ids of the `count` releases most recently current before `champion`, so a
    rollback (or a roll-forward after one) stays a traffic shift; every other one is undeployed."""
    kept: list[str] = []
    seen = {champion}
    for entry in reversed(read_history(registry)):
        if len(kept) >= count:
            break
        version = entry["version"]
        if version in seen:
            continue
        seen.add(version)
        ref = release_ref(registry, version)
        deployed = ((ref.manifest.get("vertex") or {}).get("deployed_model_id")) if ref else None
        if deployed:
            kept.append(deployed)
    return kept


def put_into_production(registry: str, version: str, who: str, why: str, action: str) -> str:
    """Put a published release into production: re-verify, re-check the gate, then Vertex and CURRENT.

    Returns DEPLOYED, or CANARY_STATUS when Vertex serves it as a canary: then CURRENT stays
    on the champion until `promote_release`.
    """
    canary = active_canary(registry)
    if canary is not None:
        raise UserError(f"release {canary['version']} is a canary on Vertex AI: `visrec promote` it or "
                        f"`visrec rollback` it before putting {version} into production")
    with tempfile.TemporaryDirectory(prefix="visrec-promote-") as cache:
        release = open_release(release_uri(registry, version), cache_dir=cache)
        refusal = gate_refusal(json.loads(release.metrics_path.read_text()))
    if refusal:
        raise ReleaseInvalid(f"release {version} cannot go to production: {refusal}")
    manifest = dict(release.manifest)
    status = DEPLOYED
    if manifest.get("vertex_config"):
        config = VertexDeployConfig.from_dict(manifest["vertex_config"])
        record = manifest.get("vertex") or vertex.register_version(config, release_uri(registry, version), version)
        keep = _kept_deployments(registry, version, config.keep_previous)
        if record.get("phase") == "champion":
            # It was the champion before (then rolled back): a traffic shift, or a redeploy.
            record = vertex.restore(record, config, keep)
        else:
            record = vertex.roll_out(config, record, keep)
        manifest["vertex"] = record
        if record["phase"] == "canary":
            status = CANARY_STATUS
    manifest["approval"] = {"status": APPROVED, "by": who, "at": utc_now(), "why": why}
    write_manifest(registry, manifest)
    if status == CANARY_STATUS:
        percent = manifest["vertex"]["steps"][-1]["percent"]
        io.write_json(io.join(registry, CANARY), {"version": version, "base": current_version(registry),
                                                  "percent": percent, "since": utc_now(), "by": who, "why": why})
        append_audit(registry, version, "canary", who, why, percent=percent)
        log.info("release %s is a %d%% canary beside %s", version, percent, current_version(registry))
        return status
    append_audit(registry, version, action, who, why)
    switch_current(registry, version, action, who, why)
    return status


def approve_release(registry: str, version: str, who: str, why: str) -> Approval:
    """Put a published release into production (on Vertex AI: as a canary, unless it takes all
    traffic at once), recording who approved it, when and why."""
    _require_who_why(who, why, "an approval")
    manifest = read_manifest(registry, version)
    if current_version(registry) == version:
        raise UserError(f"release {version} is already in production")
    status = put_into_production(registry, version, who=who, why=why, action="approve")
    return Approval(status=status, version=version, path=release_uri(registry, version),
                    previous_status=manifest["approval"]["status"])


def promote_release(registry: str, version: str, who: str, why: str, smoke_query: bool = True,
                    min_minutes: float = 0.0) -> Promotion:
    """Move all traffic to the canary `version` and make it current (aliases `champion` and
    `default` follow; deployed models beyond the kept ones are undeployed).

    Refused unless `version` is the active canary, it has baked `min_minutes`, and (with
    `smoke_query`) its deployed model answers a query through the endpoint.
    """
    _require_who_why(who, why, "a promotion")
    canary = active_canary(registry)
    if canary is None or canary["version"] != version:
        raise UserError(f"release {version} is not the canary in {registry} "
                        f"(canary: {canary['version'] if canary else 'none'})")
    baked = _minutes_since(canary["since"])
    if baked < min_minutes:
        raise UserError(f"canary {version} has baked {baked:.0f} of {min_minutes:.0f} minutes")
    manifest = read_manifest(registry, version)
    config = VertexDeployConfig.from_dict(manifest["vertex_config"])
    record = manifest["vertex"]
    checked: dict[str, Any] = {}
    if smoke_query:
        item = (manifest.get("verification") or {}).get("smoke_query", {}).get("item_id")
        if not item:
            raise UserError(f"release {version} records no smoke-query item; promote with --skip-smoke-query")
        prediction = vertex.smoke_query(record, item, invoke_routes=config.invoke_routes)
        checked = {"smoke_query": {"item_id": item, "results": [i["item_id"] for i in prediction["items"]]}}
    manifest["vertex"] = vertex.promote(record, _kept_deployments(registry, version, config.keep_previous))
    write_manifest(registry, manifest)
    append_audit(registry, version, "promote", who, why, baked_minutes=round(baked, 1), **checked)
    switch_current(registry, version, "promote", who, why)
    io.remove(io.join(registry, CANARY))
    return Promotion(status=DEPLOYED, version=version, previous=canary["base"], baked_minutes=baked,
                     smoke_query=checked.get("smoke_query"))


def auto_promote(registry: str, policy: BakePolicy | None = None) -> Promotion | None:
    """Promote the active canary if `policy` allows it now; None when there is none or it is not due.

    Meant to run on a timer (Cloud Scheduler, cron) beside the retraining schedule.
    """
    policy = policy or BakePolicy()
    canary = active_canary(registry)
    if canary is None:
        return None
    baked = _minutes_since(canary["since"])
    if baked < policy.min_minutes:
        log.info("canary %s has baked %.0f of %.0f minutes; not yet", canary["version"], baked, policy.min_minutes)
        return None
    return promote_release(registry, canary["version"], who="visrec bake policy",
                           why=f"baked {baked:.0f} min (policy: {policy.min_minutes:.0f} min"
                               f"{', smoke query' if policy.smoke_query else ''})",
                           smoke_query=policy.smoke_query, min_minutes=policy.min_minutes)


def _abort_canary(registry: str, canary: dict[str, Any], who: str, why: str) -> str:
    """A rollback during a canary: all traffic back to the champion; CURRENT never moved."""
    manifest = read_manifest(registry, canary["version"])
    champion = read_manifest(registry, canary["base"]).get("vertex") if canary["base"] else None
    if not champion or not champion.get("deployed_model_id"):
        raise UserError(f"the champion {canary['base']} has no deployed model on Vertex AI to shift traffic back to")
    manifest["vertex"] = vertex.abort_canary(manifest["vertex"], champion)
    write_manifest(registry, manifest)
    append_audit(registry, canary["version"], "canary_aborted", who, why, to=canary["base"])
    io.remove(io.join(registry, CANARY))
    log.info("canary %s aborted; %s serves all traffic", canary["version"], canary["base"])
    return canary["base"]


def rollback(registry: str, who: str | None = None, why: str = "rollback") -> str:
    """Undo the last production change; returns the version that now serves all traffic.

    During a canary: the canary is aborted and the champion gets all traffic back. Otherwise
    CURRENT goes back to the release that was current before this one (re-verified first),
    and on Vertex AI all traffic moves to that release's deployed model (redeployed if it was
    undeployed meanwhile), with the champion aliases.
    """
    who = who or current_user()
    canary = active_canary(registry)
    if canary is not None:
        return _abort_canary(registry, canary, who, why)
    stack = deployed_stack(registry)
    if len(stack) < 2:
        raise UserError(f"nothing to roll back to in {registry}: no earlier release was in production")
    current, previous = stack[-1], stack[-2]
    with tempfile.TemporaryDirectory(prefix="visrec-rollback-") as cache:
        open_release(release_uri(registry, previous), cache_dir=cache)
    manifest = read_manifest(registry, previous)
    if manifest.get("vertex") and manifest["vertex"].get("phase") == "champion":
        config = VertexDeployConfig.from_dict(manifest["vertex_config"])
        manifest["vertex"] = vertex.restore(manifest["vertex"], config,
                                            _kept_deployments(registry, previous, config.keep_previous))
        write_manifest(registry, manifest)
    append_audit(registry, current, "rolled_back", who, why, to=previous)
    append_audit(registry, previous, "restored", who, why, replacing=current)
    switch_current(registry, previous, "rollback", who, why)
    return previous
