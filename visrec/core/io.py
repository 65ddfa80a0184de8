"""One small storage layer for local paths and `gs://` URIs, used by every stage.

Stages take URIs and never care where the bytes live. `gs://` goes through the
real `google-cloud-storage` client, which also talks to `gcp-storage-emulator`
when `STORAGE_EMULATOR_HOST` is set (that is how the tests exercise it). Local
writes are atomic (temp file + rename) so a crashed stage never leaves a
half-written file that looks whole.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Sequence

from visrec.core.errors import UserError

GCS_PREFIX = "gs://"
_UMASK = os.umask(0)
os.umask(_UMASK)


def is_gcs(uri: str) -> bool:
    """True for `gs://bucket/...` URIs."""
    return str(uri).startswith(GCS_PREFIX)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or a `gs://` URI."""
    base = str(base)
    if is_gcs(base):
        out = base.rstrip("/")
        for p in parts:
            out = f"{out}/{str(p).strip('/')}"
        return out
    return str(Path(base, *parts))


def parent(uri: str) -> str:
    """The directory that holds `uri`."""
    uri = str(uri)
    if is_gcs(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return str(Path(uri).parent)


def split_gcs(uri: str) -> tuple[str, str]:
    """`gs://bucket/a/b` -> (`bucket`, `a/b`)."""
    if not is_gcs(uri):
        raise ValueError(f"not a gs:// URI: {uri}")
    rest = uri[len(GCS_PREFIX):]
    bucket, _, blob = rest.partition("/")
    if not bucket:
        raise UserError(f"gs:// URI without a bucket: {uri}")
    return bucket, blob


@functools.lru_cache(maxsize=1)
def gcs_client() -> Any:
    """A cached storage client; anonymous against the emulator, default credentials otherwise."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "visrec-local"),
                              credentials=AnonymousCredentials())
    return storage.Client()


def _blob(uri: str) -> Any:
    bucket, name = split_gcs(uri)
    return gcs_client().bucket(bucket).blob(name)


def exists(uri: str) -> bool:
    """Whether a file (or, for local paths, a directory) exists."""
    if is_gcs(uri):
        if _blob(uri).exists():
            return True
        return bool(list_files(uri.rstrip("/") + "/", limit=1))
    return Path(uri).exists()


def read_bytes(uri: str) -> bytes:
    """The whole content of a file; `FileNotFoundError` if it is missing."""
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        try:
            return _blob(uri).download_as_bytes()
        except NotFound as exc:
            raise FileNotFoundError(uri) from exc
    return Path(uri).read_bytes()


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def packaged_config(name: str) -> str:
    """The text of a default config shipped in the package (`visrec/configs/<name>`).

    Read as package data, so an installed wheel finds it as a source checkout does.
    """
    return resources.files("visrec").joinpath("configs", name).read_text()


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically (local: temp + rename; GCS uploads are atomic per object)."""
    if is_gcs(uri):
        _blob(uri).upload_from_string(data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def append_jsonl(uri: str, record: Any) -> None:
    """Append one JSON line to a small log (read + atomic rewrite, so it also works on `gs://`;
    writers are expected one at a time, as registry logs are)."""
    old = read_text(uri) if exists(uri) else ""
    write_text(uri, old + json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(uri: str) -> list[Any]:
    """Every record of a JSON Lines log; [] when it does not exist yet."""
    if not exists(uri):
        return []
    return [json.loads(line) for line in read_text(uri).splitlines() if line.strip()]


def count_lines(uri: str) -> int:
    """The non-blank lines of a text file: a JSON Lines file's records, counted without parsing
    them (so malformed ones count too); `FileNotFoundError` if it is missing."""
    return sum(1 for line in read_text(uri).splitlines() if line.strip())


def list_files(prefix: str, pattern: str = "*", limit: int | None = None) -> list[str]:
    """Files under a directory/prefix (recursive), whose base name matches `pattern`, sorted."""
    out: list[str] = []
    if is_gcs(prefix):
        bucket, name = split_gcs(prefix)
        if name and not name.endswith("/"):
            name += "/"
        for blob in gcs_client().list_blobs(bucket, prefix=name, max_results=limit):
            if blob.name.endswith("/"):
                continue
            if fnmatch.fnmatch(blob.name.rsplit("/", 1)[-1], pattern):
                out.append(f"{GCS_PREFIX}{bucket}/{blob.name}")
        out.sort()
        return out[:limit] if limit else out
    root = Path(prefix)
    if root.is_file():
        return [str(root)]
    if not root.exists():
        return []
    out = sorted(str(p) for p in root.rglob(pattern) if p.is_file())
    return out[:limit] if limit else out


def modified_at(uri: str) -> float:
    """When a file was last written (epoch seconds); for a directory/prefix, its newest file's."""
    if is_gcs(uri):
        blob = _blob(uri)
        if blob.exists():
            blob.reload()
            return blob.updated.timestamp()
        bucket, name = split_gcs(uri)
        stamps = [b.updated.timestamp() for b in gcs_client().list_blobs(bucket, prefix=name.rstrip("/") + "/")]
    else:
        path = Path(uri)
        if path.is_file():
            return path.stat().st_mtime
        stamps = [p.stat().st_mtime for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    if not stamps:
        raise FileNotFoundError(uri)
    return max(stamps)


@dataclass(frozen=True)
class FileVersion:
    """One file as a listing sees it: enough to tell whether its content may have changed.

    `version` is the object generation for `gs://` (a new one on every upload, even of identical
    bytes) and `st_mtime_ns` for local files; `modified` is when it was last written (epoch seconds).
    """

    uri: str
    size: int
    version: str
    modified: float | None = None


def file_versions(uri: str) -> list[FileVersion]:
    """Every file under a file/directory/prefix (the traversal of `list_files`), with size and version,
    sorted by URI. For `gs://` everything comes from one listing (no request per object); a `gs://` URI
    naming one object, with nothing under it as a prefix, gives that object."""
    if is_gcs(uri):
        bucket, name = split_gcs(uri)
        prefix = name if not name or name.endswith("/") else name + "/"
        out = [FileVersion(f"{GCS_PREFIX}{bucket}/{b.name}", int(b.size or 0), str(b.generation),
                           b.updated.timestamp() if b.updated else None)
               for b in gcs_client().list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")]
        if not out and name and not name.endswith("/"):
            blob = gcs_client().bucket(bucket).get_blob(name)
            if blob is not None:
                out = [FileVersion(uri, int(blob.size or 0), str(blob.generation),
                                   blob.updated.timestamp() if blob.updated else None)]
        return sorted(out, key=lambda v: v.uri)
    root = Path(uri)
    if root.is_file():
        paths = [root]
    else:
        paths = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    out = []
    for p in paths:
        st = p.stat()
        out.append(FileVersion(str(p), st.st_size, str(st.st_mtime_ns), st.st_mtime_ns / 1e9))
    return sorted(out, key=lambda v: v.uri)


def list_dirs(prefix: str) -> list[str]:
    """The immediate subdirectories of a directory/prefix (GCS: the common prefixes of a `/`-delimited
    listing), as URIs without a trailing `/`, sorted."""
    if is_gcs(prefix):
        bucket, name = split_gcs(prefix)
        if name and not name.endswith("/"):
            name += "/"
        pages = gcs_client().list_blobs(bucket, prefix=name, delimiter="/")
        for _ in pages:  # `prefixes` fills in as the pages are read
            pass
        return sorted(f"{GCS_PREFIX}{bucket}/{p.rstrip('/')}" for p in pages.prefixes)
    root = Path(prefix)
    return sorted(str(p) for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def makedirs(uri: str) -> None:
    """Create a local directory (GCS has no directories: a no-op there)."""
    if not is_gcs(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)


def download_dir(uri: str, local: str | Path, exclude: Sequence[str] = ()) -> Path:
    """Copy every file under `uri` into `local`, keeping relative paths, except those whose
    relative path starts with one of `exclude` (e.g. `"state/"`)."""
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    if not is_gcs(uri):
        shutil.copytree(uri, local, dirs_exist_ok=True, ignore=lambda d, names: [
            n for n in names if _excluded((Path(d) / n).relative_to(uri).as_posix(), exclude)])
        return local
    base = uri.rstrip("/") + "/"
    for f in list_files(base):
        if _excluded(f[len(base):], exclude):
            continue
        dest = local / f[len(base):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        _blob(f).download_to_filename(str(dest))
    return local


def _excluded(relative: str, exclude: Sequence[str]) -> bool:
    # The trailing "/" lets a directory match its own prefix ("state" vs "state/"), so
    # copytree skips it without descending.
    return f"{relative}/".startswith(tuple(exclude))


def upload_file(local: str | Path, uri: str) -> None:
    """Copy local file `local` to `uri` (local or `gs://`), streamed from disk."""
    if is_gcs(uri):
        _blob(uri).upload_from_filename(str(local))
        return
    Path(uri).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local, uri)


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy every file under local directory `local` to `uri` (local or `gs://`)."""
    local = Path(local)
    if not is_gcs(uri):
        shutil.copytree(local, uri, dirs_exist_ok=True)
        return
    for p in sorted(local.rglob("*")):
        if p.is_file():
            upload_file(p, join(uri, p.relative_to(local).as_posix()))


def remove(uri: str) -> None:
    """Delete one file if it exists (local or `gs://`)."""
    if is_gcs(uri):
        from google.api_core.exceptions import NotFound

        with contextlib.suppress(NotFound):
            _blob(uri).delete()
    else:
        Path(uri).unlink(missing_ok=True)


def remove_tree(uri: str) -> None:
    """Delete a directory (local) or every object under a prefix (`gs://`)."""
    if is_gcs(uri):
        bucket, prefix = split_gcs(uri.rstrip("/") + "/")
        for blob in gcs_client().list_blobs(bucket, prefix=prefix):
            blob.delete()
    else:
        shutil.rmtree(uri, ignore_errors=True)


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local directory holding the content of `uri`: itself if local, a temp download if `gs://`."""
    if not is_gcs(uri):
        if not Path(uri).exists():
            raise UserError(f"directory not found: {uri}")
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="visrec-dl-") as tmp:
        yield download_dir(uri, tmp)


@contextlib.contextmanager
def output_dir(uri: str) -> Iterator[Path]:
    """A local directory to write into; for `gs://` it is uploaded when the block succeeds."""
    if not is_gcs(uri):
        Path(uri).mkdir(parents=True, exist_ok=True)
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="visrec-up-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, uri)


def local_file(uri: str, suffix: str = "") -> Path:
    """A local path for reading `uri`; `gs://` objects are downloaded to a temp file (caller owns it)."""
    if not is_gcs(uri):
        return Path(uri)
    fd, tmp = tempfile.mkstemp(prefix="visrec-", suffix=suffix)
    os.close(fd)
    _blob(uri).download_to_filename(tmp)
    return Path(tmp)
