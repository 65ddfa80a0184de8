"""Local servers for the demo, the study, the benchmarks and the tests: a free port, waiting
until a server answers, and `visrec serve` as a child process.

The child is started as `python -m visrec serve`, a command line, so this module imports no
other visrec package.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait(ready: Callable[[], Any], what: str, proc: subprocess.Popen | None, timeout: float,
          interval: float, log_path: Path | None) -> Any:
    """Poll `ready()` until it returns something other than None; RuntimeError if `proc` exits
    first, TimeoutError after `timeout` seconds."""
    see = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before {what}{see}")
        answer = ready()
        if answer is not None:
            return answer
        time.sleep(interval)
    raise TimeoutError(f"not {what} after {timeout:.0f}s{see}")


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something listens on loopback `port` (for servers without a health route)."""
    def listening() -> bool | None:
        with socket.socket() as s:
            return True if s.connect_ex((LOOPBACK, port)) == 0 else None

    _wait(listening, f"listening on port {port}", proc, timeout, 0.1, None)


def get_json(url: str, timeout: float = 2.0) -> Any | None:
    """The JSON body of a 200 answer to GET `url`, or None (not listening, an error status such as
    503 while loading, not JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read()) if response.status == 200 else None
    except (OSError, ValueError):  # HTTPError is an OSError; ValueError: not JSON
        return None


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0,
                 ready: Callable[[dict], bool] | None = None, log_path: Path | None = None) -> dict:
    """Poll a health route (`/healthz`) until it answers 200 with JSON that `ready` accepts (any,
    by default); return that JSON. RuntimeError if `proc` exits first, TimeoutError after
    `timeout` seconds; both name `log_path`, the server's log, when given."""
    def healthy() -> dict | None:
        health = get_json(url)
        return health if health is not None and (ready is None or ready(health)) else None

    return _wait(healthy, f"healthy at {url}", proc, timeout, 0.2, log_path)


def stop_process(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM `proc` and wait up to `grace` seconds for it, then SIGKILL it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ServeProcess:
    """`visrec serve` for one release on a free loopback port, as a context manager: started on
    entry, stopped on exit. Entering does not wait for `/healthz` (`wait_healthy` does), so a
    caller can start several servers while each loads its release. Output goes to `log_path`
    (inherited when None); `env` is added to this process's environment.
    """

    def __init__(self, release: str | Path, flags: Sequence[str] = (), log_path: Path | None = None,
                 env: dict[str, str] | None = None, timeout: float = 180.0) -> None:
        self.release, self.flags, self.log_path, self.timeout = str(release), list(flags), log_path, timeout
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServeProcess":
        argv = [sys.executable, "-m", "visrec", "serve", "--release", self.release, "--host", LOOPBACK,
                "--port", str(self.port), *self.flags]
        if self.log_path is None:
            self.proc = subprocess.Popen(argv, env=self.env)
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as fh:  # the child keeps its own handle
            self.proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_healthy(self, ready: Callable[[dict], bool] | None = None) -> dict:
        """`wait_healthy` on this server's `/healthz`; its JSON."""
        return wait_healthy(f"{self.url}/healthz", self.proc, self.timeout, ready, self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> "ServeProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
