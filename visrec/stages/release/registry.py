"""A registry of releases: which one is in production, and how it got there.

    REGISTRY/releases/<version>/   complete releases only (`visrec.stages.release.release`)
    REGISTRY/CURRENT               the version in production (the champion)
    REGISTRY/CANARY                a Vertex AI canary serving beside it, until promoted or rolled back
    REGISTRY/history.jsonl         every change of CURRENT (deploy, approve, promote, rollback)
    REGISTRY/rejections.jsonl      every candidate the gate rejected (`visrec.stages.evaluate.gate`)

`CURRENT` is switched with temp + rename and only then recorded in the history, so a
crash at any point leaves the previous release serving; the history is replayed with
`CURRENT` as the truth if a crash lost its last entry. Here: reading and switching
`CURRENT`, loading the release it names, the history and what follows from it (what to
fall back to, which release a release took over from), the canary marker, each
release's manifest and audit trail, and the listing `visrec releases` prints.
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from visrec.core import io
from visrec.core.clock import utc_now
from visrec.core.errors import UserError
from visrec.stages.release.release import (AUDIT, CANARY_STATUS, MANIFEST, RELEASES, STATE, Release, open_release,
                                           release_uri)

log = logging.getLogger(__name__)

CURRENT = "CURRENT"
HISTORY = "history.jsonl"
CANARY = "CANARY"


def current_user() -> str:
    """Who is running this, for the audit trail."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # containers often run as a uid without a passwd entry
        return "unknown"


# ---- CURRENT ----------------------------------------------------------------------------------


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


def load_release(dir_or_registry: str, cache_dir: str | None = None, version: str | None = None,
                 defer: Callable[[str], bool] | None = None) -> Release:
    """A verified release: a release directory, or a registry's CURRENT one (`version`: that
    release of the registry instead).

    `gs://` releases are downloaded (into `cache_dir`, default a new temp directory)
    first, then every checksum listed in `release.json` is verified (`open_release`; `defer`:
    the files whose check waits for `Release.verify_deferred`).
    """
    uri = registry = str(dir_or_registry)
    if version is not None:
        uri = release_uri(uri, version)
    elif io.exists(io.join(uri, CURRENT)):
        uri = release_uri(uri, current_version(uri))
    elif io.exists(io.join(uri, RELEASES)) and not io.exists(io.join(uri, MANIFEST)):
        raise UserError(f"registry {uri} has no release in production yet ({CURRENT} is missing)")
    release = open_release(uri, cache_dir, defer)
    return dataclasses.replace(release, registry=registry) if uri != registry else release


def switch_current(registry: str, version: str, action: str, who: str, why: str) -> None:
    """Point CURRENT at `version` (atomically: temp + rename), then record it in history.jsonl."""
    previous = current_version(registry)
    io.write_text(io.join(registry, CURRENT), version + "\n")
    io.append_jsonl(io.join(registry, HISTORY), {"at": utc_now(), "action": action, "version": version,
                                               "previous": previous, "who": who, "why": why})
    log.info("CURRENT: %s -> %s (%s)", previous, version, action)


def active_canary(registry: str) -> dict[str, Any] | None:
    """The canary in progress (`REGISTRY/CANARY`: version, base, percent, since, by, why), or None.

    A canary serves its share of traffic beside `base`, the champion (`CURRENT`), until
    `promote_release` makes it current or `rollback` aborts it.
    """
    uri = io.join(registry, CANARY)
    return io.read_json(uri) if io.exists(uri) else None


# ---- history ----------------------------------------------------------------------------------


def read_history(registry: str) -> list[dict[str, Any]]:
    """Every change of CURRENT, oldest first (`history.jsonl`)."""
    return io.read_jsonl(io.join(registry, HISTORY))


def deployed_stack(registry: str) -> list[str]:
    """The versions that were current, oldest first, with rolled-back ones popped.

    Replayed from history.jsonl; CURRENT is the truth if a crash lost the last entry.
    """
    stack: list[str] = []
    for entry in read_history(registry):
        if entry["action"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(entry["version"])
    current = current_version(registry)
    if current and (not stack or stack[-1] != current):
        stack.append(current)
    return stack


def deployed_versions(registry: str) -> set[str]:
    """Every version that has ever been current (rolled back ones included)."""
    current = current_version(registry)
    return {e["version"] for e in read_history(registry)} | ({current} if current else set())


def fallback_versions(registry: str) -> list[str]:
    """The releases that were in production before CURRENT, newest first (the rolled-back ones
    left out): what to serve, in order, when CURRENT does not verify."""
    stack = deployed_stack(registry)
    return list(reversed(stack[:-1])) if stack else []


@dataclass(frozen=True)
class ReleaseRef:
    """A published release known by its manifest only (nothing downloaded or verified)."""

    version: str
    uri: str
    manifest: dict[str, Any]

    @property
    def state_uri(self) -> str:
        return io.join(self.uri, STATE)


def release_ref(registry: str, version: str) -> ReleaseRef | None:
    """Release `version` of `registry` by its manifest; None (and a warning) if it is gone."""
    try:
        return ReleaseRef(version, release_uri(registry, version), read_manifest(registry, version))
    except UserError:
        log.warning("release %s is named in %s's history but is gone", version, registry)
        return None


def _became_current_after(registry: str, version: str) -> str | None:
    """The release that was current when `version` last became current (history.jsonl)."""
    became_current = [e for e in read_history(registry) if e["version"] == version]
    previous = became_current[-1].get("previous") if became_current else None
    return previous if previous != version else None


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
    return release_ref(release.registry, previous) if previous else None


def successor(release: Release) -> ReleaseRef | None:
    """The release taking over from `release`: the active canary beside it, or the current
    release if it replaced `release` (which still serves during a rollout, or kept at 0% for
    a traffic-shift rollback); else None."""
    if release.registry is None:
        return None
    canary = active_canary(release.registry)
    if canary is not None and canary["base"] == release.version:
        return release_ref(release.registry, canary["version"])
    current = current_version(release.registry)
    if not current or current == release.version:
        return None
    if _became_current_after(release.registry, current) != release.version:
        return None
    return release_ref(release.registry, current)


# ---- each release's manifest and audit trail --------------------------------------------------


def read_manifest(registry: str, version: str) -> dict[str, Any]:
    """`release.json` of release `version`; `UserError` if there is no such release."""
    uri = io.join(release_uri(registry, version), MANIFEST)
    if not io.exists(uri):
        raise UserError(f"no release {version!r} in {registry}")
    return io.read_json(uri)


def write_manifest(registry: str, manifest: dict[str, Any]) -> None:
    """Replace the `release.json` of the release `manifest` describes."""
    io.write_json(io.join(release_uri(registry, manifest["version"]), MANIFEST), manifest)


def append_audit(registry: str, version: str, action: str, who: str, why: str, **extra: Any) -> None:
    """Record in release `version`'s audit trail who did `action`, when and why."""
    io.append_jsonl(io.join(release_uri(registry, version), AUDIT),
                  {"at": utc_now(), "action": action, "who": who, "why": why, **extra})


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


def list_releases(registry: str) -> list[dict[str, Any]]:
    """Every published release, oldest first: version, created_at, catalog_snapshot_at, status
    (`pending`, `approved`, or `canary N%`), current, ndcg@5, approved_by, vertex_model, path."""
    current = current_version(registry)
    canary = active_canary(registry) or {}
    rows = []
    for version in _release_versions(registry):
        manifest = read_manifest(registry, version)
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
