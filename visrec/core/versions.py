"""The versions of Python and of installed packages, recorded in artifacts so they can be read back."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence


def library_versions(packages: Sequence[str]) -> dict[str, str | None]:
    """`python` and each of `packages` -> its installed version (None when it is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out
