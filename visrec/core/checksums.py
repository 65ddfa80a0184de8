"""sha256 manifests of directories: one format and one verifier for every checksummed directory.

A manifest maps each file's path relative to the directory (POSIX separators) to its hex
sha256. The index records one as `manifest.json`'s `sha256`, the release as `release.json`'s
`files`; both check them with `verify_checksums` before anything is read, so a corrupt or
half-copied directory is refused with the name of the file at fault.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping

from visrec.core.errors import UserError


class ChecksumMismatch(UserError):
    """A file a manifest lists is missing or does not match its sha256 (`name`: its relative path)."""

    def __init__(self, name: str, missing: bool) -> None:
        self.name, self.missing = name, missing
        super().__init__(f"{name} is missing" if missing else f"{name} is corrupt (sha256 mismatch)")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, read in chunks (files of an index or a release run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_files(root: Path, skip: Callable[[str], bool] = lambda name: False) -> dict[str, str]:
    """sha256 of every file under `root` but those `skip` (given the relative path) leaves out."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and not skip(name):
            out[name] = sha256_file(path)
    return out


def verify_checksums(root: Path, checksums: Mapping[str, str]) -> None:
    """Check every file `checksums` lists under `root`; `ChecksumMismatch` for the first one that fails."""
    for name, expected in sorted(checksums.items()):
        path = root / name
        if not path.is_file():
            raise ChecksumMismatch(name, missing=True)
        if sha256_file(path) != expected:
            raise ChecksumMismatch(name, missing=False)
