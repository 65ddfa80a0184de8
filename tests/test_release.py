"""Releases: publish, verify, approve, roll back; crashes never leave a half release current.

The inputs are real, tiny artifacts: a random SigLIP saved with `save_pretrained`, a
fitted PCA, a ScaNN index built by `SimilarityIndex`, listings and metrics.json files.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visrec.cli import main
from visrec.core.errors import UserError
from visrec.stages.release.deploy import DeployConfig, deploy_release
from visrec.stages.release.promote import approve_release, rollback
from visrec.stages.release.registry import (CURRENT, champion_embeddings_uri, current_version, list_releases,
                                            load_release, predecessor, successor)
from visrec.stages.release.release import DEPLOYED, PENDING, REFUSED, UNCHANGED, ReleaseInvalid

ITEMS = 40
EMBED_DIMS = 32  # the tiny SigLIP's vision hidden size
PCA_DIMS = 8


def metrics_doc(ndcg: float, decision: str = "deploy", passed: bool = True) -> dict:
    """A metrics.json as the evaluation writes it (only the fields deployment reads matter)."""
    reason = {"metric": "ndcg@5", "comparison": "vs_baseline.absolute", "value": ndcg - 0.2, "limit": 0.0,
              "passed": passed, "message": f"ndcg@5 {'beats' if passed else 'does not beat'} the baseline"}
    return {"candidate": {"ndcg@5": ndcg}, "baseline": {"ndcg@5": 0.2}, "champion": None,
            "uplift": {}, "lists_used": 100, "lists_skipped": 3, "decision": decision, "reasons": [reason]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Stage outputs a deployment consumes: model, embeddings (+PCA), index, listings, metrics."""
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from visrec.stages.index.config import IndexConfig
    from visrec.stages.index.searcher import SimilarityIndex
    from visrec.model.pca import PcaProjection

    root = tmp_path_factory.mktemp("stage-outputs")
    torch.manual_seed(0)
    tiny = dict(hidden_size=EMBED_DIMS, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model_dir = root / "train" / "model"
    SiglipModel(SiglipConfig(text_config=dict(tiny, vocab_size=100),
                             vision_config=dict(tiny, image_size=32, patch_size=16))).save_pretrained(model_dir)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)

    rng = np.random.default_rng(0)
    ids = [f"item-{i:03d}" for i in range(ITEMS)]
    vectors = rng.normal(size=(ITEMS, EMBED_DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb_dir = root / "embed"
    emb_dir.mkdir()
    pq.write_table(pa.table({"item_id": ids, "embedding": pa.array(list(vectors), pa.list_(pa.float32()))}),
                   emb_dir / "embeddings-00000-of-00001.parquet")
    (emb_dir / "embed_stats.json").write_text("{}")
    pca = PcaProjection.fit(vectors, PCA_DIMS)
    pca.save(str(emb_dir / "pca" / "pca.npz"))
    index_dir = root / "index"
    SimilarityIndex.build(ids, pca.transform(vectors), IndexConfig(tuning_queries=10, max_p99_ms=None)
                          ).save(str(index_dir))

    statuses = ["on_sale", "reserved", "sold"]
    listings = root / "listings.jsonl"
    listings.write_text("".join(
        json.dumps({"item_id": item, "title": f"thing {i}", "price": 1000 + 10 * i, "category": f"cat/{i % 3}",
                    "status": statuses[i % 3], "image_uri": f"images/{item}.jpg",
                    "listed_at": "2026-11-01T10:00:00"}) + "\n"
        for i, item in enumerate(ids)) + "not json\n")
    paths = {"model": model_dir, "embeddings": emb_dir, "index": index_dir, "listings": listings}
    for name, doc in {"good": metrics_doc(0.5), "better": metrics_doc(0.6), "best": metrics_doc(0.7),
                      "rejected": metrics_doc(0.1, "reject", passed=False),
                      "inconsistent": metrics_doc(0.5, "deploy", passed=False)}.items():
        (root / f"{name}.json").write_text(json.dumps(doc))
        paths[name] = root / f"{name}.json"
    return paths


def config(inputs, registry, metrics: str = "good", **kw) -> DeployConfig:
    return DeployConfig(registry=str(registry), model_dir=str(inputs["model"]),
                        embeddings_dir=str(inputs["embeddings"]), index_dir=str(inputs["index"]),
                        listings_uri=str(inputs["listings"]), metrics_uri=str(inputs[metrics]), **kw)


def visible_releases(registry: Path) -> list[str]:
    return [r["version"] for r in list_releases(str(registry))]


def test_deploy_publishes_a_verified_release_and_sets_current(inputs, tmp_path):
    registry = tmp_path / "registry"
    result = deploy_release(config(inputs, registry))
    assert result.status == DEPLOYED
    version = result.version
    assert version.startswith("r-") and (registry / CURRENT).read_text().strip() == version
    assert current_version(str(registry)) == version

    release = load_release(str(registry))
    assert release.version == version and release.path == registry / "releases" / version
    assert (release.model_dir / "config.json").exists()
    assert release.pca_path == release.path / "pca" / "pca.npz"
    assert (release.index_dir / "manifest.json").exists()
    assert sorted(p.name for p in release.embeddings_dir.iterdir()) == ["embeddings-00000-of-00001.parquet"]
    assert json.loads(release.metrics_path.read_text())["candidate"]["ndcg@5"] == 0.5
    assert release.state_dir.is_dir() and release.status == "approved"

    items = pq.read_table(release.items_path)
    assert items.column_names == ["item_id", "title", "price", "category", "status"]
    assert items.num_rows == ITEMS  # the line that is not JSON was skipped
    assert items.schema.field("price").type == pa.int64()
    assert items.slice(1, 1).to_pylist() == [{"item_id": "item-001", "title": "thing 1", "price": 1010,
                                              "category": "cat/1", "status": "reserved"}]

    manifest = release.manifest
    assert manifest["version"] == version and manifest["gate"]["decision"] == "deploy"
    assert manifest["sources"]["index"] == str(inputs["index"])
    assert manifest["library_versions"]["scann"] and manifest["approval"]["status"] == "approved"
    files = manifest["files"]
    assert {"items.parquet", "metrics.json", "pca/pca.npz", "model/config.json", "index/manifest.json",
            "embeddings/embeddings-00000-of-00001.parquet"} <= set(files)
    assert not any(f in ("release.json", "audit.jsonl") or f.startswith("state/") for f in files)
    assert [e["action"] for e in map(json.loads, (release.path / "audit.jsonl").read_text().splitlines())] \
        == ["created", "deploy"]
    assert champion_embeddings_uri(str(registry)) == str(release.embeddings_dir)
    assert not [p for p in (registry / "releases").iterdir() if p.name.startswith(".")]


def test_same_inputs_twice_is_a_no_op(inputs, tmp_path):
    registry = tmp_path / "registry"
    first = deploy_release(config(inputs, registry))
    manifest = registry / "releases" / first.version / "release.json"
    before = manifest.read_bytes()
    second = deploy_release(config(inputs, registry))
    assert second.status == UNCHANGED and second.version == first.version
    assert manifest.read_bytes() == before
    assert len((registry / "history.jsonl").read_text().splitlines()) == 1
    # an explicit version already present is a no-op as well
    assert deploy_release(config(inputs, registry, "better", version=first.version)).status == UNCHANGED
    assert visible_releases(registry) == [first.version]


@pytest.mark.parametrize("metrics", ["rejected", "inconsistent"])
def test_deploy_refuses_a_rejected_candidate(inputs, tmp_path, metrics):
    registry = tmp_path / "registry"
    good = deploy_release(config(inputs, registry)).version
    result = deploy_release(config(inputs, registry, metrics))
    assert result.status == REFUSED and result.path is None
    assert "does not beat the baseline" in result.message
    assert visible_releases(registry) == [good] and current_version(str(registry)) == good
    # even an explicit approval path cannot be reached: nothing was published
    assert not [p for p in (registry / "releases").iterdir() if p.name != good]


def test_cli_deploy_refusal_exits_non_zero(inputs, tmp_path, capsys):
    args = ["deploy", "--registry", str(tmp_path / "reg"), "--model", str(inputs["model"]),
            "--embeddings", str(inputs["embeddings"]), "--index", str(inputs["index"]),
            "--listings", str(inputs["listings"])]
    assert main(args + ["--metrics", str(inputs["rejected"])]) == 3
    assert "refused: the evaluation gate rejected this candidate" in capsys.readouterr().out
    assert current_version(str(tmp_path / "reg")) is None


def test_require_approval_waits_as_pending_until_approved(inputs, tmp_path):
    registry = tmp_path / "registry"
    old = deploy_release(config(inputs, registry)).version
    result = deploy_release(config(inputs, registry, "better", require_approval=True))
    assert result.status == PENDING
    new = result.version
    assert current_version(str(registry)) == old
    assert {r["version"]: r["status"] for r in list_releases(str(registry))} == {old: "approved", new: PENDING}
    assert deploy_release(config(inputs, registry, "better", require_approval=True)).status == UNCHANGED

    with pytest.raises(UserError, match="--who"):
        approve_release(str(registry), new, who=" ", why="looks good")
    with pytest.raises(UserError, match="no release"):
        approve_release(str(registry), "r-nope", who="ana", why="x")
    approve_release(str(registry), new, who="ana@example.com", why="report reviewed, uplift +0.1 ndcg@5")
    assert current_version(str(registry)) == new
    release = load_release(str(registry))
    assert release.manifest["approval"]["by"] == "ana@example.com"
    audit = [json.loads(line) for line in (release.path / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "approve" and audit[-1]["who"] == "ana@example.com"
    assert audit[-1]["why"] == "report reviewed, uplift +0.1 ndcg@5" and audit[-1]["at"]
    with pytest.raises(UserError, match="already in production"):
        approve_release(str(registry), new, who="ana", why="again")


def test_a_pending_release_pushed_without_approval_is_promoted(inputs, tmp_path):
    registry = tmp_path / "registry"
    pending = deploy_release(config(inputs, registry, require_approval=True))
    assert current_version(str(registry)) is None
    with pytest.raises(UserError, match="no release in production"):
        load_release(str(registry))
    assert deploy_release(config(inputs, registry)).status == DEPLOYED
    assert current_version(str(registry)) == pending.version


def test_rollback_walks_back_through_production_history(inputs, tmp_path):
    registry = str(tmp_path / "registry")
    with pytest.raises(UserError, match="nothing to roll back"):
        rollback(registry)
    a = deploy_release(config(inputs, registry, "good")).version
    b = deploy_release(config(inputs, registry, "better")).version
    assert len({a, b}) == 2 and current_version(registry) == b
    assert rollback(registry, who="oncall", why="p99 regression") == a
    assert current_version(registry) == a and load_release(registry).version == a
    with pytest.raises(UserError, match="nothing to roll back"):
        rollback(registry)
    c = deploy_release(config(inputs, registry, "best")).version
    assert rollback(registry) == a
    audit_b = [json.loads(x) for x in Path(registry, "releases", b, "audit.jsonl").read_text().splitlines()]
    assert audit_b[-1] == {**audit_b[-1], "action": "rolled_back", "to": a, "who": "oncall"}
    assert [r["current"] for r in list_releases(registry)] == [True, False, False]
    assert [r["version"] for r in list_releases(registry)] == [a, b, c]


def test_catalog_snapshot_time_and_predecessors_for_the_serving_hand_over(inputs, tmp_path):
    """Serving carries writes made after a release's catalog snapshot from the release it replaced."""
    registry = str(tmp_path / "registry")
    a = deploy_release(config(inputs, registry, "good")).version
    first = load_release(registry)
    # Default: the listings file's modification time, i.e. when the export was written.
    assert first.catalog_snapshot_at == pytest.approx(os.path.getmtime(inputs["listings"]), abs=1e-3)
    assert predecessor(first) is None and predecessor(load_release(str(first.path))) is None
    b = deploy_release(config(inputs, registry, "better", catalog_snapshot_at="2026-11-20T03:00:00+09:00")).version
    second = load_release(registry)
    assert second.manifest["catalog_snapshot_at"] == "2026-11-20T03:00:00+09:00"
    assert second.catalog_snapshot_at == dt.datetime(2026, 11, 19, 18, tzinfo=dt.timezone.utc).timestamp()
    before = predecessor(second)
    assert (before.version, before.state_uri) == (a, str(first.path / "state"))
    assert before.manifest["files"] == first.manifest["files"]
    assert second.registry == registry and load_release(str(second.path)).registry is None
    # The release b replaced, if still serving (canary, 0% for a rollback), follows b's writes.
    assert successor(first).version == b and successor(second) is None
    rollback(registry)
    assert predecessor(load_release(registry)).version == b  # a rolled-back release hands its writes back
    assert successor(second).version == a and successor(first) is None
    for bad in ("yesterday", "2026-11-20T03:00:00"):
        with pytest.raises(UserError, match="catalog snapshot time"):
            deploy_release(config(inputs, registry, "best", catalog_snapshot_at=bad))


def test_rollback_survives_a_lost_history_entry(inputs, tmp_path):
    registry = tmp_path / "registry"
    a = deploy_release(config(inputs, registry, "good")).version
    b = deploy_release(config(inputs, registry, "better")).version
    history = (registry / "history.jsonl").read_text().splitlines()
    # a crash after CURRENT was switched but before the history line was appended
    (registry / "history.jsonl").write_text(history[0] + "\n")
    assert current_version(str(registry)) == b
    assert rollback(str(registry)) == a


_KILL_SCRIPT = """
import json, os, sys
import visrec.stages.release.deploy as deploy
import visrec.stages.release.promote as promote
cfg = deploy.DeployConfig(**json.loads(sys.argv[1]))
if sys.argv[2] == "rename":
    deploy.os.rename = lambda *a: os._exit(9)     # killed just before the release is renamed in
else:
    promote.switch_current = lambda *a, **k: os._exit(9)  # killed after publishing, before CURRENT moves
deploy.deploy_release(cfg)
"""


@pytest.mark.parametrize("kill_at", ["rename", "pointer"])
def test_a_killed_deploy_leaves_the_previous_release_current(inputs, tmp_path, kill_at):
    registry = tmp_path / "registry"
    old = deploy_release(config(inputs, registry)).version
    cfg = {k: v for k, v in vars(config(inputs, registry, "better")).items() if isinstance(v, (str, bool, int))}
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(cfg), kill_at],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr

    assert current_version(str(registry)) == old
    assert load_release(str(registry)).version == old
    leftovers = [p.name for p in (registry / "releases").iterdir() if p.name.startswith(".")]
    if kill_at == "rename":
        assert visible_releases(registry) == [old]
        assert len(leftovers) == 1  # the dead process's staging dir: hidden, never loaded
    else:
        assert [r["current"] for r in list_releases(str(registry))] == [True, False]
    # pushing again completes the interrupted deployment
    again = deploy_release(config(inputs, registry, "better"))
    assert again.status == DEPLOYED and current_version(str(registry)) == again.version != old


def test_failed_rename_leaves_nothing_behind(inputs, tmp_path, monkeypatch):
    import visrec.stages.release.deploy as deploy

    registry = tmp_path / "registry"
    old = deploy_release(config(inputs, registry)).version

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(deploy.os, "rename", disk_full)
    with pytest.raises(OSError):
        deploy_release(config(inputs, registry, "better"))
    assert sorted(p.name for p in (registry / "releases").iterdir()) == [old]
    assert current_version(str(registry)) == old


def test_corrupt_release_is_refused(inputs, tmp_path):
    registry = tmp_path / "registry"
    a = deploy_release(config(inputs, registry, "good")).version
    b = deploy_release(config(inputs, registry, "better")).version
    items = registry / "releases" / a / "items.parquet"
    items.write_bytes(items.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ReleaseInvalid, match=f"release {a} is corrupt: items.parquet"):
        load_release(str(registry / "releases" / a))
    with pytest.raises(ReleaseInvalid, match="corrupt"):
        rollback(str(registry))
    assert current_version(str(registry)) == b
    (registry / "releases" / b / "pca" / "pca.npz").unlink()
    with pytest.raises(ReleaseInvalid, match="incomplete: pca/pca.npz is missing"):
        load_release(str(registry))
    # the journal under state/ is mutable and never checked
    (registry / "releases" / b / "pca" / "pca.npz").write_bytes(
        (inputs["embeddings"] / "pca" / "pca.npz").read_bytes())
    (registry / "releases" / b / "state" / "journal.jsonl").write_text('{"op": "upsert"}\n')
    assert load_release(str(registry)).version == b


def test_a_release_that_does_not_work_is_never_published(inputs, tmp_path):
    from visrec.stages.index.config import IndexConfig
    from visrec.stages.index.searcher import SimilarityIndex

    # an index over other items than the listings describe: the smoke query's results lack metadata
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(10, PCA_DIMS)).astype(np.float32)
    SimilarityIndex.build([f"ghost-{i}" for i in range(10)], vectors,
                          IndexConfig(tuning_queries=5, max_p99_ms=None)).save(str(tmp_path / "ghost-index"))
    registry = tmp_path / "registry"
    with pytest.raises(ReleaseInvalid, match="without metadata"):
        deploy_release(DeployConfig(**{**vars(config(inputs, registry)), "index_dir": str(tmp_path / "ghost-index")}))
    # an index of other dimensions than the PCA outputs
    SimilarityIndex.build([f"item-{i:03d}" for i in range(10)], rng.normal(size=(10, 4)).astype(np.float32),
                          IndexConfig(tuning_queries=5, max_p99_ms=None)).save(str(tmp_path / "small-index"))
    with pytest.raises(ReleaseInvalid, match="PCA outputs 8 dims, index holds 4"):
        deploy_release(DeployConfig(**{**vars(config(inputs, registry)), "index_dir": str(tmp_path / "small-index")}))
    assert list_releases(str(registry)) == [] and current_version(str(registry)) is None
    assert [p for p in (registry / "releases").iterdir()] == []


def test_cli_releases_approve_rollback(inputs, tmp_path, capsys):
    registry = str(tmp_path / "registry")
    common = ["--registry", registry, "--model", str(inputs["model"]), "--embeddings", str(inputs["embeddings"]),
              "--index", str(inputs["index"]), "--listings", str(inputs["listings"])]
    assert main(["deploy", *common, "--metrics", str(inputs["good"])]) == 0
    a = current_version(registry)
    assert main(["deploy", *common, "--metrics", str(inputs["better"]), "--require-approval",
                 "--catalog-snapshot-at", "2026-11-20T03:00:00+09:00"]) == 0
    out = capsys.readouterr().out
    b = [r["version"] for r in list_releases(registry) if r["version"] != a][0]
    assert f"waiting for `visrec approve {b}`" in out
    assert main(["releases", "--registry", registry]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["version", "created", "catalog", "snapshot", "status", "ndcg@5", "approved", "by"]
    assert table[1].split()[0] == "*" and table[1].split()[1] == a and "0.5000" in table[1]
    assert table[2].split()[:1] == [b] and "pending" in table[2] and "0.6000" in table[2]
    assert "2026-11-20T03:00:00+09:00" in table[2]
    assert main(["approve", b, "--registry", registry, "--who", "ana", "--why", "reviewed"]) == 0
    assert current_version(registry) == b
    assert main(["rollback", "--registry", registry]) == 0
    assert f"rolled back: {b} -> {a}" in capsys.readouterr().out
    assert main(["approve", "r-missing", "--registry", registry, "--who", "a", "--why", "b"]) == 2


def test_gcs_registry(inputs, gcs_emulator, tmp_path):
    bucket = gcs_emulator()
    registry = f"gs://{bucket}/registry"
    result = deploy_release(config(inputs, registry))
    assert result.status == DEPLOYED and result.path == f"{registry}/releases/{result.version}"
    assert current_version(registry) == result.version
    assert champion_embeddings_uri(registry) == f"{registry}/releases/{result.version}/embeddings"
    release = load_release(registry, cache_dir=str(tmp_path / "cache"))
    assert release.version == result.version and release.path == tmp_path / "cache" / result.version
    assert pq.read_table(release.items_path).num_rows == ITEMS
    assert deploy_release(config(inputs, registry)).status == UNCHANGED
    assert [r["version"] for r in list_releases(registry)] == [result.version]
    assert os.path.isdir(release.state_dir)
    # A cached copy that is torn where the service defers its check is downloaded again, not
    # served from the release before it.
    from visrec.online.config import ServingConfig
    from visrec.online.loading import load_state

    vectors = release.index_dir / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-8] + b"garbage!")
    state = load_state(registry, ServingConfig(cache_dir=str(tmp_path / "cache")))
    assert state.release.version == result.version and len(state.index) == ITEMS
    state.close()
    load_release(registry, cache_dir=str(tmp_path / "cache"))  # the copy verifies whole again


def test_component_never_deploys_a_rejected_candidate(inputs, tmp_path):
    from types import SimpleNamespace

    from components.deploy import deploy

    registry = str(tmp_path / "registry")
    evaluations = {}
    for name in ("good", "rejected"):
        evaluations[name] = tmp_path / f"eval-{name}"
        evaluations[name].mkdir()
        (evaluations[name] / "metrics.json").write_bytes(inputs[name].read_bytes())

    def artifact(path):
        return SimpleNamespace(path=str(path), uri=str(path), metadata={})

    def call(decision, evaluation):
        release = artifact(tmp_path / f"release-{decision}-{evaluation}.json")
        status = deploy.python_func(
            decision=decision, model=artifact(inputs["model"].parent), embeddings=artifact(inputs["embeddings"]),
            index=artifact(inputs["index"]), evaluation=artifact(evaluations[evaluation]),
            listings=artifact(inputs["listings"]), registry=registry, require_approval=False, target="local",
            project="", region="", serving_image="", model_id="m", endpoint_id="e", machine_type="n1-standard-4",
            min_replicas=1, max_replicas=1, canary_percent=10, serving_service_account="", serving_admin_token_uri="", release=release,
            vertex_model=artifact(tmp_path / "vertex-model"))
        return status, release

    # the branch said reject, or the branch was bypassed but metrics.json says reject
    for decision, evaluation in (("reject", "good"), ("deploy", "rejected")):
        status, release = call(decision, evaluation)
        assert status == REFUSED and json.loads(Path(release.path).read_text())["status"] == REFUSED
        assert current_version(registry) is None
    status, release = call("deploy", "good")
    assert status == DEPLOYED and release.metadata["version"] == current_version(registry)
    assert load_release(registry).model_dir.joinpath("config.json").exists()


def test_serving_a_release_checksums_each_index_file_once(inputs, tmp_path, monkeypatch):
    """The release's manifest covers its index: loading it for serving hashes those files once, not twice."""
    from visrec.core import checksums
    from visrec.online.config import ServingConfig
    from visrec.online.loading import load_state

    registry = tmp_path / "registry"
    version = deploy_release(config(inputs, registry)).version
    hashed: list[str] = []
    real = checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path: hashed.append(str(path)) or real(path))
    state = load_state(str(registry), ServingConfig())
    index_files = [p for p in hashed if "/index/" in p]
    assert index_files and len(index_files) == len(set(index_files)), sorted(index_files)
    state.close()
    # the release's check still refuses a corrupt index file
    vectors = registry / "releases" / version / "index" / "vectors.npy"
    vectors.write_bytes(vectors.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ReleaseInvalid, match="corrupt: index/vectors.npy"):
        load_release(str(registry))


def test_the_encoder_kind_comes_from_the_checkpoint(inputs, tmp_path):
    """Unset, the release records the checkpoint's own kind; a contradicting kind is refused before any write."""
    registry = tmp_path / "registry"
    with pytest.raises(UserError, match="mobilenet_v2"):
        deploy_release(config(inputs, registry, encoder_kind="mobilenet_v2"))
    assert not (registry / CURRENT).exists()
    deploy_release(config(inputs, registry))
    assert load_release(str(registry)).manifest["encoder_kind"] == "siglip"
