"""`visrec serve` as a real uvicorn process on a free port: every endpoint, every error,
writes and the journal, hot reload under load, restart replay."""

from __future__ import annotations

import base64
import io as _io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from visrec.core.errors import UserError

from visrec.core.servers import free_port, stop_process, wait_healthy

pytestmark = pytest.mark.integration

TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CATEGORIES = ["fashion/women/bags", "fashion/women/shoes", "fashion/men/shirts", "home/kitchen/mugs"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 30), (20, 20, 20), (240, 240, 240)]


def jpeg(colour: tuple[int, int, int], pattern: int = 0) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), colour)
    draw = ImageDraw.Draw(img)
    for i in range(pattern):
        draw.rectangle([8 * i, 8 * i, 8 * i + 6, 60], fill=(255 - colour[0], 255 - colour[1], 255 - colour[2]))
    buf = _io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def build_release(models_dir: Path, registry: Path | str, version: str, n_items: int = 120,
                  catalog_snapshot_at: str | None = None, work_root: Path | None = None) -> Path | str:
    """A small release through `deploy_release` (docs/artifacts.md section 6), from a tiny SigLIP
    and generated images: embeddings + PCA as stage 3 writes them, an index as stage 4 does.
    Its inputs are written under `work_root` (default: beside a local registry)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.data.embeddings import write_embeddings
    from visrec.data.images import decode_image
    from visrec.stages.index.config import IndexConfig
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.model.encoders import load_image_encoder
    from visrec.model.pca import PcaProjection
    from visrec.stages.release.deploy import DeployConfig, deploy_release
    from visrec.model.encode import encode_images

    encoder = load_image_encoder(str(models_dir / "siglip"), kind="siglip")
    ids = [f"item-{i:04d}" for i in range(n_items)]
    images = [decode_image(jpeg(COLOURS[i % len(COLOURS)], i % 5)) for i in range(n_items)]
    raw = np.stack([encode_images(encoder, [img], None)[0] for img in images])
    pca = PcaProjection.fit(raw, dims=16)
    work = (work_root or Path(registry).parent) / f"work-{version}"
    write_embeddings(str(work / "embeddings" / "embeddings-00000-of-00001.parquet"), ids, raw)
    pca.save(str(work / "embeddings" / "pca" / "pca.npz"))
    SimilarityIndex.build(ids, pca.transform(raw), IndexConfig()).save(str(work / "index"))
    pq.write_table(pa.table({
        "item_id": ids,
        "title": [f"thing {i}" for i in range(n_items)],
        "image_uri": [f"images/{i}.jpg" for i in ids],
        "listed_at": ["2026-01-01T00:00:00Z"] * n_items,
        "price": pa.array([1000 + 10 * (i % 20) for i in range(n_items)], pa.int64()),
        "category": [CATEGORIES[i % len(CATEGORIES)] for i in range(n_items)],
        "status": ["sold" if i % 10 == 9 else "on_sale" for i in range(n_items)],
    }), work / "listings.parquet")
    (work / "metrics.json").write_text(json.dumps(
        {"decision": "deploy", "reasons": [{"name": "ndcg@5", "passed": True, "message": "test release"}]}))
    outcome = deploy_release(DeployConfig(
        registry=str(registry), model_dir=str(models_dir / "siglip"), embeddings_dir=str(work / "embeddings"),
        index_dir=str(work / "index"), listings_uri=str(work / "listings.parquet"),
        metrics_uri=str(work / "metrics.json"), version=version, catalog_snapshot_at=catalog_snapshot_at))
    return outcome.path if str(registry).startswith("gs://") else Path(outcome.path)


class Server:
    """`python -m visrec serve` in a subprocess; `start` waits until /healthz says ready."""

    def __init__(self, release: Path | None, port: int, image_root: Path, token: str | None,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        self.release, self.port, self.image_root, self.token = release, port, image_root, token
        self.env, self.args = env or {}, args
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = image_root.parent / f"server-{port}.log"

    def start(self) -> "Server":
        env = {k: v for k, v in os.environ.items() if k != "VISREC_ADMIN_TOKEN"}
        env.update(AIP_HEALTH_ROUTE="/vertex/health", AIP_PREDICT_ROUTE="/vertex/predict",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        if self.token:
            env["VISREC_ADMIN_TOKEN"] = self.token
        env.update(self.env)
        where = ["--release", str(self.release), "--port", str(self.port)] if self.release else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "visrec", "serve", *where, "--image-root", str(self.image_root), *self.args],
            env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        wait_healthy(f"{self.url}/healthz", self.proc, timeout=60, log_path=self.log)
        return self

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("serving")
    registry = root / "registry"
    v1 = build_release(tiny_models, registry, "v1")
    for version in ("v2", "v3-broken"):  # the same verified content under other versions
        copy = shutil.copytree(v1, registry / "releases" / version)
        manifest = json.loads((copy / "release.json").read_text())
        (copy / "release.json").write_text(json.dumps({**manifest, "version": version}))
    (registry / "releases" / "v3-broken" / "items.parquet").write_bytes(b"not what the checksum says")
    (registry / "CURRENT").write_text("v1\n")
    (root / "images").mkdir()
    (root / "images" / "red.jpg").write_bytes(jpeg(COLOURS[0], 0))
    (root / "outside.jpg").write_bytes(jpeg(COLOURS[0], 0))
    return registry


@pytest.fixture(scope="module")
def server(registry):
    srv = Server(registry, free_port(), registry.parent / "images", TOKEN).start()
    yield srv
    srv.stop()


def similar(server, item_id, k=10):
    return httpx.get(f"{server.url}/v1/items/{item_id}/similar", params={"k": k})


def test_health_ready_and_vertex_routes(server):
    for path in ("/healthz", "/readyz", "/vertex/health"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200
        assert r.json()["status"] == "ok" and r.json()["release"] == "v1"
        assert r.json()["encoder"] in ("loading", "ready")
        assert r.json()["handover"] is None  # CURRENT was set by hand: no deploy history, no predecessor
    r = httpx.post(server.url + "/vertex/predict", json={"instances": [{"item_id": "item-0000", "k": 3},
                                                                      {"item_id": "nope"}]})
    assert r.status_code == 200
    first, second = r.json()["predictions"]
    assert first["item_id"] == "item-0000" and len(first["items"]) == 3
    assert second == {"item_id": "nope", "error": "unknown item"}


def test_similar_filters_and_ranks(server):
    r = similar(server, "item-0000", k=10)
    assert r.status_code == 200
    body = r.json()
    assert body["item_id"] == "item-0000" and body["release"] == "v1" and len(body["items"]) == 10
    got = [it["item_id"] for it in body["items"]]
    assert "item-0000" not in got
    assert not any(int(i[-4:]) % 10 == 9 for i in got), "sold items must not be recommended"
    assert all(500 <= it["price"] <= 2000 for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert set(body["items"][0]) == {"item_id", "score", "price", "category"}


def test_read_errors(server):
    r = similar(server, "no-such-item")
    assert r.status_code == 404 and "no-such-item" in r.json()["error"]
    for k in (0, 101, "ten"):
        r = similar(server, "item-0000", k=k)
        assert r.status_code == 400 and "k must" in r.json()["error"]
    r = httpx.post(server.url + "/predict", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = httpx.post(server.url + "/predict", json={"instances": [{"k": 3}]})
    assert r.status_code == 422 and "item_id" in r.json()["error"]
    r = httpx.post(server.url + "/predict", json={"instances": [{"item_id": "item-0000"}] * 1001})
    assert r.status_code == 422 and "instances" in r.json()["error"]
    r = httpx.post(server.url + "/predict", json={"instances": [{"item_id": "item-0000", "k": 500}]})
    assert r.json()["predictions"][0]["error"].startswith("k must")
    r = httpx.get(server.url + "/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    # The similar-items fast path matches exactly what its route template would.
    r = similar(server, "no such ünïcode")  # percent-encoded on the wire, decoded by the server
    assert r.status_code == 404 and "no such ünïcode" in r.json()["error"]
    for path in ("/v1/items//similar", "/v1/items/a/b/similar", "/v1/items/item-0000/similar/x"):
        r = httpx.get(server.url + path)
        assert r.status_code == 404 and r.json()["error"] == "Not Found"
    assert httpx.delete(server.url + "/v1/items/item-0000/similar").status_code == 405


def test_similar_before_the_release_is_loaded_is_503():
    from serving.app import create_app

    # No lifespan here: the release never starts loading.
    app = create_app("/nonexistent-release")
    transport = httpx.ASGITransport(app=app)

    async def get(path: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    import asyncio

    for path in ("/v1/items/item-0000/similar", "/healthz"):
        r = asyncio.run(get(path))
        assert r.status_code == 503 and "loading" in r.json()["error"]


def test_write_auth(server):
    body = {"status": "sold"}
    assert httpx.put(server.url + "/v1/items/item-0001", json=body).status_code == 401
    r = httpx.put(server.url + "/v1/items/item-0001", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "token" in r.json()["error"]
    assert httpx.delete(server.url + "/v1/items/item-0001").status_code == 401
    assert httpx.post(server.url + "/admin/reload").status_code == 401


def test_write_errors(server):
    def put(item, **kw):
        return httpx.put(f"{server.url}/v1/items/{item}", **{"headers": AUTH, **kw})

    r = put("new-1", json={"title": "x", "category": "a/b", "price": 10, "image": base64.b64encode(b"junk").decode()})
    assert r.status_code == 422 and "decode" in r.json()["error"]
    r = put("new-1", json={"category": "a/b", "price": 10, "image": "@@not base64@@"})
    assert r.status_code == 422 and "base64" in r.json()["error"]
    r = put("new-1", json={"category": "a/b", "price": 10})
    assert r.status_code == 422 and "image" in r.json()["error"]
    r = put("new-1", json={"category": "a/b", "price": 10, "status": "gone", "image_uri": "red.jpg"})
    assert r.status_code == 422 and "status" in r.json()["error"]
    r = put("new-1", json={"category": "a/b", "price": 10, "image_uri": "../outside.jpg"})
    assert r.status_code == 422 and "outside" in r.json()["error"]
    r = put("new-1", content=b"[1, 2", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    big = json.dumps({"category": "a/b", "price": 1, "image": "A" * (11 * 1024 * 1024)})
    r = put("new-1", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and "payload" in r.json()["error"]
    r = httpx.delete(server.url + "/v1/items/never-existed", headers=AUTH)
    assert r.status_code == 404
    assert similar(server, "new-1").status_code == 404  # nothing half-written


def test_upsert_then_found_within_a_second(server):
    # Same image, category and price as item-0006: the new listing must be among its nearest.
    image = base64.b64encode(jpeg(COLOURS[0], 1)).decode()
    deadline = time.monotonic() + 90
    while httpx.get(server.url + "/healthz").json()["encoder"] == "loading":  # torch loads after the index
        assert time.monotonic() < deadline
        time.sleep(0.2)
    started = time.monotonic()
    r = httpx.put(server.url + "/v1/items/fresh-1", headers=AUTH,
                  json={"title": "fresh", "category": CATEGORIES[2], "price": 1060, "status": "on_sale",
                        "image": image})
    assert r.status_code == 200 and r.json()["embedded"] is True
    top = [it["item_id"] for it in similar(server, "item-0006", k=5).json()["items"]]
    assert time.monotonic() - started < 1.0 + 0.5  # PUT (incl. embedding) + query on a busy 2-core box
    assert "fresh-1" in top[:2]  # tied with item-0066, generated identically
    assert similar(server, "fresh-1").status_code == 200
    # image_uri under the image root works too.
    r = httpx.put(server.url + "/v1/items/fresh-2", headers=AUTH,
                  json={"category": CATEGORIES[0], "price": 1000, "image_uri": "red.jpg"})
    assert r.status_code == 200 and similar(server, "fresh-2").status_code == 200


def test_every_route_answers_a_post_as_vertex_invoke_sends_it(server):
    """Vertex AI's invoke API forwards POSTs only, and its `Authorization` header carries the
    caller's Google token: reads, writes, reload and metrics each have a POST form, and the
    admin token may come in `X-Visrec-Token`."""
    vertex_auth = {"Authorization": "Bearer ya29.a-google-token", "X-Visrec-Token": TOKEN}
    r = httpx.post(server.url + "/v1/items/item-0000/similar", params={"k": 4})
    assert r.status_code == 200 and len(r.json()["items"]) == 4
    assert httpx.post(server.url + "/healthz").json()["status"] == "ok"
    assert b"visrec_http_requests" in httpx.post(server.url + "/metrics").content
    new = {"category": CATEGORIES[0], "price": 1000, "image_uri": "red.jpg"}
    assert httpx.post(server.url + "/v1/items/via-invoke", json=new, headers=vertex_auth).status_code == 200
    assert similar(server, "via-invoke").status_code == 200
    r = httpx.post(server.url + "/v1/items/via-invoke/delete", headers={"X-Visrec-Token": "wrong"})
    assert r.status_code == 401
    assert httpx.post(server.url + "/v1/items/via-invoke/delete", headers=vertex_auth).json()["deleted"] is True
    assert similar(server, "via-invoke").status_code == 404


def test_admin_token_from_a_stored_object(monkeypatch, gcs_emulator):
    """On Vertex AI the container reads the token from GCS instead of the model's settings; a
    blank or placeholder token is refused at start-up instead of guarding the writes."""
    from serving.app import configured_admin_token
    from visrec.core import io

    monkeypatch.delenv("VISREC_ADMIN_TOKEN", raising=False)
    assert configured_admin_token() is None
    uri = f"gs://{gcs_emulator()}/secrets/admin-token"
    monkeypatch.setenv("VISREC_ADMIN_TOKEN_URI", uri)
    with pytest.raises(UserError, match="does not exist"):
        configured_admin_token()
    io.write_text(uri, "stored-admin-token-0123\n")
    assert configured_admin_token() == "stored-admin-token-0123"
    monkeypatch.setenv("VISREC_ADMIN_TOKEN", "env-admin-token-456789")
    assert configured_admin_token() == "env-admin-token-456789"
    for weak in ("   ", "changeme"):
        monkeypatch.setenv("VISREC_ADMIN_TOKEN", weak)
        with pytest.raises(UserError, match="at least 16 characters"):
            configured_admin_token()


def test_sold_and_deleted_never_returned(server):
    victims = [it["item_id"] for it in similar(server, "item-0000", k=3).json()["items"]]
    sold, deleted = victims[0], victims[1]
    assert httpx.put(f"{server.url}/v1/items/{sold}", headers=AUTH, json={"status": "sold"}).status_code == 200
    assert httpx.delete(f"{server.url}/v1/items/{deleted}", headers=AUTH).status_code == 200
    assert similar(server, deleted).status_code == 404
    for i in range(0, 120, 7):
        got = {it["item_id"] for it in similar(server, f"item-{i:04d}", k=50).json().get("items", [])}
        assert sold not in got and deleted not in got
    server.sold_and_deleted = (sold, deleted)


def test_concurrent_upserts_and_searches(server):
    errors: list[str] = []

    def writer(w: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH) as c:
            for j in range(5):
                r = c.put(f"/v1/items/conc-{w}-{j}", json={"category": CATEGORIES[j % 4], "price": 1000 + j,
                                                           "image": base64.b64encode(jpeg(COLOURS[j], w)).decode()})
                if r.status_code != 200:
                    errors.append(f"PUT {r.status_code} {r.text}")

    def reader(t: int) -> None:
        with httpx.Client(base_url=server.url) as c:
            for j in range(30):
                r = c.get(f"/v1/items/item-{(t * 30 + j) % 120:04d}/similar", params={"k": 20})
                if r.status_code not in (200, 404):
                    errors.append(f"GET {r.status_code} {r.text}")

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=reader, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    for w in range(3):
        for j in range(5):
            assert similar(server, f"conc-{w}-{j}").status_code == 200


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    assert 'visrec_http_requests_total{method="GET",route="/v1/items/{item_id}/similar",status="200"}' in text
    assert 'visrec_http_request_seconds_bucket{le="0.005",route="/v1/items/{item_id}/similar"}' in text
    assert "visrec_candidates_surviving_count" in text
    assert 'visrec_release_info{version="v1"} 1.0' in text
    index_items = [line for line in text.splitlines() if line.startswith("visrec_index_items ")]
    assert index_items and float(index_items[0].split()[1]) >= 120


def test_reload_swaps_under_load_and_refuses_a_broken_release(server, registry):
    failures: list[str] = []
    versions: set[str] = set()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=server.url) as c:
            i = 0
            while not stop.is_set():
                r = c.get(f"/v1/items/item-{i % 120:04d}/similar", params={"k": 5})
                i += 1
                if r.status_code == 200:
                    versions.add(r.json()["release"])
                elif r.status_code != 404:
                    failures.append(f"{r.status_code} {r.text}")

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        (registry / "CURRENT").write_text("v2\n")
        r = httpx.post(server.url + "/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json() == {"release": "v2", "previous": "v1"}
        time.sleep(0.3)
        (registry / "CURRENT").write_text("v3-broken\n")
        r = httpx.post(server.url + "/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 409 and "still serving v2" in r.json()["error"]
        assert "Traceback" not in r.text
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:5]
    assert versions == {"v1", "v2"}
    assert httpx.get(server.url + "/healthz").json()["release"] == "v2"
    assert 'visrec_release_info{version="v2"} 1.0' in httpx.get(server.url + "/metrics").text


def test_restart_replays_the_journal_and_writes_need_a_token(server, registry):
    sold, deleted = server.sold_and_deleted
    journal = registry / "releases" / "v1" / "state" / "journal.jsonl"
    assert journal.exists() and len(journal.read_text().splitlines()) >= 18
    server.stop()
    (registry / "CURRENT").write_text("v1\n")  # the release all the writes above went to
    again = Server(registry, free_port(), registry.parent / "images", token=None).start()
    try:
        assert similar(again, "fresh-1").status_code == 200
        assert similar(again, "conc-2-4").status_code == 200
        assert similar(again, deleted).status_code == 404
        got = {it["item_id"] for it in similar(again, "item-0000", k=50).json()["items"]}
        assert sold not in got and deleted not in got
        r = httpx.put(again.url + "/v1/items/x", headers=AUTH, json={"status": "sold"})
        assert r.status_code == 403 and "VISREC_ADMIN_TOKEN" in r.json()["error"]
    finally:
        again.stop()


def test_vertex_environment_with_a_gcs_release(registry, gcs_emulator):
    """Only AIP_* variables, as Vertex AI sets them: the gs:// registry's CURRENT release is downloaded."""
    from visrec.core import io

    bucket = gcs_emulator()
    io.upload_dir(registry / "releases" / "v2", f"gs://{bucket}/registry/releases/v2")
    io.write_text(f"gs://{bucket}/registry/CURRENT", "v2\n")
    port = free_port()
    srv = Server(None, port, registry.parent / "images", token=None,
                 env={"AIP_STORAGE_URI": f"gs://{bucket}/registry", "AIP_HTTP_PORT": str(port)}).start()
    try:
        assert httpx.get(srv.url + "/vertex/health").json()["release"] == "v2"
        r = httpx.post(srv.url + "/vertex/predict", json={"instances": [{"item_id": "item-0003", "k": 4}]})
        assert r.status_code == 200 and len(r.json()["predictions"][0]["items"]) == 4
    finally:
        srv.stop()


def test_gcs_release_writes_reach_other_replicas_and_survive_restarts(registry, gcs_emulator, tmp_path):
    """Two replicas of a gs:// release (as behind a Vertex AI endpoint; the second with two worker
    processes sharing one downloaded copy): a write taken by one is served by every process of
    the other within a second or two, and a replica started later replays it."""
    from visrec.core import io

    bucket = gcs_emulator()
    io.upload_dir(registry / "releases" / "v2", f"gs://{bucket}/registry/releases/v2")
    io.write_text(f"gs://{bucket}/registry/CURRENT", "v2\n")
    gs_registry = f"gs://{bucket}/registry"

    def replica(name: str, *args: str) -> Server:
        port = free_port()
        return Server(None, port, registry.parent / "images", TOKEN,
                      env={"AIP_STORAGE_URI": gs_registry, "AIP_HTTP_PORT": str(port)},
                      args=("--cache-dir", str(tmp_path / name), *args)).start()

    def caught_up(srv: Server) -> bool:  # fresh connections: with --workers every worker answers some
        return all(similar(srv, "gcs-new").status_code == 200 and similar(srv, "item-0007").status_code == 404
                   for _ in range(6))

    first, second = replica("a"), replica("b", "--workers", "2")
    later = None
    try:
        image = base64.b64encode(jpeg(COLOURS[2], 3)).decode()
        r = httpx.put(first.url + "/v1/items/gcs-new", headers=AUTH,
                      json={"title": "t", "category": CATEGORIES[0], "price": 1000, "image": image}, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.delete(first.url + "/v1/items/item-0007", headers=AUTH).status_code == 200
        deadline = time.monotonic() + 10
        while not caught_up(second):
            assert time.monotonic() < deadline, "the other replica never saw the writes"
            time.sleep(0.2)
        first.stop()
        later = replica("c")  # an empty cache: downloads the release, replays the journal from GCS
        assert caught_up(later)
    finally:
        for srv in (first, second, later):
            if srv is not None:
                srv.stop()


def test_reloading_a_gcs_release_deletes_the_replaced_download(registry, gcs_emulator):
    from visrec.core import io
    from visrec.online.service import RecommenderService

    bucket = gcs_emulator()
    for version in ("v1", "v2"):
        io.upload_dir(registry / "releases" / version, f"gs://{bucket}/registry/releases/{version}")
    io.write_text(f"gs://{bucket}/registry/CURRENT", "v1\n")
    service = RecommenderService(f"gs://{bucket}/registry")
    service.start()
    first = service.state.release.path
    assert first.is_dir()
    io.write_text(f"gs://{bucket}/registry/CURRENT", "v2\n")
    assert service.reload() == "v2"
    assert not first.exists() and service.state.release.path.is_dir()
    assert service.similar("item-0003", 3)[0] == "v2"
    assert service.reload() == "v2"  # reloading the same release keeps (and reuses) its copy
    assert service.state.release.path.is_dir()


# Run in a fresh interpreter: transformers must not be imported yet when the two encoders load.
_RELOAD_WHILE_THE_ENCODER_LOADS = """
import sys
from visrec.online.service import RecommenderService

service = RecommenderService(sys.argv[1])
service.start()  # its encoder starts loading in the background
print(service.reload())  # loads a second one meanwhile, and waits for it
"""


def test_a_reload_while_the_first_encoder_still_loads(registry, tmp_path):
    """Two encoders loading at once in one process (a reload right after start) both load."""
    release = shutil.copytree(registry / "releases" / "v1", tmp_path / "release",
                              ignore=shutil.ignore_patterns("state"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.run([sys.executable, "-c", _RELOAD_WHILE_THE_ENCODER_LOADS, str(release)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split() == ["v1"]


def test_worker_processes_start_from_the_spec_in_the_environment():
    from visrec.online.config import ServingConfig
    from visrec.online.ranking import RankingConfig
    from visrec.online.workers import WorkerSpec, header_timeout_seconds

    spec = WorkerSpec("gs://bucket/registry", ServingConfig(ranking=RankingConfig(fetch=50), header_timeout_seconds=3.0,
                                                            reload_signal="/tmp/reload.json"))
    env = spec.to_env()
    assert WorkerSpec.from_env(env) == spec and header_timeout_seconds(env) == 3.0
    assert header_timeout_seconds({}) == ServingConfig.header_timeout_seconds


def test_two_workers_see_each_others_writes_and_reloads(registry):
    (registry / "CURRENT").write_text("v1\n")
    srv = Server(registry, free_port(), registry.parent / "images", TOKEN, args=("--workers", "2")).start()

    def fresh(path: str) -> httpx.Response:  # a new connection each time, so both workers answer
        with httpx.Client(base_url=srv.url) as c:
            return c.get(path)

    def fresh_get(path: str) -> int:
        return fresh(path).status_code

    try:
        deadline = time.monotonic() + 60
        while sum(fresh_get("/healthz") == 200 for _ in range(10)) < 10:  # both workers loaded
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert {fresh_get("/v1/items/item-0012/similar") for _ in range(6)} == {200}
        assert httpx.delete(srv.url + "/v1/items/item-0012", headers=AUTH).status_code == 200
        time.sleep(1.0)
        assert {fresh_get("/v1/items/item-0012/similar") for _ in range(10)} == {404}
        # One reload request, taken by one worker, moves every worker to the new release.
        (registry / "CURRENT").write_text("v2\n")
        r = httpx.post(srv.url + "/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["release"] == "v2"
        deadline = time.monotonic() + 30
        while {fresh("/healthz").json()["release"] for _ in range(10)} != {"v2"}:
            assert time.monotonic() < deadline, "a worker is still serving v1"
            time.sleep(0.2)
    finally:
        srv.stop()
