"""Resolve a data input to what a run reads and a fingerprint of exactly those files.

A scheduled pipeline is given the same input URIs every week (a listings prefix, an
impression-log prefix). If the data tasks were keyed by those strings, every run after
the first would be a step-cache hit and nothing would retrain. So the first task of a
run resolves each input (like TFX ExampleGen's spans and fingerprints):

- **what to read**: a file is itself; a directory/prefix is itself, unless it holds
  Hive-style `<partition_key>=<value>/` children, in which case it is the newest
  *complete* partition (one holding the done marker; a partition still being written
  must not be trained on);
- **a fingerprint** of the data files the stages will read (the files
  `schema.input_files` returns for that URI), from the listing only (path, size, GCS
  generation or local mtime): same data -> same fingerprint -> cache hit; a data file
  added, removed or rewritten, or a new complete partition -> a new fingerprint.

Every data task takes the fingerprint as an input parameter. See docs/data-versions.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from visrec.core import io

from visrec.data import schema
from visrec.core.errors import UserError

log = logging.getLogger(__name__)

# Bumped if what goes into the fingerprint changes, so old and new fingerprints never collide.
_FINGERPRINT_SCHEME = "visrec-data-fingerprint/1"


@dataclass
class ResolveConfig:
    """How a directory/prefix input is resolved to the data a run reads.

    - `partition_key`: the key of Hive-style partition sub-prefixes, `<key>=<value>/`
      (`dt=2026-11-30/`). When a prefix directly holds such children, the run reads the newest
      complete one; values are compared as strings, so they must sort chronologically as text
      (ISO dates `2026-11-30`, hours `2026-11-30T03`, zero-padded numbers).
    - `done_marker`: the object a writer creates directly in a partition once every data file is in
      place (`_SUCCESS`, as Hadoop/Spark output committers write it). A partition without it is still
      being written (or its writer failed) and is skipped: training on half an export would silently
      drop data. The empty string counts every partition holding at least one data file as complete
      (only for writers that publish a partition atomically).
    """

    partition_key: str = "dt"
    done_marker: str = "_SUCCESS"

    def __post_init__(self) -> None:
        if not self.partition_key or any(c in self.partition_key for c in "/="):
            raise UserError(f"partition key must be a non-empty name without '/' or '=': {self.partition_key!r}")
        if "/" in self.done_marker:
            raise UserError(f"done marker must be a file name directly in a partition: {self.done_marker!r}")
        if schema.names_a_data_file(self.done_marker):
            # It would then be read (and fingerprinted) as one of the partition's data files.
            raise UserError(f"done marker {self.done_marker!r} has a data file extension "
                            f"({', '.join(schema.FORMATS)}); use a name such as _SUCCESS")


@dataclass(frozen=True)
class ResolvedInput:
    """One resolved input.

    `requested` is the URI as given; `uri` is what the stages read (the file, the prefix, or the
    chosen partition's prefix); `partition` the chosen partition's value (`"2026-11-30"`) or None;
    `fingerprint` is `"sha256:<hex>"` over `uri` and each data file's relative path, size and version;
    `files` / `bytes` count those data files; `newest_modified` is the newest one's write time
    (ISO 8601, UTC) when the listing gives it; `skipped_partitions` are the incomplete partitions
    newer than the chosen one.
    """

    requested: str
    uri: str
    partition: str | None
    fingerprint: str
    files: int
    bytes: int
    newest_modified: str | None
    skipped_partitions: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`skipped_partitions` as a list)."""
        out = asdict(self)
        out["skipped_partitions"] = list(self.skipped_partitions)
        return out


def resolve_input(uri: str, config: ResolveConfig | None = None) -> ResolvedInput:
    """What a run reads for input `uri`, and a fingerprint of exactly those data files.

    A file URI (a data format extension of `schema.FORMATS`) is itself. A directory/prefix directly
    holding `<partition_key>=<value>/` children resolves to the newest complete one (see
    `ResolveConfig`), logging each incomplete newer one it skips; `UserError` if none is complete.
    Any other directory/prefix is itself. `UserError` if the resolved URI holds no data file.
    """
    config = config or ResolveConfig()
    if schema.names_a_data_file(uri):
        return _fingerprinted(uri, uri, None, ())
    partitions = _partitions(uri, config.partition_key)
    if not partitions:
        return _fingerprinted(uri, uri, None, ())
    skipped: list[str] = []
    for value, part in reversed(partitions):  # newest first
        if _complete(part, config):
            resolved = _fingerprinted(uri, part, value, tuple(skipped))
            log.info("%s -> %s (%d data files, %s)", uri, part, resolved.files, resolved.fingerprint)
            return resolved
        log.warning("skipping partition %s=%s of %s: %s", config.partition_key, value, uri, _why_incomplete(config))
        skipped.append(value)
    found = ", ".join(f"{config.partition_key}={value}" for value, _ in partitions)
    raise UserError(f"no complete partition under {uri}: found {found}; {_why_incomplete(config)} in any of them")


def _why_incomplete(config: ResolveConfig) -> str:
    return f"no {config.done_marker} marker" if config.done_marker else "no data file"


def _partitions(uri: str, key: str) -> list[tuple[str, str]]:
    """(value, partition URI) of the `<key>=<value>` children of `uri`, oldest first (string order)."""
    out = []
    for child in io.list_dirs(uri):
        name = child.rstrip("/").rsplit("/", 1)[-1]
        prefix, sep, value = name.partition("=")
        if sep and prefix == key and value:
            out.append((value, child))
    return sorted(out)


def _complete(partition: str, config: ResolveConfig) -> bool:
    if config.done_marker:
        return io.exists(io.join(partition, config.done_marker))
    return any(schema.is_data_file(f) for f in io.list_files(partition))


def _fingerprinted(requested: str, resolved: str, partition: str | None,
                   skipped: tuple[str, ...]) -> ResolvedInput:
    """Fingerprint the data files `schema.input_files(resolved)` returns, with their versions from
    `io.file_versions` (the two listings must agree, or the input changed in between)."""
    files = schema.input_files(resolved)  # UserError when there is none, or formats are mixed
    versions = io.file_versions(resolved)
    if schema.names_a_data_file(resolved):
        rows = [(resolved.rstrip("/").rsplit("/", 1)[-1], v) for v in versions]
    else:
        by_uri = {v.uri: v for v in versions if schema.is_data_file(v.uri)}
        rows = [(_relative(f, resolved), by_uri[f]) for f in files if f in by_uri]
        if len(by_uri) != len(files):
            rows = []
    if len(rows) != len(files):
        raise UserError(f"{resolved} changed while it was being resolved (data files appeared or vanished); "
                        "try again")
    rows.sort(key=lambda row: row[0])
    digest = hashlib.sha256()
    digest.update(json.dumps([_FINGERPRINT_SCHEME, resolved.rstrip("/")]).encode("utf-8") + b"\n")
    for rel, v in rows:
        digest.update(json.dumps([rel, v.size, v.version], ensure_ascii=False).encode("utf-8") + b"\n")
    stamps = [v.modified for _, v in rows if v.modified is not None]
    newest = (dt.datetime.fromtimestamp(max(stamps), dt.timezone.utc).isoformat(timespec="microseconds")
              if stamps else None)
    return ResolvedInput(requested=requested, uri=resolved, partition=partition,
                         fingerprint=f"sha256:{digest.hexdigest()}", files=len(rows),
                         bytes=sum(v.size for _, v in rows), newest_modified=newest,
                         skipped_partitions=skipped)


def _relative(uri: str, root: str) -> str:
    """`uri`'s path below `root` (`a/b.jsonl`), with `/` separators on every platform."""
    if io.is_gcs(root):
        base = root.rstrip("/") + "/"
        return uri[len(base):] if uri.startswith(base) else uri
    return Path(uri).relative_to(root).as_posix()
