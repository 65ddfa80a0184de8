"""Writes taken by the release in production after the next release's catalog snapshot are
carried into the next release (and back, on rollback), re-embedded when the encoder changed."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pytest

from test_serving import COLOURS, build_release, jpeg
from visrec.online.entry import JournalEntry
from visrec.online.handover import encoder_fingerprint, plan_handover


def upsert(item: str, at: float, vector: bool = True, image: bool = True, **meta) -> JournalEntry:
    return JournalEntry.from_json(json.dumps({
        "op": "upsert", "id": f"id-{item}-{at}", "item_id": item, "at": at, "price": 100, "category": "a/b",
        "status": "on_sale", "vector": [1.0, 0.0] if vector else None, "image_sha256": "ab" * 32 if image else None,
        **meta}))


def test_plan_carries_only_writes_after_the_snapshot_and_not_twice():
    before = upsert("old", 5.0)
    sold = upsert("x", 12.0, vector=False, status="sold")
    gone = JournalEntry("delete", "y", 11.0, id="d")
    new = upsert("new", 13.0)
    done = upsert("done", 14.0)
    copy, embed = plan_handover([new, sold, before, done, gone], since=10.0, applied=lambda e: e is done,
                                same_encoder=False)
    assert copy == [gone, sold]  # in write order, the vector-less update kept whole
    assert embed == [new]
    copy, embed = plan_handover([new, sold], since=10.0, applied=lambda e: False, same_encoder=True)
    assert [e.item_id for e in copy] == ["x", "new"] and copy[1].vector == (1.0, 0.0) and not embed


def test_plan_keeps_the_metadata_of_an_upsert_without_a_kept_image():
    copy, embed = plan_handover([upsert("legacy", 20.0, image=False)], since=10.0, applied=lambda e: False,
                                same_encoder=False)
    assert not embed and copy[0].vector is None and copy[0].price == 100


def test_encoder_fingerprint_follows_encoder_and_pca_files_only():
    manifest = {"encoder_kind": "siglip", "files": {"model/model.safetensors": "a", "pca/pca.npz": "b",
                                                     "index/data.npy": "c", "items.parquet": "d"}}
    other_catalog = {**manifest, "files": {**manifest["files"], "index/data.npy": "x", "items.parquet": "y"}}
    assert encoder_fingerprint(manifest) == encoder_fingerprint(other_catalog)
    for changed in ({"model/model.safetensors": "z"}, {"pca/pca.npz": "z"}):
        assert encoder_fingerprint(manifest) != encoder_fingerprint({**manifest, "files": {**manifest["files"],
                                                                                           **changed}})
    assert encoder_fingerprint(manifest) != encoder_fingerprint({**manifest, "encoder_kind": "mobilenet_v2"})


@pytest.fixture(scope="module")
def retrained_models(tmp_path_factory, tiny_models) -> Path:
    """The tiny SigLIP with slightly moved image-tower weights: a new encoder, as retraining gives."""
    import torch

    from visrec.model.encoders import load_siglip

    model, processor = load_siglip(str(tiny_models / "siglip"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.vision_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("retrained")
    model.save_pretrained(out / "siglip")
    processor.save_pretrained(out / "siglip")
    return out


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat()


def _wait_for_handover(service, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while not service.state.handover.status.done:
        assert time.monotonic() < deadline, service.state.handover.status
        time.sleep(0.05)
    service.sync_journal()  # what the journal tail does every 0.5 s
    return service.state.handover.status.as_dict()


def _recommended(service, item_id: str) -> set[str]:
    return {r.item_id for r in service.similar(item_id, 50)[1].items}


def _journal_ids(release: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (release / "state" / "journal.jsonl").read_text().splitlines()]


def test_writes_after_the_snapshot_reach_the_next_release_and_come_back_on_rollback(
        tmp_path, tiny_models, retrained_models):
    from visrec.data.images import decode_image
    from visrec.stages.release.promote import rollback
    from visrec.model.encode import encode_images
    from visrec.online.service import RecommenderService

    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1")
    service = RecommenderService(str(registry))
    service.start()
    assert service.state.handover is None  # the first release has no predecessor
    new_image = jpeg(COLOURS[1], 2)
    service.upsert("item-0003", {"status": "sold"})  # before the next snapshot: the snapshot has it
    snapshot = time.time()
    time.sleep(0.01)
    service.upsert("item-0000", {"status": "sold"})
    service.upsert("item-0001", {"price": 1999})
    service.delete("item-0002")
    service.upsert("new-1", {"title": "new", "category": "fashion/women/shoes", "price": 1010,
                             "image": base64.b64encode(new_image).decode()})
    assert "item-0000" not in _recommended(service, "item-0004")

    # The pipeline read the catalog at `snapshot`; its release (a retrained encoder) goes live now.
    v2 = build_release(retrained_models, registry, "v2", catalog_snapshot_at=_iso(snapshot))
    assert service.reload() == "v2"
    status = _wait_for_handover(service)
    assert status == {"source": "v1", "since": pytest.approx(snapshot, abs=1e-3), "carried": 3, "to_embed": 1,
                      "embedded": 1, "failed": 0, "by_other_process": False, "done": True}
    from prometheus_client import generate_latest

    from serving.app import ServingMetrics

    metrics = generate_latest(ServingMetrics(service).registry).decode()
    assert "visrec_handover_carried 3.0" in metrics and "visrec_handover_embedded 1.0" in metrics
    assert "visrec_handover_pending 0.0" in metrics
    state = service.state
    assert state.catalog.get("item-0000")["status"] == "sold" and state.catalog.get("item-0001")["price"] == 1999
    assert "item-0002" not in state.index and "item-0002" not in state.catalog
    assert state.catalog.get("item-0003")["status"] == "on_sale"  # before the snapshot: not carried
    got = _recommended(service, "item-0004")
    assert "item-0000" not in got and "item-0002" not in got
    assert service.similar("new-1", 5)[1].items  # indexed: a query, and a candidate for its neighbours
    # Re-embedded with v2's encoder, not copied from v1's space.
    expected = encode_images(state.encoder(), [decode_image(new_image)], state.pca)[0]
    assert np.allclose(state.index.vector("new-1"), expected, atol=1e-5)
    v1_entry = next(json.loads(line) for line in (registry / "releases/v1/state/journal.jsonl").read_text().splitlines()
                    if json.loads(line)["item_id"] == "new-1")
    assert not np.allclose(v1_entry["vector"], expected, atol=1e-3)

    # The old release still takes writes (a replica not yet switched, a canary's share): followed.
    still_on_v1 = RecommenderService(str(registry / "releases" / "v1"))
    still_on_v1.start()
    still_on_v1.upsert("item-0005", {"status": "sold"})
    service.sync_journal()  # what the journal tail does every 0.5 s: carry, then apply
    assert service.state.catalog.get("item-0005")["status"] == "sold"
    assert service.state.handover.status.carried == 4

    # A second worker process of this machine (here a second service in this process) finds the
    # hand-over's lock held by `service`, and only applies what `service` carries.
    other = RecommenderService(str(registry))
    other.start()
    assert other.state.handover.status.by_other_process and other.state.handover.status.carried == 0
    assert other.state.catalog.get("item-0005")["status"] == "sold" and "new-1" in other.state.index
    # When `service` stops, `other` takes over, and carries nothing twice.
    service.state.handover_lock.release()
    other.sync_journal()
    assert not other.state.handover.status.by_other_process and other.state.handover.status.carried == 0
    ids = _journal_ids(v2)
    assert len(ids) == len(set(ids)) == 5

    # A listing made on v2, then a rollback: v1 gets it (re-embedded back into v1's space), once.
    service.upsert("new-2", {"title": "newer", "category": "home/kitchen/mugs", "price": 1020,
                             "image": base64.b64encode(jpeg(COLOURS[3], 1)).decode()})
    assert rollback(str(registry), who="test") == "v1"
    assert service.reload() == "v1"
    status = _wait_for_handover(service)
    assert status["source"] == "v2" and status["embedded"] == 1 and status["failed"] == 0
    assert service.similar("new-2", 5)[1].items
    ids = _journal_ids(registry / "releases" / "v1")
    assert len(ids) == len(set(ids))  # new-1 etc. came from v1 in the first place: not carried back


def test_hand_over_between_gcs_releases(tmp_path, tiny_models, retrained_models, gcs_emulator):
    """Vertex AI: the journal, the kept images and the predecessor all live on GCS."""
    from visrec.online.service import RecommenderService

    registry = f"gs://{gcs_emulator()}/registry"
    build_release(tiny_models, registry, "v1", work_root=tmp_path)
    service = RecommenderService(registry)
    service.start()
    snapshot = time.time()
    time.sleep(0.01)
    service.upsert("item-0000", {"status": "sold"})
    service.upsert("new-1", {"title": "new", "category": "fashion/women/shoes", "price": 1010,
                             "image": base64.b64encode(jpeg(COLOURS[1], 2)).decode()})
    build_release(retrained_models, registry, "v2", catalog_snapshot_at=_iso(snapshot), work_root=tmp_path)
    assert service.reload() == "v2"
    status = _wait_for_handover(service)
    assert (status["carried"], status["embedded"], status["failed"]) == (1, 1, 0)
    assert service.state.catalog.get("item-0000")["status"] == "sold" and service.similar("new-1", 5)[1].items
    # A Vertex AI replica serves the copy Vertex made of the release (AIP_STORAGE_URI), not the
    # registry: its manifest leads it to the registry's history and to the shared state there.
    from visrec.core import io

    vertex_copy = f"{registry.rsplit('/', 1)[0]}/vertex-managed/model-123/artifacts"
    io.upload_dir(io.download_dir(f"{registry}/releases/v2", tmp_path / "v2-copy", exclude=("state/",)), vertex_copy)
    replica = RecommenderService(vertex_copy)
    replica.start()
    assert replica.state.release.state_uri == f"{registry}/releases/v2/state"
    status = replica.state.handover.status
    assert (status.source, status.carried, status.to_embed) == ("v1", 0, 0)  # all carried by the first replica
    assert replica.state.catalog.get("item-0000")["status"] == "sold" and "new-1" in replica.state.index
    replica.upsert("item-0001", {"status": "reserved"})  # written to the registry, seen by the other replica
    service.sync_journal()
    assert service.state.catalog.get("item-0001")["status"] == "reserved"

    # A v1 replica still serving (its share of the canary, or kept at 0% for a traffic-shift
    # rollback) follows v2, the release that replaced it: v2's writes reach it, re-embedded.
    still_on_v1 = RecommenderService(f"{registry}/releases/v1")
    still_on_v1.start()
    assert still_on_v1.state.handover is None
    still_on_v1.sync_journal()  # the journal tail: finds that v2 replaced v1
    follower = still_on_v1.state.successor_handover
    assert follower is not None and follower.status.source == "v2" and follower.status.carried == 1  # "reserved"
    service.upsert("new-2", {"title": "newer", "category": "home/kitchen/mugs", "price": 1020,
                             "image": base64.b64encode(jpeg(COLOURS[3], 1)).decode()})
    still_on_v1.sync_journal()
    deadline = time.monotonic() + 30
    while not follower.status.done:
        assert time.monotonic() < deadline, follower.status
        time.sleep(0.05)
    still_on_v1.sync_journal()
    assert still_on_v1.state.catalog.get("item-0001")["status"] == "reserved"
    assert follower.status.embedded == 1 and still_on_v1.similar("new-2", 5)[1].items
    # No ping-pong: v2 already has what v1 carried back from it (same items, same write times).
    before = service.state.handover.status.as_dict()
    service.sync_journal()
    assert service.state.handover.status.as_dict() == before


def test_reembedding_sets_bad_images_apart_and_keeps_going(tmp_path):
    from visrec.online.handover import HandoverStatus, reembed_batch
    from visrec.online.journal import open_journal, store_image

    source, target = str(tmp_path / "v1-state"), str(tmp_path / "v2-state")
    good = [store_image(source, f"image {i}".encode()) for i in range(5)]
    corrupt = store_image(source, b"not an image")
    entries = [upsert(f"n{i}", 20.0 + i, image_sha256=digest) for i, digest in enumerate(good[:3] + [corrupt] + good[3:])]
    entries.append(upsert("gone", 30.0, image_sha256="0" * 64))  # its image was never kept

    def embed(batch: list[bytes]) -> np.ndarray:
        if b"not an image" in batch:
            raise ValueError("cannot identify image file")
        return np.array([[float(len(data)), 1.0] for data in batch], dtype=np.float32)

    status = HandoverStatus("v1", since=10.0, to_embed=len(entries))
    journal = open_journal(target)
    reembed_batch(entries, embed, source, target, journal, status)
    assert (status.embedded, status.failed, status.done) == (5, 2, True)
    written = open_journal(target).read_new()
    assert [e.item_id for e in written] == ["n0", "n1", "n2", "n4", "n5"]
    assert written[0].vector == (7.0, 1.0) and written[0].id == entries[0].id
    assert (Path(target) / "images" / good[0]).read_bytes() == b"image 0"  # kept for the next hand-over


def test_served_over_http_the_tail_keeps_following_the_old_release(tmp_path, tiny_models, retrained_models):
    """A real `visrec serve`: reload, /healthz and /metrics report the hand-over, and a write that
    reaches the old release afterwards is served by the new one within the journal tail's period."""
    import httpx

    from visrec.core.servers import free_port
    from test_serving import AUTH, TOKEN, Server
    from visrec.online.service import RecommenderService

    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1")
    (tmp_path / "images").mkdir()
    server = Server(registry, free_port(), tmp_path / "images", TOKEN).start()
    try:
        snapshot = time.time()
        time.sleep(0.01)
        r = httpx.put(f"{server.url}/v1/items/new-1", headers=AUTH, timeout=60, json={
            "title": "new", "category": "fashion/women/shoes", "price": 1010,
            "image": base64.b64encode(jpeg(COLOURS[1], 2)).decode()})
        assert r.status_code == 200, r.text
        build_release(retrained_models, registry, "v2", catalog_snapshot_at=_iso(snapshot))
        assert httpx.post(f"{server.url}/admin/reload", headers=AUTH, timeout=60).json()["release"] == "v2"
        deadline = time.monotonic() + 30
        while not (health := httpx.get(f"{server.url}/healthz").json())["handover"]["done"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.1)
        assert health["handover"]["source"] == "v1" and health["handover"]["embedded"] == 1
        while httpx.get(f"{server.url}/v1/items/new-1/similar").status_code != 200:  # the tail applies it
            assert time.monotonic() < deadline, "the re-embedded listing is not served"
            time.sleep(0.1)
        assert "visrec_handover_embedded 1.0" in httpx.get(f"{server.url}/metrics").text

        neighbours = {it["item_id"] for it in
                      httpx.get(f"{server.url}/v1/items/new-1/similar", params={"k": 50}).json()["items"]}
        sold = sorted(neighbours)[0]
        still_on_v1 = RecommenderService(str(registry / "releases" / "v1"))  # a replica not yet switched
        still_on_v1.start()
        still_on_v1.upsert(sold, {"status": "sold"})
        deadline = time.monotonic() + 15
        while sold in {it["item_id"] for it in
                       httpx.get(f"{server.url}/v1/items/new-1/similar", params={"k": 50}).json()["items"]}:
            assert time.monotonic() < deadline, "the sold item is still recommended 15 s later"
            time.sleep(0.1)
    finally:
        server.stop()
