"""Stage 6: deploy. Assemble a release from the stage outputs, verify it, publish it into the
registry and make it current (or leave it waiting for approval).

Safety properties, in order of importance:
- A rejected candidate is never deployed: the gate decision is re-checked here from
  `metrics.json` (`visrec.stages.evaluate.gate.gate_refusal`), whoever calls (pipeline
  branch, CLI, a script).
- A half-built or broken release is never visible: it is assembled in a hidden temp
  directory, verified (checksums, the index loads and answers a smoke query, the
  encoder, PCA and index dimensions agree, item metadata covers the results) and
  only then renamed into `releases/` (on `gs://`: `release.json` is uploaded last and
  marks the release complete). `CURRENT` is switched afterwards, so a crash at any
  point leaves the previous release serving.
- Identical inputs give the identical version (derived from the checksums), so
  pushing the same release twice is a no-op.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrec.core import io
from visrec.core.checksums import checksum_files
from visrec.core.clock import utc_now
from visrec.core.errors import UserError
from visrec.core.versions import library_versions
from visrec.model.encoders import encoder_kind
from visrec.stages.evaluate.gate import gate_refusal, read_metrics
from visrec.stages.release.promote import put_into_production
from visrec.stages.release.registry import (active_canary, current_user, current_version, deployed_versions,
                                            read_manifest, write_manifest)
from visrec.stages.release.release import (AUDIT, CANARY_STATUS, DEPLOYED, ITEMS, MANIFEST, METRICS, PENDING,
                                           RELEASES, REFUSED, STATE, UNCHANGED, is_mutable, open_release,
                                           release_uri, verify_release)
from visrec.stages.release.vertex import VertexDeployConfig, register_version

log = logging.getLogger(__name__)

ITEM_COLUMNS = ("item_id", "title", "price", "category", "status")
TARGETS = ("local", "vertex")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What a release records of the software that built it.
_LIBRARIES = ("visrec", "numpy", "pyarrow", "scann", "torch", "transformers", "tokenizers")


@dataclass
class DeployConfig:
    """Inputs of one deployment (shared by the CLI, the KFP component and tests).

    registry: registry root, local directory or `gs://` (Vertex needs `gs://`).
    model_dir: the trained image encoder + processor (stage 2 `model/`).
    embeddings_dir: stage 3 output: `embeddings-*.parquet` (kept as `embeddings/`, so the
        next evaluation compares against the champion's own embeddings) and `pca/pca.npz`.
    index_dir: stage 4 output. listings_uri: the listings (JSONL or Parquet) for item metadata.
    metrics_uri: the evaluation's `metrics.json`; its gate decision is re-checked here.
    version: None = derived from the content's checksums (same inputs, same version).
    require_approval: store a passing release as `pending` until `approve_release`.
    target: `local` (registry pointer only) or `vertex` (also upload and deploy on Vertex AI).
    encoder_kind: model kind of `model_dir` (`visrec.model.encoders.KINDS`); "" = the checkpoint's own
        (its `config.json`); a kind the checkpoint contradicts is an error.
    smoke_k: neighbours asked for by the verification query.
    catalog_snapshot_at: when the listings were exported (ISO 8601); None = the listings
        file's modification time. Serving carries writes made after it, against the
        release this one replaces, into this release (`visrec.online.handover`).
    """

    registry: str
    model_dir: str
    embeddings_dir: str
    index_dir: str
    listings_uri: str
    metrics_uri: str
    version: str | None = None
    require_approval: bool = False
    target: str = "local"
    vertex: VertexDeployConfig | None = None
    encoder_kind: str = ""
    smoke_k: int = 5
    catalog_snapshot_at: str | None = None


@dataclass(frozen=True)
class DeployResult:
    """What `deploy_release` did; `as_dict()` is what the KFP component writes as JSON.

    status: deployed | canary | pending | unchanged | refused. version / path: the release and
    where it is published (None when refused before anything was written). message: for people.
    """

    status: str
    version: str | None
    path: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- assembly ---------------------------------------------------------------------------------


def _read_listings(uri: str) -> Any:
    """Item metadata (`ITEM_COLUMNS`) of every valid listing; as in `prepare`, the first row of an id wins.

    Invalid rows are skipped and counted (their dead letters are `prepare`'s job).
    """
    import pyarrow as pa

    from visrec.data.schema import read_listings

    listings = read_listings(uri)
    if listings.rejected:
        log.warning("item metadata: skipped %d invalid listings (%s)", sum(listings.rejected.values()),
                    listings.rejected)
    if not listings.rows:
        raise UserError(f"no valid listings in {uri}")
    rows = listings.rows
    return pa.table({name: pa.array([row[name] for row in rows], pa.int64() if name == "price" else pa.string())
                     for name in ITEM_COLUMNS})


def _copy_dir(uri: str, dest: Path) -> None:
    with io.local_dir(uri) as src:
        shutil.copytree(src, dest)


def _assemble(config: DeployConfig, metrics: dict[str, Any], dest: Path) -> None:
    """Write every immutable file of the release into `dest` (an empty directory)."""
    import pyarrow.parquet as pq

    _copy_dir(config.model_dir, dest / "model")
    _copy_dir(config.index_dir, dest / "index")
    with io.local_dir(config.embeddings_dir) as emb:
        parts = sorted(emb.glob("embeddings-*.parquet"))
        if not parts:
            raise UserError(f"no embeddings-*.parquet in {config.embeddings_dir}")
        (dest / "embeddings").mkdir()
        for part in parts:
            shutil.copy2(part, dest / "embeddings" / part.name)
        if (emb / "pca" / "pca.npz").exists():
            (dest / "pca").mkdir()
            shutil.copy2(emb / "pca" / "pca.npz", dest / "pca" / "pca.npz")
    pq.write_table(_read_listings(config.listings_uri), dest / ITEMS)
    (dest / METRICS).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    (dest / STATE).mkdir()


def content_version(files: dict[str, str]) -> str:
    """A version derived from a release's checksums: identical content, identical version."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return f"r-{digest[:12]}"


def _catalog_snapshot_at(config: DeployConfig) -> str:
    if config.catalog_snapshot_at is None:
        return dt.datetime.fromtimestamp(io.modified_at(config.listings_uri), dt.timezone.utc).isoformat()
    try:
        stamp = dt.datetime.fromisoformat(config.catalog_snapshot_at)
    except ValueError:
        raise UserError(f"catalog snapshot time {config.catalog_snapshot_at!r} is not ISO 8601") from None
    if stamp.tzinfo is None:
        raise UserError(f"catalog snapshot time {config.catalog_snapshot_at!r} needs a time zone (e.g. +00:00)")
    return stamp.isoformat()


def _manifest(config: DeployConfig, version: str, files: dict[str, str], metrics: dict[str, Any],
              created_at: str, catalog_snapshot_at: str) -> dict[str, Any]:
    vertex = dataclasses.asdict(config.vertex) if config.target == "vertex" and config.vertex else None
    return {
        "version": version,
        "created_at": created_at,
        "catalog_snapshot_at": catalog_snapshot_at,
        # Where the release is published: a copy (Vertex AI copies a model's artifacts) finds its
        # registry's history, and keeps its serving state in the registry, through this.
        "registry": config.registry,
        "sources": {"model": config.model_dir, "embeddings": config.embeddings_dir, "index": config.index_dir,
                    "listings": config.listings_uri, "metrics": config.metrics_uri},
        "library_versions": library_versions(_LIBRARIES),
        "encoder_kind": config.encoder_kind,
        "gate": {"decision": metrics.get("decision"), "thresholds_checked": len(metrics.get("reasons") or []),
                 "candidate": metrics.get("candidate"), "lists_used": metrics.get("lists_used")},
        "approval": {"status": PENDING, "by": None, "at": None, "why": None},
        "target": config.target,
        # Kept so that `approve_release` can run the Vertex deployment a pending release waits for.
        "vertex_config": vertex,
        "vertex": None,
        "files": files,
    }


# ---- publishing -------------------------------------------------------------------------------


def _publish(staging: Path, registry: str, version: str) -> None:
    """Move a verified staging directory to `releases/<version>`; it appears complete or not at all."""
    target = release_uri(registry, version)
    if io.is_gcs(registry):
        # GCS has no directory rename: every other file first, release.json (the marker) last.
        manifest = (staging / MANIFEST).read_bytes()
        (staging / MANIFEST).unlink()
        io.upload_dir(staging, target)
        io.write_bytes(io.join(target, MANIFEST), manifest)
        return
    os.rename(staging, target)


def deploy_release(config: DeployConfig) -> DeployResult:
    """Assemble, verify and publish a release; make it current unless approval is required.

    A candidate the gate rejected is refused (status `refused`) before anything is written.
    """
    if config.target not in TARGETS:
        raise UserError(f"unknown target {config.target!r}; expected one of {TARGETS}")
    if config.target == "vertex":
        if config.vertex is None:
            raise UserError("target vertex needs the Vertex settings (project, region, serving image)")
        if not io.is_gcs(config.registry):
            raise UserError(f"target vertex needs a gs:// registry (Vertex reads the release from it), "
                            f"got {config.registry}")
    if config.version is not None and not _VERSION.match(config.version):
        raise UserError(f"invalid version {config.version!r}: letters, digits, '.', '_' and '-' only")
    config = dataclasses.replace(config, encoder_kind=encoder_kind(config.model_dir, config.encoder_kind))
    catalog_snapshot_at = _catalog_snapshot_at(config)
    metrics = read_metrics(config.metrics_uri)
    refusal = gate_refusal(metrics)
    if refusal:
        log.error("refusing to deploy: %s", refusal)
        return DeployResult(status=REFUSED, version=config.version, path=None, message=refusal)

    local_root = None if io.is_gcs(config.registry) else Path(config.registry, RELEASES)
    if local_root is not None:
        local_root.mkdir(parents=True, exist_ok=True)
    # Locally the staging directory sits beside its destination, so the final rename is atomic;
    # its leading dot keeps it out of listings if the process dies before the rename.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=local_root))
    try:
        started = utc_now()
        _assemble(config, metrics, staging)
        files = checksum_files(staging, skip=is_mutable)
        version = config.version or content_version(files)
        existing = _existing_outcome(config, version)
        if existing is not None:
            return existing
        manifest = _manifest(config, version, files, metrics, started, catalog_snapshot_at)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (staging / AUDIT).write_text(json.dumps({"at": started, "action": "created", "who": current_user(),
                                                 "why": f"gate decision {metrics['decision']}"}) + "\n")
        checked = verify_release(open_release(str(staging)), config.encoder_kind, config.smoke_k)
        log.info("release %s verified: %s", version, checked)
        # What was checked stays with the release: `promote_release` repeats its smoke query.
        manifest["verification"] = checked
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _publish(staging, config.registry, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _finish(config, version, f"verified: {checked['index_items']} indexed items, smoke query ok")


def _existing_outcome(config: DeployConfig, version: str) -> DeployResult | None:
    """What re-pushing an already published version does: nothing, or finish an interrupted deploy."""
    if not io.exists(io.join(release_uri(config.registry, version), MANIFEST)):
        return None
    manifest = read_manifest(config.registry, version)
    status = manifest["approval"]["status"]
    was_current = version in deployed_versions(config.registry)
    is_canary = (active_canary(config.registry) or {}).get("version") == version
    if not was_current and not is_canary and not (status == PENDING and config.require_approval):
        # Published but never made current: approval was required then, or the deploy died midway.
        return _finish(config, version, "already published; promoting it")
    _register_on_vertex(config, version)
    where = ("current" if current_version(config.registry) == version else
             CANARY_STATUS if is_canary else status)
    return DeployResult(status=UNCHANGED, version=version, path=release_uri(config.registry, version),
                        message=f"release {version} already exists ({where}); nothing to do")


def _register_on_vertex(config: DeployConfig, version: str) -> None:
    """Upload a published release as a Model Registry version (once), so a release waiting for
    approval is already there, linked to the run that made it."""
    manifest = read_manifest(config.registry, version)
    if config.target != "vertex" or manifest.get("vertex"):
        return
    manifest["vertex"] = register_version(VertexDeployConfig.from_dict(manifest["vertex_config"]),
                                          release_uri(config.registry, version), version)
    write_manifest(config.registry, manifest)


def _finish(config: DeployConfig, version: str, message: str) -> DeployResult:
    path = release_uri(config.registry, version)
    _register_on_vertex(config, version)
    canary = active_canary(config.registry)
    if config.require_approval or canary is not None:
        waiting = (f"waiting for `visrec approve {version}`" if canary is None else
                   f"release {canary['version']} is still a canary: promote or roll it back, then "
                   f"`visrec approve {version}`")
        return DeployResult(status=PENDING, version=version, path=path, message=f"{message}; {waiting}")
    status = put_into_production(config.registry, version, who=f"{current_user()} (visrec deploy)",
                                 why="passed the evaluation gate", action="deploy")
    where = "now current" if status == DEPLOYED else "serving as a canary until `visrec promote`"
    return DeployResult(status=status, version=version, path=path, message=f"{message}; {where}")
