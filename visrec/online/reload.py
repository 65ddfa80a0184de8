"""Reload signalling between the worker processes of one `visrec serve --workers N`.

The worker that took `POST /admin/reload` writes a new generation (and the version it now
serves) into a file the workers share (`ServingConfig.reload_signal`); every other worker
looks at it with each journal tail and reloads too. A single process has no file and
neither announces nor follows.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from visrec.core import io

log = logging.getLogger(__name__)


class ReloadSignal:
    """One process's view of the shared reload file (`path` None: a single process).

    It starts having seen what the file says now: a reload announced before this process
    started is already served by it.
    """

    def __init__(self, path: str | None):
        self.path = path
        self._seen = self._read()[0]

    def announce(self, version: str) -> None:
        """Tell the other workers that this one now serves `version`."""
        if not self.path:
            return
        self._seen = uuid.uuid4().hex
        io.write_json(self.path, {"generation": self._seen, "version": version, "pid": os.getpid()})

    def unseen(self) -> str | None:
        """The version another worker announced since the last look; None if nothing new."""
        generation, version = self._read()
        if generation is None or generation == self._seen:
            return None
        self._seen = generation
        return version

    def _read(self) -> tuple[str | None, str | None]:
        """(generation, version) last written to the file, (None, None) if none."""
        if not self.path:
            return None, None
        try:
            announced = json.loads(Path(self.path).read_text())
            return announced["generation"], announced["version"]
        except FileNotFoundError:
            return None, None
        except (ValueError, KeyError, TypeError) as exc:
            log.error("unreadable reload signal %s: %s", self.path, exc)
            return None, None
