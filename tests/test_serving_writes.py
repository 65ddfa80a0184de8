"""Acknowledged writes are never lost or undone, and a replica keeps answering: real `visrec serve`
processes sharing a journal, torn and unwritable journals, bad entries, corrupt releases, reloads,
floods of predictions, huge images and idle connections."""

from __future__ import annotations

import asyncio
import base64
import io as _bytes_io
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from visrec.core.servers import free_port, wait_for_port, wait_healthy
from test_serving import CATEGORIES, COLOURS, TOKEN, Server, build_release, jpeg

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path, tiny_models) -> Path:
    """A fresh registry whose CURRENT is `v1` (120 items), with an image root beside it."""
    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "red.jpg").write_bytes(jpeg(COLOURS[0], 0))
    return registry


def journal_of(registry: Path, version: str = "v1") -> Path:
    return registry / "releases" / version / "state" / "journal.jsonl"


def serve(registry: Path, *args: str) -> Server:
    return Server(registry, free_port(), registry.parent / "images", TOKEN, args=args).start()


def item(server: Server, item_id: str) -> dict:
    r = httpx.get(f"{server.url}/v1/items/{item_id}")
    assert r.status_code == 200, r.text
    return r.json()


def eventually(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ---- 1. writes on two workers are merged with the newest state ---------------------------------


def test_partial_updates_on_two_workers_never_undo_each_other(registry):
    """Two processes on one journal (what `--workers 2` is): a status change on one and a price
    change on the other, within the journal tail, both stand, on both and after a restart."""
    a, b = serve(registry), serve(registry)
    try:
        for i in range(5):
            target = f"item-{i:04d}"
            assert httpx.put(f"{a.url}/v1/items/{target}", json={"status": "sold"}, headers=AUTH).status_code == 200
            r = httpx.put(f"{b.url}/v1/items/{target}", json={"price": 1234 + i}, headers=AUTH)
            assert r.status_code == 200 and r.json()["status"] == "sold", r.json()
        # An item created on one worker a moment ago can be updated and deleted on the other.
        # (Once the encoder is loaded: torch takes >5 s to import on a loaded 2-core machine.)
        wait_healthy(f"{a.url}/healthz", a.proc, 180, lambda health: health.get("encoder") == "ready")
        new = {"category": CATEGORIES[0], "price": 1000, "image_uri": "red.jpg"}
        for name in ("fresh-a", "fresh-b"):
            assert httpx.put(f"{a.url}/v1/items/{name}", json=new, headers=AUTH).status_code == 200
        assert httpx.put(f"{b.url}/v1/items/fresh-a", json={"status": "reserved"}, headers=AUTH).status_code == 200
        assert httpx.delete(f"{b.url}/v1/items/fresh-b", headers=AUTH).status_code == 200

        def settled(server: Server) -> None:
            for i in range(5):
                got = item(server, f"item-{i:04d}")
                assert (got["status"], got["price"]) == ("sold", 1234 + i), got
            assert item(server, "fresh-a")["status"] == "reserved"
            assert httpx.get(f"{server.url}/v1/items/fresh-b").status_code == 404

        for server in (a, b):
            eventually(lambda: settled(server))
    finally:
        a.stop()
        b.stop()
    restarted = serve(registry)
    try:
        settled(restarted)
    finally:
        restarted.stop()


def test_a_worker_writes_on_the_newest_state_even_before_its_tail_runs(registry):
    """Two services on one journal with no background tail at all: the second still updates and
    deletes what the first created a moment ago (each write reads the journal first)."""
    from visrec.online.config import ServingConfig
    from visrec.online.service import RecommenderService

    config = ServingConfig(image_root=str(registry.parent / "images"))
    first, second = RecommenderService(str(registry), config), RecommenderService(str(registry), config)
    first.start()
    second.start()
    try:
        for name in ("made-on-first", "also-made-on-first"):
            first.upsert(name, {"category": CATEGORIES[0], "price": 500, "image_uri": "red.jpg"})
        assert second.upsert("made-on-first", {"status": "sold"})["status"] == "sold"
        second.delete("also-made-on-first")
        first.sync_journal()
        assert first.item("made-on-first")["status"] == "sold" and "also-made-on-first" not in first.state.catalog
    finally:
        first.state.close()
        second.state.close()


def test_a_write_racing_another_replicas_keeps_the_other_field(registry):
    """Replicas cannot lock each other (GCS): a price change merged with a row that does not yet
    show another replica's `sold` must still not undo it, because an entry sets only what its
    request sent."""
    from visrec.online.config import ServingConfig
    from visrec.online.service import RecommenderService

    seller = RecommenderService(str(registry), ServingConfig())
    pricer = RecommenderService(str(registry), ServingConfig())
    seller.start()
    pricer.start()
    try:
        append = pricer.state.journal.append

        def the_other_write_lands_first(entry):
            seller.upsert("item-0008", {"status": "sold"})  # after pricer read the journal, before its append
            append(entry)

        pricer.state.journal.append = the_other_write_lands_first
        pricer.upsert("item-0008", {"price": 4321})
        assert [e["sent"] for e in map(json.loads, journal_of(registry).read_text().splitlines())] == [
            ["status"], ["price"]]
        for service in (seller, pricer):
            service.sync_journal()
            got = service.item("item-0008")
            assert (got["status"], got["price"]) == ("sold", 4321), got
    finally:
        seller.state.close()
        pricer.state.close()


# ---- 2. torn and unwritable journals -----------------------------------------------------------


def test_a_torn_journal_tail_never_swallows_the_next_write(registry):
    journal = journal_of(registry)
    first = serve(registry)
    try:
        assert httpx.put(f"{first.url}/v1/items/item-0001", json={"status": "sold"}, headers=AUTH).status_code == 200
    finally:
        first.stop()
    with open(journal, "ab") as fh:  # a crash in the middle of an append
        fh.write(b'{"op":"upsert","id":"torn","item_id":"item-0002","status":"res')
    second = serve(registry)
    try:
        assert httpx.put(f"{second.url}/v1/items/item-0002", json={"status": "sold"},
                         headers=AUTH).status_code == 200
    finally:
        second.stop()
    assert journal.read_bytes().endswith(b"\n") and b'"torn"' not in journal.read_bytes()
    third = serve(registry)
    try:
        assert item(third, "item-0001")["status"] == item(third, "item-0002")["status"] == "sold"
    finally:
        third.stop()


def test_a_write_that_cannot_be_stored_is_refused_and_leaves_nothing(registry):
    """A full disk, played by a file-size limit: the PUT is answered 507 (not 200, not a bare 500)
    and the journal holds no part of it, so the next write after the space is back stands."""
    journal = journal_of(registry)
    warm = serve(registry)  # creates the journal with one entry
    try:
        assert httpx.put(f"{warm.url}/v1/items/item-0003", json={"status": "sold"}, headers=AUTH).status_code == 200
    finally:
        warm.stop()
    size = journal.stat().st_size
    limit = size + 64  # less than one entry

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    port = free_port()
    env = {**os.environ, "VISREC_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    # Output to /dev/null: a log file would hit the limit too.
    proc = subprocess.Popen([sys.executable, "-m", "visrec", "serve", "--release", str(registry), "--port", str(port)],
                            env=env, preexec_fn=limited, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=60, proc=proc)
        url = f"http://127.0.0.1:{port}"
        eventually(lambda: (assert_status(httpx.get(f"{url}/healthz"), 200)), timeout=60)
        for status in ("reserved", "sold"):
            r = httpx.put(f"{url}/v1/items/item-0004", json={"status": status}, headers=AUTH)
            assert r.status_code == 507 and "not stored" in r.json()["error"], r.text
        assert journal.stat().st_size == size
        assert item_status(url, "item-0004") == "on_sale"  # nothing half-applied either
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert journal.read_bytes().endswith(b"\n") and journal.stat().st_size == size
    again = serve(registry)
    try:
        assert httpx.put(f"{again.url}/v1/items/item-0004", json={"status": "sold"}, headers=AUTH).status_code == 200
    finally:
        again.stop()
    replay = serve(registry)
    try:
        assert item(replay, "item-0004")["status"] == "sold" and item(replay, "item-0003")["status"] == "sold"
    finally:
        replay.stop()


def assert_status(response: httpx.Response, status: int) -> None:
    assert response.status_code == status


def item_status(url: str, item_id: str) -> str:
    return httpx.get(f"{url}/v1/items/{item_id}").json()["status"]


def test_a_bad_journal_entry_is_skipped_and_counted_never_an_outage(registry):
    journal = journal_of(registry)
    journal.parent.mkdir(parents=True, exist_ok=True)
    bad = {"op": "upsert", "id": "bad", "item_id": "item-0005", "price": 10, "category": "a/b", "status": "on_sale",
           "vector": [0.5] * 3, "at": time.time()}  # the index holds 16 dims
    good = {"op": "upsert", "id": "good", "item_id": "item-0006", "price": 777, "category": CATEGORIES[0],
            "status": "sold", "sent": ["price", "status"], "vector": None, "at": time.time()}
    journal.write_text(json.dumps(bad) + "\n" + "{not json}\n" + json.dumps(good) + "\n")
    server = serve(registry)
    try:
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["journal_entries_skipped"] == 2
        assert "visrec_journal_entries_skipped 2.0" in httpx.get(f"{server.url}/metrics").text
        got = item(server, "item-0006")
        assert (got["price"], got["status"]) == (777, "sold")  # the entries after it still apply
    finally:
        server.stop()


# ---- 3. releases: a corrupt CURRENT, and reloads ------------------------------------------------


def test_a_corrupt_current_release_on_restart_serves_the_last_one_that_verifies(registry, tiny_models):
    build_release(tiny_models, registry, "v2")  # deployed: CURRENT is v2, v1 the one before
    index_files = sorted((registry / "releases" / "v2" / "index").iterdir())
    index_files[0].write_bytes(index_files[0].read_bytes()[:-8] + b"garbage!")  # a torn copy
    server = serve(registry)
    try:
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["release"] == "v1" and health["degraded"]["wanted"] == "v2"
        assert "does not match its sha256" in health["degraded"]["reason"]
        assert "visrec_degraded 1.0" in httpx.get(f"{server.url}/metrics").text
        assert httpx.get(f"{server.url}/v1/items/item-0000/similar").status_code == 200
    finally:
        server.stop()
    assert "CURRENT release v2" in server.log.read_text()


def test_a_reload_never_serves_an_acknowledged_delete_undone(registry, tiny_models, monkeypatch):
    """A delete the old release answered while the new one loaded is applied before the swap."""
    import datetime as dt

    from visrec.online import service as service_module
    from visrec.online.config import ServingConfig
    from visrec.online.service import RecommenderService

    live = RecommenderService(str(registry), ServingConfig())
    live.start()
    snapshot = dt.datetime.fromtimestamp(time.time() - 5, dt.timezone.utc).isoformat()
    build_release(tiny_models, registry, "v2", catalog_snapshot_at=snapshot)  # CURRENT moves to v2
    loaded = service_module.load_state

    def load_then_a_delete_arrives(*args, **kwargs):
        state = loaded(*args, **kwargs)
        live.delete("item-0007")  # acknowledged by v1, still the one serving
        return state

    monkeypatch.setattr(service_module, "load_state", load_then_a_delete_arrives)
    assert live.reload() == "v2"
    assert "item-0007" not in live.state.catalog and "item-0007" not in live.state.index
    results = live.similar_many([("item-0001", 50)])
    assert results[0].release == "v2" and "item-0007" not in {r.item_id for r in results[0].ranked.items}
    live.state.close()


# ---- 4. predictions cannot starve a replica ----------------------------------------------------


@pytest.fixture
def app_and_service(registry):
    from serving.app import create_app
    from visrec.online.config import ServingConfig

    app = create_app(str(registry), ServingConfig(max_predict_neighbours=500, max_concurrent_predicts=1),
                     admin_token=TOKEN)
    app.state.service.start()  # no lifespan here: load in the test, serve through ASGI
    yield app, app.state.service
    app.state.service.state.close()


def run(coro):
    return asyncio.run(coro)


def test_predict_runs_off_the_event_loop_and_is_bounded(app_and_service, monkeypatch):
    app, service = app_and_service
    release_search = threading.Event()
    real = service.similar_many

    def slow(queries, *who):
        release_search.wait(10)
        return real(queries, *who)

    monkeypatch.setattr(service, "similar_many", slow)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            predict = asyncio.create_task(client.post("/predict", json={"instances": [{"item_id": "item-0001"}]}))
            await asyncio.sleep(0.2)
            health = await client.get("/healthz")  # answered while the prediction still runs
            second = await client.post("/predict", json={"instances": [{"item_id": "item-0002"}]})
            done_before = predict.done()
            release_search.set()
            return health, second, done_before, await predict

    health, second, done_before, first = run(scenario())
    assert health.status_code == 200 and not done_before
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert first.status_code == 200 and first.json()["predictions"][0]["items"]


def test_predict_refuses_oversized_and_malformed_requests(app_and_service):
    app, _ = app_and_service

    async def post(body: bytes | dict):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            if isinstance(body, dict):
                return await client.post("/predict", json=body)
            return await client.post("/predict", content=body, headers={"Content-Type": "application/json"})

    too_many = run(post({"instances": [{"item_id": "item-0001", "k": 100}] * 6}))  # 600 > 500
    assert too_many.status_code == 422 and "at most 500" in too_many.json()["error"]
    assert run(post({"instances": [{"item_id": "item-0001", "k": True}]})).status_code == 422
    nested = run(post(b"[" * 100_000 + b"]" * 100_000))
    assert nested.status_code == 400 and "nested too deeply" in nested.json()["error"]


def test_one_prediction_comes_from_one_release(app_and_service, monkeypatch):
    """A reload in the middle of a request cannot mix two releases in one answer."""
    from visrec.online import service as service_module

    _, service = app_and_service
    first_state, seen = service.state, []
    real = service_module.recommend

    def recommend(item_id, k, index, catalog, config):
        seen.append(index)
        service._state = object()  # a reload swapped the state meanwhile
        return real(item_id, k, index, catalog, config)

    monkeypatch.setattr(service_module, "recommend", recommend)
    results = service.similar_many([("item-0001", 5), ("item-0002", 5), ("item-0003", 5)])
    service._state = first_state
    assert {r.release for r in results} == {first_state.release.version}
    assert all(index is first_state.index for index in seen)
    assert len(seen) == 3 and all(r.ranked.items for r in results)


def test_a_huge_image_is_refused_before_it_is_decoded(app_and_service):
    from PIL import Image

    from visrec.online.errors import BadItem

    _, service = app_and_service
    buf = _bytes_io.BytesIO()
    Image.new("RGB", (6000, 4000), (200, 10, 10)).save(buf, format="PNG")  # 24 MP, a few KB
    started = time.monotonic()
    with pytest.raises(BadItem, match="over the limit"):
        service.upsert("huge", {"category": CATEGORIES[0], "price": 100,
                                "image": base64.b64encode(buf.getvalue()).decode()})
    assert time.monotonic() - started < 5  # refused from the header, never decoded


# ---- 5. connections, tokens and logs -----------------------------------------------------------


def test_idle_and_slow_header_connections_are_closed(registry):
    server = serve(registry, "--header-timeout", "1", "--max-connections", "6")
    sockets = []
    try:
        for _ in range(3):
            sockets.append(socket.create_connection(("127.0.0.1", server.port)))  # says nothing
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never ends its headers
        sockets.append(slow)
        time.sleep(2.5)
        for sock in sockets:
            sock.settimeout(2)
            try:
                assert sock.recv(1) == b"", "the server should have closed it"
            except ConnectionResetError:
                pass
        assert httpx.get(f"{server.url}/healthz").status_code == 200  # the server is fine
    finally:
        for sock in sockets:
            sock.close()
        server.stop()


def test_connections_beyond_the_limit_get_503(registry):
    server = serve(registry, "--header-timeout", "30", "--max-connections", "3")
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
    try:
        time.sleep(0.3)
        assert httpx.get(f"{server.url}/healthz").status_code == 503
    finally:
        for sock in held:
            sock.close()
    try:
        eventually(lambda: assert_status(httpx.get(f"{server.url}/healthz"), 200))
    finally:
        server.stop()


def test_a_weak_admin_token_stops_the_server_at_start(registry):
    env = {**os.environ, "VISREC_ADMIN_TOKEN": "   ", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "visrec", "serve", "--release", str(registry),
                           "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "at least 16 characters" in done.stderr


def test_secret_query_values_never_reach_the_access_log(registry):
    server = serve(registry, "--access-log")
    try:
        assert httpx.get(f"{server.url}/healthz", params={"token": "hunter2-very-secret", "k": "3"}).status_code == 200
        eventually(lambda: assert_status(httpx.get(f"{server.url}/healthz"), 200))
    finally:
        server.stop()
    log = server.log.read_text()
    assert "hunter2-very-secret" not in log and "token=REDACTED" in log and "k=3" in log
