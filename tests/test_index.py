"""Stage 4: the ScaNN index — recall vs exact search, persistence, mutations, the gate."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from visrec.core import io
from visrec.cli import main
from visrec.core.errors import GateFailed, UserError
from visrec.data.embeddings import read_embeddings
from visrec.stages.index.build import METRICS, build_index
from visrec.stages.index.config import IndexConfig
from visrec.stages.index.searcher import MANIFEST, SearchParams, SimilarityIndex
from visrec.stages.index.tuning import exact_top_k, tune_search_params

DIMS = 32
# How far ScaNN's re-ordering scores may be from the true cosines, per re-order precision.
SCORE_ATOL = {"float32": 1e-5, "bfloat16": 4e-3, "int8": 2e-2}


def clustered(n: int, seed: int = 0, dims: int = DIMS) -> np.ndarray:
    """Gaussian clusters whose noise matches their spread, so neighbours cross cluster borders."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(10, n // 100), dims)).astype(np.float32)
    return centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, dims)).astype(np.float32)


def item_ids(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def write_embeddings(directory: Path, ids: list[str], vectors: np.ndarray, shards: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for s, rows in enumerate(np.array_split(np.arange(len(ids)), shards)):
        table = pa.table({"item_id": pa.array([ids[r] for r in rows], pa.string()),
                          "embedding": pa.array(list(vectors[rows]), pa.list_(pa.float32()))})
        pq.write_table(table, directory / f"embeddings-{s:05d}-of-{shards:05d}.parquet")
    return directory


@pytest.fixture(scope="module")
def tuned() -> tuple[SimilarityIndex, np.ndarray, IndexConfig]:
    """A 5000-item tree-AH index tuned to recall@10 >= 0.95 (the dataset used across tests), with
    bfloat16 re-ordering: one copy of the vectors, as a large catalogue is served."""
    vectors = clustered(5000)
    config = IndexConfig(tuning_queries=400, max_p99_ms=None, reorder_dtype="bfloat16")
    index = SimilarityIndex.build(item_ids(len(vectors)), vectors, config)
    result = tune_search_params(index, config)
    index.set_search_params(result.params)
    index.info.update(recall_at_k=result.recall_at_k, tuning=result.report())
    return index, vectors, config


def recall_vs_exact(index: SimilarityIndex, query_rows: np.ndarray, k: int = 10) -> float:
    """Recall@k of the index for indexed items as queries, the item itself excluded."""
    data = index.vectors()
    ids = index.ids()
    exact, _ = exact_top_k(data, data[query_rows], k, exclude_rows=query_rows)
    found, _ = index.search(data[query_rows], k + 1)
    hits = 0
    for row, truth, got in zip(query_rows, exact, found):
        got = [i for i in got if i != ids[row]][:k]
        hits += len({ids[t] for t in truth} & set(got))
    return hits / (k * len(query_rows))


def test_tuned_index_meets_recall_target_on_fresh_queries(tuned):
    index, _, config = tuned
    assert index.params["algorithm"] == "tree_ah"
    report = index.info["tuning"]
    assert report["met"] and report["recall_at_k"] >= config.recall_target, report
    # Tuning actually searched a frontier and chose less than an exhaustive scan.
    assert report["frontier"] and index.search_params.leaves_to_search < index.params["num_leaves"]
    # Measured independently on queries the tuner never saw (different seed), with its own exact search.
    rows = np.random.default_rng(123).choice(len(index), 500, replace=False)
    assert recall_vs_exact(index, rows) >= config.recall_target - 0.01
    # Re-checked through scores: ScaNN's bfloat16 re-ordering scores are the true cosines up
    # to bfloat16 rounding (2**-8 of each component's product at most).
    ids, scores = index.search(index.vectors()[:5], 10)
    for q, (row_ids, row_scores) in enumerate(zip(ids, scores)):
        true = np.stack([index.vector(i) for i in row_ids]) @ index.vectors()[q]
        np.testing.assert_allclose(row_scores, true, atol=SCORE_ATOL["bfloat16"])
        assert list(row_scores) == sorted(row_scores, reverse=True)


def test_save_load_gives_identical_results(tuned, tmp_path):
    index, vectors, _ = tuned
    manifest = index.save(str(tmp_path / "index"))
    assert set(manifest["sha256"]) >= {"ids.npy", "vectors.npy", "scann/scann_assets.pbtxt"}
    assert manifest["format"] == "visrec-index/2" and "ids.json" not in manifest["sha256"]
    # One copy of the vectors: ScaNN keeps its bfloat16 re-ordering data, not a float32 dataset.
    assert "scann/dataset.npy" not in manifest["sha256"] and "scann/bfloat16_dataset.npy" in manifest["sha256"]
    assert manifest["num_items"] == 5000 and manifest["dims"] == DIMS and manifest["k"] == 10
    assert not (tmp_path / "index" / "scann" / "scann_docids.pkl").exists()
    loaded = SimilarityIndex.load(str(tmp_path / "index"))
    queries = clustered(200, seed=9)
    a_ids, a_scores = index.search(queries, 10)
    b_ids, b_scores = loaded.search(queries, 10)
    assert a_ids == b_ids
    np.testing.assert_array_equal(a_scores, b_scores)
    assert loaded.search_params == index.search_params
    assert len(loaded) == 5000 and "item-17" in loaded and "nope" not in loaded
    np.testing.assert_array_equal(loaded.vector("item-17"), index.vector("item-17"))
    assert loaded.vector("nope") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_reorder_dtypes_build_and_round_trip(dtype, tmp_path):
    vectors = clustered(3000, seed=2)
    config = IndexConfig(reorder_dtype=dtype, tuning_queries=200, recall_target=0.9)
    index = SimilarityIndex.build(item_ids(3000), vectors, config)
    result = tune_search_params(index, config)
    assert result.met, result.report()
    index.set_search_params(result.params)
    index.save(str(tmp_path / dtype))
    loaded = SimilarityIndex.load(str(tmp_path / dtype))
    assert loaded.search(vectors[:20], 10)[0] == index.search(vectors[:20], 10)[0]
    # The float32 vectors stay available for look-ups whatever the re-order precision.
    expected = vectors[3] / np.linalg.norm(vectors[3])
    np.testing.assert_allclose(loaded.vector("item-3"), expected, atol=1e-6)
    ids, scores = loaded.search(vectors[:5], 10)
    for q, (row_ids, row_scores) in enumerate(zip(ids, scores)):
        true = np.stack([loaded.vector(i) for i in row_ids]) @ (vectors[q] / np.linalg.norm(vectors[q]))
        np.testing.assert_allclose(row_scores, true, atol=SCORE_ATOL[dtype])


def test_upsert_and_delete_survive_save_and_load(tmp_path):
    vectors = clustered(3000, seed=3)
    config = IndexConfig()
    index = SimilarityIndex.build(item_ids(3000), vectors, config)
    new = clustered(5, seed=4)
    index.upsert(item_ids(5, "new"), new)
    replaced = -vectors[7]
    index.upsert(["item-7"], replaced[None, :])
    gone = ["item-0", "item-1", "item-2999", "new-4"]
    index.delete(gone)
    assert len(index) == 3000 + 5 - 4
    full = SearchParams(int(index.params["num_leaves"]), 500)

    def check(idx: SimilarityIndex) -> None:
        found, _ = idx.search(new[:4], 1, full)
        assert [f[0] for f in found] == item_ids(4, "new")
        assert idx.search(replaced[None, :], 1, full)[0][0] == ["item-7"]
        for item_id in gone:
            assert item_id not in idx and idx.vector(item_id) is None
        everything, scores = idx.search(np.concatenate([vectors[:3], vectors[-1:], new[4:]]), len(idx), full)
        returned = {i for row in everything for i in row}
        assert not returned & set(gone)
        # Every returned score is the cosine with the vector stored for that id: the id map
        # and the vector rows stayed aligned through ScaNN's swap-with-last deletes.
        q = idx.vectors()[0]
        ids0, scores0 = idx.search(q, 50, full)
        np.testing.assert_allclose(scores0[0], np.stack([idx.vector(i) for i in ids0[0]]) @ q,
                                   atol=SCORE_ATOL[config.reorder_dtype])

    check(index)
    index.save(str(tmp_path / "mutated"))
    loaded = SimilarityIndex.load(str(tmp_path / "mutated"))
    check(loaded)
    assert np.load(tmp_path / "mutated" / "ids.npy").astype(str).tolist() == list(loaded.ids())
    with pytest.raises(KeyError):
        loaded.delete(["item-0"])


def test_labels_follow_their_items_through_upserts_and_deletes():
    vectors = clustered(3000, seed=5)
    ids = item_ids(3000)
    index = SimilarityIndex.build(ids, vectors, IndexConfig())
    label = {item_id: 10_000 + n for n, item_id in enumerate(ids)}  # e.g. a metadata table's rows
    index.set_labels(ids, [label[i] for i in ids])
    new = clustered(3, seed=6)
    index.upsert(item_ids(3, "new"), new)
    index.set_labels(["new-0", "new-1"], [1, 2])  # new-2 stays unlabelled
    index.upsert(["item-5"], -vectors[5][None, :])  # a replaced vector keeps its label
    index.delete(["item-0", "item-100", "new-1"])  # holes filled by the last items
    label.update({"new-0": 1, "new-2": -1})
    full = SearchParams(int(index.params["num_leaves"]), 500)
    for query in (vectors[3], vectors[2999], new[0], new[2], -vectors[5]):
        ids_found, scores = index.search(query, 100, full)
        index.set_search_params(full)
        labels, label_scores = index.search_labels(query, 100)
        assert labels.tolist() == [label[i] for i in ids_found[0]]
        np.testing.assert_array_equal(label_scores, scores[0])
    with pytest.raises(KeyError):
        index.set_labels(["item-0"], [7])
    with pytest.raises(ValueError):
        index.search_labels(vectors[:2], 5)


def test_corrupt_partial_or_missing_files_are_refused(tuned, tmp_path):
    index, _, _ = tuned
    target = tmp_path / "index"
    index.save(str(target))
    data = target / "scann" / "bfloat16_dataset.npy"
    original = data.read_bytes()
    data.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(UserError, match="scann/bfloat16_dataset.npy is corrupt"):
        SimilarityIndex.load(str(target))
    data.write_bytes(original)
    (target / "ids.npy").unlink()
    with pytest.raises(UserError, match="ids.npy is missing"):
        SimilarityIndex.load(str(target))
    (target / MANIFEST).unlink()
    with pytest.raises(UserError, match="no manifest.json"):
        SimilarityIndex.load(str(target))
    with pytest.raises(UserError, match="directory not found"):
        SimilarityIndex.load(str(tmp_path / "nothing"))


@pytest.mark.parametrize("n", [1, 2, 50])
def test_tiny_indexes_work_end_to_end(n, tmp_path):
    vectors = clustered(n, seed=5)
    emb = write_embeddings(tmp_path / "emb", item_ids(n), vectors, shards=1)
    result = build_index(str(emb), str(tmp_path / "index"), IndexConfig())
    assert result.passed and result.params["algorithm"] == "brute_force"
    assert result.recall_at_k == 1.0
    index = SimilarityIndex.load(str(tmp_path / "index"))
    ids, scores = index.search(vectors[:1], 10)
    assert len(ids[0]) == min(n, 10) and ids[0][0] == "item-0"
    assert np.isnan(scores[0, len(ids[0]):]).all()
    index.upsert(["extra"], vectors[:1] + 0.01)
    index.delete(item_ids(n))
    assert index.search(vectors[:1], 10)[0] == [["extra"]]
    index.delete(["extra"])
    assert len(index) == 0 and index.search(vectors[:1], 3)[0] == [[]]


def test_build_index_gate_failures_write_failed_metrics(tmp_path):
    vectors = clustered(3000, seed=6)
    emb = write_embeddings(tmp_path / "emb", item_ids(3000), vectors)
    out = tmp_path / "slow"
    with pytest.raises(GateFailed, match="p99 latency"):
        build_index(str(emb), str(out), IndexConfig(max_p99_ms=1e-6, tuning_queries=100))
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["passed"] is False and not (out / MANIFEST).exists()
    out = tmp_path / "impossible"
    # int8 re-ordering cannot rank every exact top-10 perfectly, whatever the setting.
    with pytest.raises(GateFailed, match="recall@10"):
        build_index(str(emb), str(out), IndexConfig(recall_target=1.0, reorder_dtype="int8",
                                                    tuning_queries=100, max_p99_ms=None))
    metrics = json.loads((out / METRICS).read_text())
    assert metrics["passed"] is False and metrics["tuning"]["frontier"]
    with pytest.raises(UserError):
        SimilarityIndex.load(str(out))


def test_cli_build_index_exit_codes(tmp_path, capsys):
    vectors = clustered(2500, seed=8)
    emb = write_embeddings(tmp_path / "emb", item_ids(2500), vectors, shards=3)
    ids, read = read_embeddings(str(emb))
    assert ids == item_ids(2500) and np.array_equal(read, vectors)
    assert main(["build-index", "--embeddings", str(emb), "--out", str(tmp_path / "index"),
                 "--tuning-queries", "200"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_items"] == 2500 and summary["recall_at_k"] >= 0.95
    manifest = json.loads((tmp_path / "index" / MANIFEST).read_text())
    assert {"recall_at_k", "p50_ms", "p99_ms", "qps_batched", "build_seconds", "library_versions",
            "params"} <= set(manifest) and METRICS in manifest["sha256"]
    assert main(["build-index", "--embeddings", str(emb), "--out", str(tmp_path / "gated"),
                 "--max-p99-ms", "0.000001", "--tuning-queries", "50"]) == 3
    pq.write_table(pa.table({"item_id": ["a"]}), tmp_path / "embeddings-bad.parquet")
    assert main(["build-index", "--embeddings", str(tmp_path / "embeddings-bad.parquet"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "embedding" in capsys.readouterr().err


def test_component_writes_index_and_metrics(tmp_path):
    from components.build_index import build_index as component

    vectors = clustered(2100, seed=10)
    emb = write_embeddings(tmp_path / "emb", item_ids(2100), vectors)
    logged: dict[str, float] = {}
    index_artifact = SimpleNamespace(path=str(tmp_path / "index"), uri="", metadata={})
    metrics_artifact = SimpleNamespace(log_metric=logged.__setitem__)
    component.python_func(embeddings=SimpleNamespace(path=str(emb), uri=""), index=index_artifact,
                          metrics=metrics_artifact, recall_target=0.95, k=10, max_p99_ms=0.0, seed=0)
    assert logged["passed"] == 1.0 and logged["recall_at_k"] >= 0.95
    assert index_artifact.metadata["num_items"] == 2100
    assert len(SimilarityIndex.load(index_artifact.path)) == 2100


def test_concurrent_searches_during_writes(tuned):
    index, vectors, _ = tuned
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        try:
            while not stop.is_set():
                ids, _ = index.search(vectors[:8], 10)
                assert all(len(row) == 10 for row in ids)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    extra = clustered(40, seed=11)
    for round_ in range(20):
        batch = [f"tmp-{round_}-{i}" for i in range(40)]
        index.upsert(batch, extra)
        index.delete(batch)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(index) == 5000


def test_gcs_save_and_load(tuned, gcs_emulator):
    index, _, _ = tuned
    bucket = gcs_emulator()
    uri = f"gs://{bucket}/releases/v1/index"
    index.save(uri)
    assert io.exists(io.join(uri, MANIFEST))
    loaded = SimilarityIndex.load(uri)
    queries = clustered(20, seed=12)
    assert loaded.search(queries, 10)[0] == index.search(queries, 10)[0]
    io.write_bytes(io.join(uri, "ids.npy"), b"[]")
    with pytest.raises(UserError, match="ids.npy is corrupt"):
        SimilarityIndex.load(uri)
    with pytest.raises(UserError, match="no manifest.json"):
        SimilarityIndex.load(f"gs://{bucket}/elsewhere")


def test_format_1_directories_still_load_and_resave_as_format_2(tuned, tmp_path):
    """An index written before ids.npy (ids.json, format visrec-index/1) loads unchanged."""
    from visrec.core.checksums import checksum_files

    index, _, _ = tuned
    target = tmp_path / "old"
    index.save(str(target))
    ids = np.load(target / "ids.npy").astype(str).tolist()
    (target / "ids.npy").unlink()
    (target / "ids.json").write_text(json.dumps(ids))
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["format"] = "visrec-index/1"
    manifest["sha256"] = checksum_files(target, skip=lambda name: name == MANIFEST)
    (target / MANIFEST).write_text(json.dumps(manifest))
    old = SimilarityIndex.load(str(target))
    queries = clustered(30, seed=13)
    assert old.search(queries, 10)[0] == index.search(queries, 10)[0]
    np.testing.assert_array_equal(old.vector("item-9"), index.vector("item-9"))
    old.save(str(target))  # over itself, while it reads the directory's vectors.npy
    assert not (target / "ids.json").exists()
    assert json.loads((target / MANIFEST).read_text())["format"] == "visrec-index/2"
    assert SimilarityIndex.load(str(target)).search(queries, 10)[0] == index.search(queries, 10)[0]
    np.testing.assert_array_equal(old.vector("item-9"), index.vector("item-9"))
    manifest = json.loads((target / MANIFEST).read_text())
    (target / MANIFEST).write_text(json.dumps({**manifest, "format": "visrec-index/9"}))
    with pytest.raises(UserError, match="format 'visrec-index/9' is not one this visrec reads"):
        SimilarityIndex.load(str(target))


def test_loaded_index_reads_vectors_from_disk_and_keeps_writes_in_memory(tuned, tmp_path):
    index, vectors, _ = tuned
    index.save(str(tmp_path / "index"))
    loaded = SimilarityIndex.load(str(tmp_path / "index"))
    held = loaded.memory_bytes()
    assert held["vectors_in_memory"] == 0 and held["vectors_on_disk"] == 5000 * DIMS * 4
    assert held["ids"] == 5000 * len("item-4999")  # fixed-width bytes, no Python object per id
    replaced = np.ones(DIMS, dtype=np.float32) / np.sqrt(DIMS)
    loaded.upsert(["item-1", "brand-new"], np.stack([replaced, -replaced]))
    loaded.save(str(tmp_path / "index"))  # rewrites the vectors.npy it is reading from
    np.testing.assert_array_equal(loaded.vector("item-2"), index.vector("item-2"))
    np.testing.assert_allclose(loaded.vector("item-1"), replaced, atol=1e-6)
    assert 0 < loaded.memory_bytes()["vectors_in_memory"] < 5000 * DIMS * 4
    again = SimilarityIndex.load(str(tmp_path / "index"))
    np.testing.assert_allclose(again.vector("brand-new"), -replaced, atol=1e-6)
    np.testing.assert_array_equal(again.vectors(), loaded.vectors())


def test_writes_match_a_reference_model_through_save_and_load(tmp_path):
    """Random upserts, deletes and re-adds on an exact index keep ids, vectors and labels aligned."""
    rng = np.random.default_rng(21)
    vectors = clustered(300, seed=21)
    index = SimilarityIndex.build(item_ids(300), vectors, IndexConfig())
    expected = {i: v / np.linalg.norm(v) for i, v in zip(item_ids(300), vectors)}
    labels = {i: n for n, i in enumerate(item_ids(300))}
    index.set_labels(list(labels), list(labels.values()))
    names = item_ids(300) + item_ids(60, "new")
    for step in range(40):
        if step == 20:
            index.save(str(tmp_path / "mid"))
            index = SimilarityIndex.load(str(tmp_path / "mid"))
            index.set_labels(list(labels), list(labels.values()))
        chosen = list(dict.fromkeys(rng.choice(names, 8).tolist()))
        if rng.random() < 0.5:
            gone = [i for i in chosen if i in expected]
            index.delete(gone)
            for i in gone:
                del expected[i], labels[i]
        else:
            new = rng.standard_normal((len(chosen), DIMS)).astype(np.float32)
            index.upsert(chosen, new)
            for i, v in zip(chosen, new):
                expected[i] = v / np.linalg.norm(v)
                labels.setdefault(i, -1)
            index.set_labels(chosen[:2], [1000 + step, 2000 + step])
            labels.update({chosen[0]: 1000 + step, chosen[1]: 2000 + step} if len(chosen) > 1 else
                          {chosen[0]: 1000 + step})
    assert sorted(index.ids()) == sorted(expected) and len(index) == len(expected)
    for item_id, v in expected.items():
        np.testing.assert_allclose(index.vector(item_id), v, atol=1e-6)
        found_labels, _ = index.search_labels(v, 1)
        assert index.search(v, 1)[0][0] == [item_id] and found_labels.tolist() == [labels[item_id]]
    assert all(i not in index for i in set(names) - set(expected))


def test_id_map_keys_lookups_and_additions():
    from visrec.stages.index.idmap import IdMap, encode_ids

    ids = ["b", "ä-long-id", "a", "c\u00e9", ""]
    idmap, order = IdMap.from_ids(ids)
    assert [ids[r] for r in order] == sorted(ids, key=str.encode)  # keys in UTF-8 byte order
    assert [idmap.key(i) for i in ids] == np.argsort(order).tolist()
    assert idmap.key("zz-longer-than-any-id") == -1 and idmap.key("a\x00") == -1 and idmap.key("d") == -1
    assert idmap.decode(idmap.keys(ids)) == ids
    assert idmap.keys(np.array([b"a", b"nope-but-much-longer", b"b"])).tolist() == [idmap.key("a"), -1, idmap.key("b")]
    assert idmap.add("a") == idmap.key("a") and len(idmap) == 5
    assert idmap.add("new\x00id") == 5 and idmap.add("z") == 6 and idmap.key("new\x00id") == 5
    assert idmap.keys(["z", "a", "new\x00id", "q"]).tolist() == [6, idmap.key("a"), 5, -1]
    assert idmap.decode(np.array([6, idmap.key("b")])) == ["z", "b"]
    sequence = idmap.sequence(np.array([6, 0, 1]))
    assert list(sequence) == ["z", "", "a"] and sequence[0] == "z" and sequence[1:] == ["", "a"]
    assert idmap.keys(sequence).tolist() == [6, 0, 1]  # its own sequence: no look-up
    other, _ = IdMap.from_ids(["z", "a"])
    assert other.keys(sequence).tolist() == [other.key("z"), -1, other.key("a")]
    assert idmap.encode(np.array([6, 1])).tolist() == [b"z", b"a"]
    with pytest.raises(ValueError, match="NUL"):
        idmap.encode(np.array([5]))
    with pytest.raises(ValueError, match="duplicate item id 'x'"):
        IdMap.from_ids(["x", "y", "x"])
    with pytest.raises(ValueError, match="NUL"):
        encode_ids(["ok", "bad\x00"])
    with pytest.raises(UserError, match="duplicate item id 'a'"):  # before ScaNN spends time building
        SimilarityIndex.build(["a", "b", "a"], clustered(3))
    empty, _ = IdMap.from_ids([])
    assert empty.key("a") == -1 and empty.keys(["a"]).tolist() == [-1] and empty.add("a") == 0


def test_arrow_ids_become_fixed_width_bytes_without_python_strings():
    from visrec.stages.index.idmap import encode_arrow_ids

    column = pa.chunked_array([["id-1", "id-22", "é"], ["x"]])
    assert encode_arrow_ids(column).tolist() == [b"id-1", b"id-22", "é".encode(), b"x"]
    sliced = pa.array(["skip", "abc", "de", "fgh"]).slice(1, 2)  # a non-zero array offset
    assert encode_arrow_ids(sliced).tolist() == [b"abc", b"de"]
    same_length = encode_arrow_ids(pa.array(["i001", "i002"]))
    assert same_length.dtype == np.dtype("S4") and same_length.tolist() == [b"i001", b"i002"]
    with pytest.raises(ValueError, match="null"):
        encode_arrow_ids(pa.array(["a", None]))
    with pytest.raises(ValueError, match="NUL"):
        encode_arrow_ids(pa.array(["a", "b\x00"]))


def test_partition_training_sample_grows_with_the_leaves():
    from visrec.stages.index.searcher import default_num_leaves, training_sample

    config = IndexConfig()
    assert training_sample(config, 100_000, default_num_leaves(100_000)) == 100_000  # all of a small index
    assert training_sample(config, 1_000_000, 1000) == 250_000
    # 3,162 leaves at 10M items: 250 points each, not 79 (which needed 111 leaves searched).
    assert training_sample(config, 10_000_000, default_num_leaves(10_000_000)) == 790_500
    with pytest.raises(ValueError, match="training_points_per_leaf"):
        IndexConfig(training_points_per_leaf=0)
