"""How the processes serving a release keep in step: what each worker process is started with,
and the background loop that loads the release and then follows everyone else's writes.

`visrec serve --workers N` runs N uvicorn worker processes, each with its own copy of the
index. They share one verified download of the release and one reload signal
(`shared_by_workers`), and each is started from a `WorkerSpec` handed over in the
environment (`to_env` in `visrec serve`, `from_env` in the app factory each worker calls).
Every process, one or N, then runs `serve_release`: load, and every
`journal_poll_seconds` apply the journal lines other workers (or replicas) wrote, carry the
followed releases' writes, and follow a reload another worker announced.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from visrec.core.errors import UserError
from visrec.online.config import ServingConfig
from visrec.online.ranking import RankingConfig
from visrec.online.service import RecommenderService

log = logging.getLogger(__name__)

SPEC_ENV = "VISREC_SERVE_CONFIG"
# Apart from the spec: every connection's protocol reads it, and one float is cheaper than the spec.
HEADER_TIMEOUT_ENV = "VISREC_HEADER_TIMEOUT_SECONDS"


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process serves, and how: the release URI and the service's config."""

    release_uri: str
    config: ServingConfig

    def to_env(self) -> dict[str, str]:
        """The environment variables a worker process reads back with `from_env`."""
        return {SPEC_ENV: json.dumps({"release": self.release_uri, "config": dataclasses.asdict(self.config)}),
                HEADER_TIMEOUT_ENV: str(self.config.header_timeout_seconds)}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerSpec:
        spec = json.loads(environ[SPEC_ENV])
        config = ServingConfig(**{**spec["config"], "ranking": RankingConfig(**spec["config"]["ranking"])})
        return cls(spec["release"], config)


def header_timeout_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """The `ServingConfig.header_timeout_seconds` the process was started with (`WorkerSpec.to_env`)."""
    return float(environ.get(HEADER_TIMEOUT_ENV, ServingConfig.header_timeout_seconds))


def shared_by_workers(release_uri: str, config: ServingConfig) -> ServingConfig:
    """`config` for several worker processes of this machine: the release verified once here (a
    broken one fails once instead of in a worker restart loop), a `gs://` one downloaded once
    into a shared cache that the workers then find already verified (they keep the `gs://` URI,
    so reloads follow its CURRENT), and a reload signal that lets a reload taken by one worker
    reach all of them (`ServingConfig.reload_signal`)."""
    from visrec.stages.release.registry import load_release

    control = Path(tempfile.mkdtemp(prefix="visrec-serve-"))
    config = dataclasses.replace(config, cache_dir=config.cache_dir or str(control / "releases"))
    load_release(release_uri, config.cache_dir)
    return dataclasses.replace(config, reload_signal=str(control / "reload.json"))


def serve_release(service: RecommenderService, stop: threading.Event, on_release: Callable[[str], None],
                  on_load_error: Callable[[Exception], None]) -> threading.Thread:
    """Start the thread that loads the service's release, then tails the journal and the reload
    signal until `stop`. `on_release(version)`: a release is served now (loaded, or followed
    to); `on_load_error(exc)`: the release cannot be loaded, and the thread ends."""

    def run() -> None:
        try:
            service.start()
        except Exception as exc:  # noqa: BLE001 - any load failure makes this process useless
            log.critical("cannot load release %s: %s", service.release_uri, exc,
                         exc_info=not isinstance(exc, UserError))
            on_load_error(exc)
            return
        on_release(service.state.release.version)
        while not stop.wait(service.config.journal_poll_seconds):
            try:
                service.sync_journal()
                version = service.follow_reloads()
                if version is not None:
                    on_release(version)
            except Exception:  # noqa: BLE001 - keep tailing; the error is logged
                log.exception("journal sync failed")

    thread = threading.Thread(target=run, name="visrec-release", daemon=True)
    thread.start()
    return thread
