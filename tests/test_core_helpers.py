"""The small shared helpers in visrec.core: hashes, progress lines, tables, line counts, local servers."""

from __future__ import annotations

import http.server
import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from visrec.core import io
from visrec.core.hashing import hash64, stable_hash
from visrec.core.progress import Progress
from visrec.core.servers import free_port, get_json, stop_process, wait_for_port, wait_healthy
from visrec.core.tables import format_table


def test_hashes_keep_their_values():
    """Samples, splits, shards, PCA samples and A/B arms of every earlier run depend on these values."""
    assert stable_hash("sample", 0, "i0000001") == 16720852050873065145
    assert stable_hash("study-0", "user-000001") == 15178062653193347985
    assert hash64("0:i0000001") == 13412667644382458112  # embed's PCA-sample priority
    assert stable_hash("a", "bc") != stable_hash("ab", "c")


def test_format_table_aligns_columns_or_keeps_fixed_widths():
    assert format_table([("a", "bb", ""), ("ccc", "d", "")]) == "a    bb\nccc  d"
    # A cell wider than its fixed width widens its own row only.
    assert format_table([("x", "y"), ("long-cell", "z")], widths=(3, 0)) == "x    y\nlong-cell  z"
    assert format_table([]) == ""


def test_progress_logs_at_the_total_and_not_more_often_than_asked(caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        progress = Progress(log, "items", total=3, every_s=3600)
        for _ in range(3):
            progress.add()
        Progress(log, "rows", every_s=0).add(5)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("items: 3/3 (") and messages[1].startswith("rows: 5 (")


def test_count_lines_counts_non_blank_lines_without_parsing(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{not json\n   \n{"b": 2}')
    assert io.count_lines(str(path)) == 3
    with pytest.raises(FileNotFoundError):
        io.count_lines(str(tmp_path / "missing.jsonl"))


class _Health(http.server.BaseHTTPRequestHandler):
    """`/healthz`: 503 for the first two requests, then 200 with the request count."""

    calls = 0

    def do_GET(self) -> None:  # noqa: N802 - the handler's API
        type(self).calls += 1
        status = 503 if self.calls <= 2 else 200
        body = json.dumps({"calls": self.calls}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server():
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
    _Health.calls = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/healthz", port
    finally:
        server.shutdown()
        server.server_close()


def test_wait_healthy_waits_for_a_200_the_predicate_accepts(health_server):
    url, port = health_server
    wait_for_port(port, timeout=10)
    assert get_json(url) is None  # 503 while "loading"
    assert wait_healthy(url, timeout=30, ready=lambda health: health["calls"] >= 5)["calls"] >= 5
    with pytest.raises(TimeoutError, match="not healthy"):
        wait_healthy(url, timeout=0.5, ready=lambda health: False)


def test_waiting_stops_when_the_server_exits_and_stop_process_ends_a_child():
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    with pytest.raises(RuntimeError, match="exited with status 0"):
        wait_healthy(f"http://127.0.0.1:{free_port()}/healthz", exited, timeout=30)
    with pytest.raises(RuntimeError, match="exited"):
        wait_for_port(free_port(), timeout=30, proc=exited)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    stop_process(sleeper)
    assert sleeper.poll() is not None and time.monotonic() - started < 20
