"""Stage 6: releases. Assemble, verify, publish, approve and roll back what serving loads.

A release is one versioned directory holding everything the similar-items service
needs (image encoder, PCA, index, item metadata, the evaluation's metrics) plus
`release.json`, a manifest with the sha256 of every immutable file. A registry is

    REGISTRY/releases/<version>/   complete releases only
    REGISTRY/CURRENT               the version in production (the champion)
    REGISTRY/CANARY                a Vertex AI canary serving beside it, until promoted or rolled back
    REGISTRY/history.jsonl         every change of CURRENT (deploy, approve, promote, rollback)

Safety properties, in order of importance:
- A rejected candidate is never deployed: the gate decision is re-checked here from
  `metrics.json`, whoever calls (pipeline branch, CLI, a script).
- A half-built or broken release is never visible: it is assembled in a hidden temp
  directory, verified (checksums, the index loads and answers a smoke query, the
  encoder, PCA and index dimensions agree, item metadata covers the results) and
  only then renamed into `releases/` (on `gs://`: `release.json` is uploaded last and
  marks the release complete). `CURRENT` is switched afterwards with temp + rename,
  so a crash at any point leaves the previous release serving.
- Identical inputs give the identical version (derived from the checksums), so
  pushing the same release twice is a no-op.

`release.json` and `audit.jsonl` change after publication (approval, Vertex
resource names, the audit trail) and `state/` is the service's upsert journal;
these carry no checksum.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrec.core import io
from visrec.core.errors import UserError
from visrec.stages.release.vertex import VertexDeployConfig

log = logging.getLogger(__name__)

RELEASES = "releases"
CURRENT = "CURRENT"
HISTORY = "history.jsonl"
CANARY = "CANARY"
MANIFEST = "release.json"
AUDIT = "audit.jsonl"
STATE = "state"
ITEMS = "items.parquet"
METRICS = "metrics.json"
# Written after publication, so they carry no checksum (`state/` neither).
MUTABLE_FILES = (MANIFEST, AUDIT)
ITEM_COLUMNS = ("item_id", "title", "price", "category", "status")

# deploy_release statuses
DEPLOYED = "deployed"
PENDING = "pending"
CANARY_STATUS = "canary"
UNCHANGED = "unchanged"
REFUSED = "refused"
# approval statuses in release.json
APPROVED = "approved"
TARGETS = ("local", "vertex")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReleaseInvalid(UserError):
    """A release is corrupt, incomplete or does not work; it is never made current."""


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
    encoder_kind: model kind of `model_dir` (`visrec.model.encoders.KINDS`), to load it when verifying.
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
    encoder_kind: str = "siglip"
    smoke_k: int = 5
    catalog_snapshot_at: str | None = None


@dataclass(frozen=True)
class Release:
    """A verified release on local disk (a `gs://` one is downloaded first).

    source: where it was loaded from (the `gs://` URI of a downloaded one, else `path`).
    registry: the registry it belongs to: the one it was resolved from (its CURRENT), or
        for a `gs://` release directory (e.g. Vertex AI's copy) the `gs://` registry its
        manifest names; None for a local release directory.
    """

    version: str
    path: Path
    manifest: dict[str, Any]
    source: str = ""
    registry: str | None = None

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def pca_path(self) -> Path | None:
        path = self.path / "pca" / "pca.npz"
        return path if path.exists() else None

    @property
    def index_dir(self) -> Path:
        return self.path / "index"

    @property
    def embeddings_dir(self) -> Path:
        return self.path / "embeddings"

    @property
    def items_path(self) -> Path:
        return self.path / ITEMS

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def state_dir(self) -> Path:
        return self.path / STATE

    @property
    def state_uri(self) -> str:
        """Where the service keeps this release's write journal and images: in its `gs://`
        registry (every copy of the release, e.g. each Vertex AI deployment's, shares it),
        else next to the release itself, on GCS for a `gs://` release, so writes outlive
        the container that downloaded it."""
        if self.registry is not None and io.is_gcs(self.registry):
            return io.join(release_uri(self.registry, self.version), STATE)
        return io.join(self.source, STATE) if io.is_gcs(self.source) else str(self.state_dir)

    @property
    def status(self) -> str:
        return self.manifest["approval"]["status"]

    @property
    def catalog_snapshot_at(self) -> float | None:
        return catalog_snapshot_time(self.manifest)


# ---- small helpers --------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers often run as a uid without a passwd entry
        return "unknown"


def _checksummed_files(root: Path) -> dict[str, str]:
    """sha256 of every immutable file under `root` (relative POSIX path -> hex digest)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel in MUTABLE_FILES or rel.split("/", 1)[0] == STATE:
            continue
        out[rel] = io.sha256_file(path)
    return out


def content_version(files: dict[str, str]) -> str:
    """A version derived from a release's checksums: identical content, identical version."""
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return f"r-{digest[:12]}"


def _library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("visrec", "numpy", "pyarrow", "scann", "torch", "transformers", "tokenizers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def release_uri(registry: str, version: str) -> str:
    """Where release `version` lives in `registry`."""
    return io.join(registry, RELEASES, version)


# ---- the gate ---------------------------------------------------------------------------------


def gate_refusal(metrics: dict[str, Any]) -> str | None:
    """Why `metrics` (an evaluation's metrics.json) forbids deployment, or None if it allows it.

    Re-derived from the reasons rather than trusting `decision` alone: a deploy needs
    decision `deploy`, at least one checked threshold, and every threshold passed.
    """
    decision = metrics.get("decision")
    reasons = metrics.get("reasons") or []
    failed = [r for r in reasons if not r.get("passed")]
    if decision != "deploy":
        detail = "; ".join(r.get("message", str(r)) for r in failed) or "no reasons given"
        return f"the evaluation gate rejected this candidate (decision={decision!r}): {detail}"
    if not reasons:
        return "metrics.json says deploy but lists no checked thresholds (the gate fails closed)"
    if failed:
        detail = "; ".join(r.get("message", str(r)) for r in failed)
        return f"metrics.json says deploy but {len(failed)} threshold(s) failed: {detail}"
    return None


def gate_decision_of(evaluation_dir: str) -> str:
    """The decision (`deploy` | `reject`) in an evaluation directory's metrics.json.

    `deploy` only when `gate_refusal` agrees, so the pipeline branch and the deploy
    step can never disagree about a candidate.
    """
    metrics = _read_metrics(io.join(evaluation_dir, METRICS))
    return "reject" if gate_refusal(metrics) else "deploy"


REJECTIONS = "rejections.jsonl"


def record_rejection(registry: str, evaluation_dir: str) -> str:
    """Append a rejected candidate's gate result to `REGISTRY/rejections.jsonl`; returns that path.

    Rejections are kept beside the releases so that "why did last Monday's retraining
    not ship?" is answered from the registry alone.
    """
    metrics = _read_metrics(io.join(evaluation_dir, METRICS))
    failed = [r for r in metrics.get("reasons") or [] if not r.get("passed")]
    path = io.join(registry, REJECTIONS)
    io.append_jsonl(path, {"at": _now(), "evaluation": evaluation_dir, "decision": metrics.get("decision"),
                         "reason": gate_refusal(metrics), "failed_thresholds": failed,
                         "candidate": {k: v for k, v in (metrics.get("candidate") or {}).items()
                                       if isinstance(v, (int, float))},
                         "lists_used": metrics.get("lists_used")})
    log.info("recorded rejected candidate in %s", path)
    return path


def _read_metrics(uri: str) -> dict[str, Any]:
    try:
        metrics = io.read_json(uri)
    except (FileNotFoundError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read the evaluation's metrics.json at {uri}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise UserError(f"{uri} is not a metrics.json object")
    return metrics


# ---- assembly ---------------------------------------------------------------------------------


def _read_listings(uri: str) -> Any:
    """Item metadata (`ITEM_COLUMNS`) of every valid listing; as in `prepare`, the first row of an id wins.

    Invalid rows are skipped and counted (their dead letters are `prepare`'s job).
    """
    from collections import Counter

    import pyarrow as pa

    from visrec.data.schema import read_rows

    items: dict[str, dict[str, Any]] = {}
    skipped: Counter[str] = Counter()
    for clean, _, reason in read_rows(uri):
        if clean is None:
            skipped[reason] += 1
        elif clean["item_id"] not in items:
            items[clean["item_id"]] = clean
    if skipped:
        log.warning("item metadata: skipped %d invalid listings (%s)", sum(skipped.values()), dict(skipped))
    if not items:
        raise UserError(f"no valid listings in {uri}")
    rows = list(items.values())
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


def catalog_snapshot_time(manifest: dict[str, Any]) -> float | None:
    """A release's catalog snapshot time as epoch seconds (None for releases made before it was recorded)."""
    stamp = manifest.get("catalog_snapshot_at")
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else None


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
        "library_versions": _library_versions(),
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


# ---- verification -----------------------------------------------------------------------------


def _verify_checksums(root: Path, manifest: dict[str, Any]) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ReleaseInvalid(f"{root / MANIFEST} lists no files")
    for rel, expected in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise ReleaseInvalid(f"release {manifest.get('version')} is incomplete: {rel} is missing")
        if io.sha256_file(path) != expected:
            raise ReleaseInvalid(f"release {manifest.get('version')} is corrupt: {rel} does not match its sha256")


def _open_local(path: Path, source: str | None = None) -> Release:
    """A release directory with its checksums verified (`source`: where it was downloaded from)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ReleaseInvalid(f"{path} is not a release (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseInvalid(f"{manifest_path} is not valid JSON: {exc}") from exc
    _verify_checksums(path, manifest)
    return Release(version=manifest["version"], path=path, manifest=manifest, source=source or str(path))


def verify_release(release: Release, encoder_kind: str = "siglip", smoke_k: int = 5) -> dict[str, Any]:
    """Check that a (checksum-verified) release works; returns what was checked.

    The index loads and a smoke query (an indexed item's own vector) returns
    neighbours that all have item metadata; the encoder loads, and encoder, PCA and
    index dimensions agree, since a mismatch would only show at the first request.
    """
    import pyarrow.parquet as pq

    from visrec.stages.index import SimilarityIndex

    index = SimilarityIndex.load(str(release.index_dir))
    ids = index.ids()
    if not ids:
        raise ReleaseInvalid(f"release {release.version}: the index is empty")
    found, scores = index.search(index.vector(ids[0])[None, :], min(smoke_k, len(ids)))
    if not found or not found[0]:
        raise ReleaseInvalid(f"release {release.version}: the smoke query for {ids[0]} returned no results")
    known = set(pq.read_table(release.items_path, columns=["item_id"]).column("item_id").to_pylist())
    missing = [i for i in found[0] if i not in known]
    if missing:
        raise ReleaseInvalid(f"release {release.version}: indexed items without metadata in {ITEMS}: {missing}")
    checked: dict[str, Any] = {"index_items": len(ids), "index_dims": index.dims,
                               "smoke_query": {"item_id": ids[0], "results": found[0],
                                               "scores": [round(float(s), 6) for s in scores[0]]}}
    embedding_dims = index.dims
    if release.pca_path is not None:
        from visrec.model.pca import PcaProjection

        pca = PcaProjection.load(str(release.pca_path))
        if pca.dims != index.dims:
            raise ReleaseInvalid(f"release {release.version}: PCA outputs {pca.dims} dims, index holds {index.dims}")
        embedding_dims = pca.input_dims
        checked["pca"] = f"{pca.input_dims}->{pca.dims}"
    if release.model_dir.is_dir():
        from visrec.model.encoders import load_image_encoder

        encoder = load_image_encoder(str(release.model_dir), kind=encoder_kind)
        if encoder.dims != embedding_dims:
            raise ReleaseInvalid(f"release {release.version}: the encoder outputs {encoder.dims} dims, "
                                 f"expected {embedding_dims}")
        checked["encoder"] = f"{encoder_kind} {encoder.dims} dims"
    return checked


# ---- loading ----------------------------------------------------------------------------------


def current_version(registry: str) -> str | None:
    """The version in production (`REGISTRY/CURRENT`), None before the first deployment."""
    uri = io.join(registry, CURRENT)
    if not io.exists(uri):
        return None
    return io.read_text(uri).strip() or None


def champion_embeddings_uri(registry: str) -> str | None:
    """The production release's item embeddings, for the next evaluation's champion comparison."""
    version = current_version(registry)
    return io.join(release_uri(registry, version), "embeddings") if version else None


def load_release(dir_or_registry: str, cache_dir: str | None = None, version: str | None = None) -> Release:
    """A verified release: a release directory, or a registry's CURRENT one (`version`: that
    release of the registry instead).

    `gs://` releases are downloaded (into `cache_dir`, default a new temp directory)
    first, then every checksum listed in `release.json` is verified. A copy already in
    `cache_dir` that verifies is used as it is (worker processes, restarts, reloads).
    """
    uri = registry = str(dir_or_registry)
    if version is not None:
        uri = release_uri(uri, version)
    elif io.exists(io.join(uri, CURRENT)):
        uri = release_uri(uri, current_version(uri))
    elif io.exists(io.join(uri, RELEASES)) and not io.exists(io.join(uri, MANIFEST)):
        raise UserError(f"registry {uri} has no release in production yet ({CURRENT} is missing)")
    if io.is_gcs(uri):
        release = _download_release(uri, Path(cache_dir or tempfile.mkdtemp(prefix="visrec-release-")))
    elif not Path(uri).is_dir():
        raise UserError(f"release not found: {uri}")
    else:
        release = _open_local(Path(uri))
    if uri != registry:
        return dataclasses.replace(release, registry=registry)
    home = release.manifest.get("registry")
    return dataclasses.replace(release, registry=home) if io.is_gcs(uri) and home and io.is_gcs(home) else release


@dataclass(frozen=True)
class ReleaseRef:
    """A published release known by its manifest only (nothing downloaded or verified)."""

    version: str
    uri: str
    manifest: dict[str, Any]

    @property
    def state_uri(self) -> str:
        return io.join(self.uri, STATE)


def _became_current_after(registry: str, version: str) -> str | None:
    """The release that was current when `version` last became current (history.jsonl)."""
    became_current = [e for e in io.read_jsonl(io.join(registry, HISTORY)) if e["version"] == version]
    previous = became_current[-1].get("previous") if became_current else None
    return previous if previous != version else None


def _ref(registry: str, version: str) -> ReleaseRef | None:
    try:
        return ReleaseRef(version, release_uri(registry, version), _read_manifest(registry, version))
    except UserError:
        log.warning("release %s is named in %s's history but is gone", version, registry)
        return None


def predecessor(release: Release) -> ReleaseRef | None:
    """The release that was current before `release` became current (by deploy, approval,
    promotion or rollback, per history.jsonl), or for the active canary the champion it
    serves beside; None if there is none or `release` is not a registry's."""
    if release.registry is None:
        return None
    canary = active_canary(release.registry)
    if canary is not None and canary["version"] == release.version:
        previous = canary["base"]
    else:
        previous = _became_current_after(release.registry, release.version)
    return _ref(release.registry, previous) if previous else None


def successor(release: Release) -> ReleaseRef | None:
    """The release taking over from `release`: the active canary beside it, or the current
    release if it replaced `release` (which still serves during a rollout, or kept at 0% for
    a traffic-shift rollback); else None."""
    if release.registry is None:
        return None
    canary = active_canary(release.registry)
    if canary is not None and canary["base"] == release.version:
        return _ref(release.registry, canary["version"])
    current = current_version(release.registry)
    if not current or current == release.version:
        return None
    if _became_current_after(release.registry, current) != release.version:
        return None
    return _ref(release.registry, current)


def _download_release(uri: str, cache: Path) -> Release:
    """A `gs://` release as a verified local copy `cache/<version>` (its `state/` stays on GCS)."""
    version = uri.rstrip("/").rsplit("/", 1)[-1]
    local = cache / version
    if not io.exists(io.join(uri, MANIFEST)):
        raise ReleaseInvalid(f"{uri} is not a release (no {MANIFEST})")
    if local.is_dir():
        try:
            return _open_local(local, source=uri)
        except ReleaseInvalid as exc:
            log.warning("cached copy of %s is unusable (%s); downloading it again", uri, exc)
            shutil.rmtree(local, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    # Download beside the final name, then rename: a reader never sees half a copy, and of
    # several processes downloading the same release the first rename wins.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache))
    io.download_dir(uri, staging, exclude=(f"{STATE}/",))
    (staging / STATE).mkdir(exist_ok=True)
    try:
        staging.rename(local)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return _open_local(local, source=uri)


# ---- registry state -----------------------------------------------------------------------------


def _read_manifest(registry: str, version: str) -> dict[str, Any]:
    uri = io.join(release_uri(registry, version), MANIFEST)
    if not io.exists(uri):
        raise UserError(f"no release {version!r} in {registry}")
    return io.read_json(uri)


def _write_manifest(registry: str, manifest: dict[str, Any]) -> None:
    io.write_json(io.join(release_uri(registry, manifest["version"]), MANIFEST), manifest)


def _audit(registry: str, version: str, action: str, who: str, why: str, **extra: Any) -> None:
    io.append_jsonl(io.join(release_uri(registry, version), AUDIT),
                  {"at": _now(), "action": action, "who": who, "why": why, **extra})


def _release_versions(registry: str) -> list[str]:
    """Versions of the complete releases in `registry` (those with a `release.json`)."""
    base = io.join(registry, RELEASES)
    if io.is_gcs(base):
        prefix = base.rstrip("/") + "/"
        return sorted({f[len(prefix):].split("/", 1)[0] for f in io.list_files(prefix, MANIFEST)
                       if f[len(prefix):].count("/") == 1})
    root = Path(base)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


def fallback_versions(registry: str) -> list[str]:
    """The releases that were in production before CURRENT, newest first (the rolled-back ones
    left out): what to serve, in order, when CURRENT does not verify."""
    stack = _deployed_stack(registry)
    return list(reversed(stack[:-1])) if stack else []


def _deployed_stack(registry: str) -> list[str]:
    """The versions that were current, oldest first, with rolled-back ones popped.

    Replayed from history.jsonl; CURRENT is the truth if a crash lost the last entry.
    """
    stack: list[str] = []
    for entry in io.read_jsonl(io.join(registry, HISTORY)):
        if entry["action"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(entry["version"])
    current = current_version(registry)
    if current and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def _deployed_versions(registry: str) -> set[str]:
    """Every version that has ever been current (rolled back ones included)."""
    current = current_version(registry)
    return {e["version"] for e in io.read_jsonl(io.join(registry, HISTORY))} | ({current} if current else set())


def _switch_current(registry: str, version: str, action: str, who: str, why: str) -> None:
    """Point CURRENT at `version` (atomically: temp + rename), then record it in history.jsonl."""
    previous = current_version(registry)
    io.write_text(io.join(registry, CURRENT), version + "\n")
    io.append_jsonl(io.join(registry, HISTORY), {"at": _now(), "action": action, "version": version,
                                               "previous": previous, "who": who, "why": why})
    log.info("CURRENT: %s -> %s (%s)", previous, version, action)


def active_canary(registry: str) -> dict[str, Any] | None:
    """The canary in progress (`REGISTRY/CANARY`: version, base, percent, since, by, why), or None.

    A canary serves its share of traffic beside `base`, the champion (`CURRENT`), until
    `promote_release` makes it current or `rollback` aborts it.
    """
    uri = io.join(registry, CANARY)
    return io.read_json(uri) if io.exists(uri) else None


def _vertex_config(manifest: dict[str, Any]) -> VertexDeployConfig:
    settings = dict(manifest["vertex_config"])
    settings["version_aliases"] = tuple(settings.get("version_aliases") or ())
    return VertexDeployConfig(**settings)


def _kept_deployments(registry: str, champion: str, count: int) -> list[str]:
    """Deployed model ids of the `count` releases most recently current before `champion`, so a
    rollback (or a roll-forward after one) stays a traffic shift; every other one is undeployed."""
    kept: list[str] = []
    seen = {champion}
    for entry in reversed(io.read_jsonl(io.join(registry, HISTORY))):
        if len(kept) >= count:
            break
        version = entry["version"]
        if version in seen:
            continue
        seen.add(version)
        ref = _ref(registry, version)
        deployed = ((ref.manifest.get("vertex") or {}).get("deployed_model_id")) if ref else None
        if deployed:
            kept.append(deployed)
    return kept


def _promote(registry: str, version: str, who: str, why: str, action: str) -> str:
    """Put a published release into production: re-verify, re-check the gate, then Vertex and CURRENT.

    Returns DEPLOYED, or CANARY_STATUS when Vertex serves it as a canary: then CURRENT stays
    on the champion until `promote_release`.
    """
    canary = active_canary(registry)
    if canary is not None:
        raise UserError(f"release {canary['version']} is a canary on Vertex AI: `visrec promote` it or "
                        f"`visrec rollback` it before putting {version} into production")
    with tempfile.TemporaryDirectory(prefix="visrec-promote-") as cache:
        release = load_release(release_uri(registry, version), cache_dir=cache)
        refusal = gate_refusal(json.loads(release.metrics_path.read_text()))
    if refusal:
        raise ReleaseInvalid(f"release {version} cannot go to production: {refusal}")
    manifest = dict(release.manifest)
    status = DEPLOYED
    if manifest.get("vertex_config"):
        from visrec.stages.release import vertex

        config = _vertex_config(manifest)
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
    manifest["approval"] = {"status": APPROVED, "by": who, "at": _now(), "why": why}
    _write_manifest(registry, manifest)
    if status == CANARY_STATUS:
        percent = manifest["vertex"]["steps"][-1]["percent"]
        io.write_json(io.join(registry, CANARY), {"version": version, "base": current_version(registry),
                                                  "percent": percent, "since": _now(), "by": who, "why": why})
        _audit(registry, version, "canary", who, why, percent=percent)
        log.info("release %s is a %d%% canary beside %s", version, percent, current_version(registry))
        return status
    _audit(registry, version, action, who, why)
    _switch_current(registry, version, action, who, why)
    return status


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


def deploy_release(config: DeployConfig) -> dict[str, Any]:
    """Assemble, verify and publish a release; make it current unless approval is required.

    Returns `{"status": deployed | canary | pending | unchanged | refused, "version", "path", "message"}`.
    A candidate the gate rejected is refused before anything is written.
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
    catalog_snapshot_at = _catalog_snapshot_at(config)
    metrics = _read_metrics(config.metrics_uri)
    refusal = gate_refusal(metrics)
    if refusal:
        log.error("refusing to deploy: %s", refusal)
        return {"status": REFUSED, "version": config.version, "path": None, "message": refusal}

    local_root = None if io.is_gcs(config.registry) else Path(config.registry, RELEASES)
    if local_root is not None:
        local_root.mkdir(parents=True, exist_ok=True)
    # Locally the staging directory sits beside its destination, so the final rename is atomic;
    # its leading dot keeps it out of listings if the process dies before the rename.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=local_root))
    try:
        started = _now()
        _assemble(config, metrics, staging)
        files = _checksummed_files(staging)
        version = config.version or content_version(files)
        existing = _existing_outcome(config, version)
        if existing is not None:
            return existing
        manifest = _manifest(config, version, files, metrics, started, catalog_snapshot_at)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        (staging / AUDIT).write_text(json.dumps({"at": started, "action": "created", "who": _user(),
                                                 "why": f"gate decision {metrics['decision']}"}) + "\n")
        checked = verify_release(_open_local(staging), config.encoder_kind, config.smoke_k)
        log.info("release %s verified: %s", version, checked)
        # What was checked stays with the release: `promote_release` repeats its smoke query.
        manifest["verification"] = checked
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        _publish(staging, config.registry, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _finish(config, version, f"verified: {checked['index_items']} indexed items, smoke query ok")


def _existing_outcome(config: DeployConfig, version: str) -> dict[str, Any] | None:
    """What re-pushing an already published version does: nothing, or finish an interrupted deploy."""
    if not io.exists(io.join(release_uri(config.registry, version), MANIFEST)):
        return None
    manifest = _read_manifest(config.registry, version)
    status = manifest["approval"]["status"]
    was_current = version in _deployed_versions(config.registry)
    is_canary = (active_canary(config.registry) or {}).get("version") == version
    if not was_current and not is_canary and not (status == PENDING and config.require_approval):
        # Published but never made current: approval was required then, or the deploy died midway.
        return _finish(config, version, "already published; promoting it")
    _register_on_vertex(config, version)
    where = ("current" if current_version(config.registry) == version else
             CANARY_STATUS if is_canary else status)
    return {"status": UNCHANGED, "version": version, "path": release_uri(config.registry, version),
            "message": f"release {version} already exists ({where}); nothing to do"}


def _register_on_vertex(config: DeployConfig, version: str) -> None:
    """Upload a published release as a Model Registry version (once), so a release waiting for
    approval is already there, linked to the run that made it."""
    manifest = _read_manifest(config.registry, version)
    if config.target != "vertex" or manifest.get("vertex"):
        return
    from visrec.stages.release import vertex

    manifest["vertex"] = vertex.register_version(_vertex_config(manifest), release_uri(config.registry, version),
                                                 version)
    _write_manifest(config.registry, manifest)


def _finish(config: DeployConfig, version: str, message: str) -> dict[str, Any]:
    path = release_uri(config.registry, version)
    _register_on_vertex(config, version)
    canary = active_canary(config.registry)
    if config.require_approval or canary is not None:
        waiting = (f"waiting for `visrec approve {version}`" if canary is None else
                   f"release {canary['version']} is still a canary: promote or roll it back, then "
                   f"`visrec approve {version}`")
        return {"status": PENDING, "version": version, "path": path, "message": f"{message}; {waiting}"}
    status = _promote(config.registry, version, who=f"{_user()} (visrec deploy)",
                      why="passed the evaluation gate", action="deploy")
    where = "now current" if status == DEPLOYED else "serving as a canary until `visrec promote`"
    return {"status": status, "version": version, "path": path, "message": f"{message}; {where}"}


# ---- human actions ----------------------------------------------------------------------------


def approve_release(registry: str, version: str, who: str, why: str) -> dict[str, Any]:
    """Put a published release into production (on Vertex AI: as a canary, unless it takes all
    traffic at once), recording who approved it, when and why."""
    _require_who_why(who, why, "an approval")
    manifest = _read_manifest(registry, version)
    if current_version(registry) == version:
        raise UserError(f"release {version} is already in production")
    status = _promote(registry, version, who=who, why=why, action="approve")
    return {"status": status, "version": version, "path": release_uri(registry, version),
            "previous_status": manifest["approval"]["status"]}


def _require_who_why(who: str, why: str, what: str) -> None:
    if not who.strip() or not why.strip():
        raise UserError(f"{what} needs both who (--who) and why (--why)")


@dataclass
class BakePolicy:
    """When a canary may be promoted without a person (`visrec promote --auto`).

    min_minutes: how long it must have served its share of traffic.
    smoke_query: the canary's own deployed model must answer a similar-items query through
        the endpoint (the item the release's verification queried).
    """

    min_minutes: float = 60.0
    smoke_query: bool = True


def _minutes_since(stamp: str) -> float:
    return (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(stamp)).total_seconds() / 60


def promote_release(registry: str, version: str, who: str, why: str, smoke_query: bool = True,
                    min_minutes: float = 0.0) -> dict[str, Any]:
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
    from visrec.stages.release import vertex

    manifest = _read_manifest(registry, version)
    config = _vertex_config(manifest)
    record = manifest["vertex"]
    checked: dict[str, Any] = {}
    if smoke_query:
        item = (manifest.get("verification") or {}).get("smoke_query", {}).get("item_id")
        if not item:
            raise UserError(f"release {version} records no smoke-query item; promote with --skip-smoke-query")
        prediction = vertex.smoke_query(record, item, invoke_routes=config.invoke_routes)
        checked = {"smoke_query": {"item_id": item, "results": [i["item_id"] for i in prediction["items"]]}}
    manifest["vertex"] = vertex.promote(record, _kept_deployments(registry, version, config.keep_previous))
    _write_manifest(registry, manifest)
    _audit(registry, version, "promote", who, why, baked_minutes=round(baked, 1), **checked)
    _switch_current(registry, version, "promote", who, why)
    io.remove(io.join(registry, CANARY))
    return {"status": DEPLOYED, "version": version, "previous": canary["base"], "baked_minutes": baked, **checked}


def auto_promote(registry: str, policy: BakePolicy | None = None) -> dict[str, Any] | None:
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
    from visrec.stages.release import vertex

    manifest = _read_manifest(registry, canary["version"])
    champion = _read_manifest(registry, canary["base"]).get("vertex") if canary["base"] else None
    if not champion or not champion.get("deployed_model_id"):
        raise UserError(f"the champion {canary['base']} has no deployed model on Vertex AI to shift traffic back to")
    manifest["vertex"] = vertex.abort_canary(manifest["vertex"], champion)
    _write_manifest(registry, manifest)
    _audit(registry, canary["version"], "canary_aborted", who, why, to=canary["base"])
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
    who = who or _user()
    canary = active_canary(registry)
    if canary is not None:
        return _abort_canary(registry, canary, who, why)
    stack = _deployed_stack(registry)
    if len(stack) < 2:
        raise UserError(f"nothing to roll back to in {registry}: no earlier release was in production")
    current, previous = stack[-1], stack[-2]
    with tempfile.TemporaryDirectory(prefix="visrec-rollback-") as cache:
        load_release(release_uri(registry, previous), cache_dir=cache)
    manifest = _read_manifest(registry, previous)
    if manifest.get("vertex") and manifest["vertex"].get("phase") == "champion":
        from visrec.stages.release import vertex

        config = _vertex_config(manifest)
        manifest["vertex"] = vertex.restore(manifest["vertex"], config,
                                            _kept_deployments(registry, previous, config.keep_previous))
        _write_manifest(registry, manifest)
    _audit(registry, current, "rolled_back", who, why, to=previous)
    _audit(registry, previous, "restored", who, why, replacing=current)
    _switch_current(registry, previous, "rollback", who, why)
    return previous


def list_releases(registry: str) -> list[dict[str, Any]]:
    """Every published release, oldest first: version, created_at, catalog_snapshot_at, status
    (`pending`, `approved`, or `canary N%`), current, ndcg@5, approved_by, vertex_model, path."""
    current = current_version(registry)
    canary = active_canary(registry) or {}
    rows = []
    for version in _release_versions(registry):
        manifest = _read_manifest(registry, version)
        candidate = (manifest.get("gate") or {}).get("candidate") or {}
        status = (f"{CANARY_STATUS} {canary['percent']}%" if canary.get("version") == version
                  else manifest["approval"]["status"])
        rows.append({"version": version, "created_at": manifest.get("created_at"),
                     "catalog_snapshot_at": manifest.get("catalog_snapshot_at"),
                     "status": status, "current": version == current,
                     "ndcg@5": candidate.get("ndcg@5"), "approved_by": manifest["approval"]["by"],
                     "vertex_model": (manifest.get("vertex") or {}).get("model"),
                     "path": release_uri(registry, version)})
    return sorted(rows, key=lambda r: (r["created_at"] or "", r["version"]))
