"""A release: one versioned directory holding everything the similar-items service needs.

    model/            the image encoder + processor
    pca/pca.npz       the PCA (absent for a release without one)
    index/            the ScaNN index (with its own checksummed manifest)
    embeddings/       the item embeddings, so the next evaluation compares against the champion's own
    items.parquet     item metadata (`ITEM_COLUMNS` of `visrec.stages.release.deploy`)
    metrics.json      the evaluation that let it ship
    release.json      the manifest: the sha256 of every immutable file (`files`), sources, gate,
                      approval, Vertex AI resource names
    audit.jsonl       who did what to it, when and why
    state/            the service's write journal

`release.json` and `audit.jsonl` change after publication and `state/` is the service's
upsert journal; these carry no checksum. Here: the `Release` value, opening a release
directory (local, or downloaded from `gs://`) with every checksum verified, and checking
that a verified release actually works.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from visrec.core import io
from visrec.core.checksums import ChecksumMismatch, verify_checksums
from visrec.core.errors import UserError

log = logging.getLogger(__name__)

RELEASES = "releases"
MANIFEST = "release.json"
AUDIT = "audit.jsonl"
STATE = "state"
ITEMS = "items.parquet"
METRICS = "metrics.json"
# Written after publication, so they carry no checksum (`state/` neither).
MUTABLE_FILES = (MANIFEST, AUDIT)

# A release's approval (`release.json`), and what deploy / approve / promote did with it.
PENDING = "pending"
APPROVED = "approved"
DEPLOYED = "deployed"
CANARY_STATUS = "canary"
UNCHANGED = "unchanged"
REFUSED = "refused"


class ReleaseInvalid(UserError):
    """A release is corrupt, incomplete or does not work; it is never made current."""


def release_uri(registry: str, version: str) -> str:
    """Where release `version` lives in `registry`."""
    return io.join(registry, RELEASES, version)


def is_mutable(name: str) -> bool:
    """Whether a release file (relative path) may change after publication, so carries no checksum."""
    return name in MUTABLE_FILES or name.split("/", 1)[0] == STATE


def catalog_snapshot_time(manifest: dict[str, Any]) -> float | None:
    """A release's catalog snapshot time as epoch seconds (None for releases made before it was recorded)."""
    stamp = manifest.get("catalog_snapshot_at")
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else None


@dataclass(frozen=True)
class Release:
    """A verified release on local disk (a `gs://` one is downloaded first).

    source: where it was loaded from (the `gs://` URI of a downloaded one, else `path`).
    registry: the registry it belongs to: the one it was resolved from (its CURRENT), or
        for a `gs://` release directory (e.g. Vertex AI's copy) the `gs://` registry its
        manifest names; None for a local release directory.
    unverified: the files (relative path -> sha256) `open_release` was told to leave unchecked
        (`defer`) until `verify_deferred` checks them, before they are first read.
    """

    version: str
    path: Path
    manifest: dict[str, Any]
    source: str = ""
    registry: str | None = None
    unverified: dict[str, str] = field(default_factory=dict)

    def verify_deferred(self, which: Callable[[str], bool]) -> None:
        """Check the `unverified` files `which` selects; `ReleaseInvalid` as `open_release`."""
        _verify(self.path, {name: sha for name, sha in self.unverified.items() if which(name)},
                self.manifest.get("version"))

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def encoder_kind(self) -> str:
        """The model kind of `model_dir` the release recorded (releases from before it was recorded: siglip)."""
        return self.manifest.get("encoder_kind", "siglip")

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


# ---- opening ----------------------------------------------------------------------------------


def open_release(uri: str, cache_dir: str | None = None, defer: Callable[[str], bool] | None = None) -> Release:
    """The release directory `uri` with every checksum in its `release.json` verified, but those of
    the files `defer` selects in a local release (relative paths; `Release.unverified`, for
    `Release.verify_deferred`): the service checks what a snapshot of its state replaces only if it
    reads them.

    A `gs://` release is downloaded into `cache_dir` (default a new temp directory) first;
    a copy already there that verifies is used as it is (worker processes, restarts,
    reloads). A downloaded copy is always checked whole, `defer` or not: one that does not verify
    is downloaded again, which a check deferred past this call could no longer do. A `gs://`
    release knows its `gs://` registry from its manifest.
    """
    if io.is_gcs(uri):
        release = _download_release(uri, Path(cache_dir or tempfile.mkdtemp(prefix="visrec-release-")))
    elif not Path(uri).is_dir():
        raise UserError(f"release not found: {uri}")
    else:
        release = _open_local(Path(uri), defer=defer)
    home = release.manifest.get("registry")
    return dataclasses.replace(release, registry=home) if io.is_gcs(uri) and home and io.is_gcs(home) else release


def _verify(path: Path, files: dict[str, str], version: str | None) -> None:
    """`verify_checksums`, a failure as `ReleaseInvalid` naming the file."""
    try:
        verify_checksums(path, files)
    except ChecksumMismatch as exc:
        problem = (f"incomplete: {exc.name} is missing" if exc.missing
                   else f"corrupt: {exc.name} does not match its sha256")
        raise ReleaseInvalid(f"release {version} is {problem}") from None


def _open_local(path: Path, source: str | None = None, defer: Callable[[str], bool] | None = None) -> Release:
    """A local release directory with its checksums verified but `defer`'s (`source`: where it was
    downloaded from)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ReleaseInvalid(f"{path} is not a release (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseInvalid(f"{manifest_path} is not valid JSON: {exc}") from exc
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ReleaseInvalid(f"{manifest_path} lists no files")
    unverified = {name: sha for name, sha in files.items() if defer is not None and defer(name)}
    _verify(path, {name: sha for name, sha in files.items() if name not in unverified}, manifest.get("version"))
    return Release(version=manifest["version"], path=path, manifest=manifest, source=source or str(path),
                   unverified=unverified)


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


# ---- verification -----------------------------------------------------------------------------


def verify_release(release: Release, encoder_kind: str = "siglip", smoke_k: int = 5) -> dict[str, Any]:
    """Check that a (checksum-verified) release works; returns what was checked.

    The index loads and a smoke query (an indexed item's own vector) returns
    neighbours that all have item metadata; the encoder loads, and encoder, PCA and
    index dimensions agree, since a mismatch would only show at the first request.
    """
    import pyarrow.parquet as pq

    from visrec.stages.index.searcher import SimilarityIndex

    index = SimilarityIndex.load(str(release.index_dir), verified=True)  # the release's manifest covers it
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
