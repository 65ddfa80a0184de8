"""Ranking as pure functions: price band, category similarity, re-rank, the full recommend flow."""

from __future__ import annotations

import numpy as np
import pytest

from visrec.stages.index.searcher import SimilarityIndex
from visrec.online.ranking import (CodedColumn, ItemCatalog, RankingConfig, category_path, category_similarity,
                            label_index_with_catalog, price_band_filter, recommend, rerank)


class CountingIndex(SimilarityIndex):
    """The real index (exact search at this size), recording the fetch size of each search."""

    fetches: list[int]

    def search_labels(self, query, k):
        self.__dict__.setdefault("fetches", []).append(k)
        return super().search_labels(query, k)


def test_category_path_and_similarity():
    assert category_path(" Fashion / Women > Bags ") == ("fashion", "women", "bags")
    assert category_similarity("fashion/women/bags", "fashion/women/bags") == 1.0
    assert category_similarity("fashion/women/bags", "fashion/women/shoes") == pytest.approx(2 / 3)
    assert category_similarity("fashion/women/bags", "fashion") == pytest.approx(1 / 3)
    assert category_similarity("fashion/women", "home/kitchen") == 0.0
    assert category_similarity("", "") == 0.0


def test_price_band_filter():
    prices = np.array([4.9, 5, 10, 20, 20.1])
    assert price_band_filter(10, prices).tolist() == [False, True, True, True, False]
    assert price_band_filter(10, prices, 0.9, 1.1).tolist() == [False, False, True, False, False]
    assert price_band_filter(0, prices).all()  # no reference price: no band


def test_rerank_blends_and_is_stable():
    ann = np.array([0.9, 0.85, 0.8])
    sims = np.array([0.0, 1.0, 0.0])
    order, blended = rerank(ann, sims, 0.0)
    assert order.tolist() == [0, 1, 2] and np.allclose(blended, ann)
    order, blended = rerank(ann, sims, 0.3)
    assert order.tolist() == [1, 0, 2]
    assert blended[1] == pytest.approx(0.7 * 0.85 + 0.3)
    order, _ = rerank(np.array([0.5, 0.5]), np.array([0.0, 0.0]), 0.3)
    assert order.tolist() == [0, 1]


def test_config_validates():
    with pytest.raises(ValueError):
        RankingConfig(price_low=2.0)
    with pytest.raises(ValueError):
        RankingConfig(category_weight=1.5)


def _catalog_and_index():
    # q is the query; a..e in decreasing visual similarity to q.
    ids = ["q", "a", "b", "c", "d", "e"]
    vectors = np.array([[1, 0], [0.99, 0.1], [0.95, 0.3], [0.9, 0.43], [0.8, 0.6], [0.0, 1.0]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    catalog = ItemCatalog.from_columns(
        ids,
        prices=[100, 100, 500, 120, 90, 100],
        categories=["f/w/bags", "home/kitchen", "f/w/bags", "f/w/bags", "f/w/shoes", "f/w/bags"],
        statuses=["on_sale", "sold", "on_sale", "on_sale", "on_sale", "on_sale"],
    )
    index = CountingIndex.build(ids, vectors)
    label_index_with_catalog(index, catalog, ids)
    return catalog, index


def test_recommend_filters_and_reranks():
    catalog, index = _catalog_and_index()
    ranked = recommend("q", 3, index, catalog, RankingConfig(fetch=10, category_weight=0.3))
    got = [r.item_id for r in ranked.items]
    # q itself, a (sold) and b (price 5x) are dropped; c, d, e remain, c/e share the category.
    assert "q" not in got and "a" not in got and "b" not in got
    assert got[0] == "c"
    assert set(got) == {"c", "d", "e"}
    assert ranked.items[0].category == "f/w/bags" and ranked.items[0].price == 120
    assert ranked.survivors == 3 and not ranked.widened


def test_recommend_follows_catalog_rows_not_index_positions():
    # The catalog lists items in another order than the index, and the index moves items
    # around on delete (ScaNN fills the hole with its last item): answers must still carry
    # each candidate's own price and category.
    catalog, index = _catalog_and_index()
    shuffled = ItemCatalog.from_columns(
        ["e", "d", "c", "b", "a", "q", "x"], prices=[100, 90, 120, 500, 100, 100, 100],
        categories=["f/w/bags", "f/w/shoes", "f/w/bags", "f/w/bags", "home/kitchen", "f/w/bags", "f/w/bags"],
        statuses=["on_sale", "on_sale", "on_sale", "on_sale", "sold", "on_sale", "on_sale"])
    index.upsert(["x"], np.array([[0.97, 0.2]]))
    index.delete(["c"])  # "x", last in the index, moves into c's place
    label_index_with_catalog(index, shuffled, ["q", "a", "b", "d", "e", "x"])
    ranked = recommend("q", 3, index, shuffled, RankingConfig(fetch=10))
    by_id = {r.item_id: (r.price, r.category) for r in ranked.items}
    assert by_id == {"x": (100, "f/w/bags"), "d": (90, "f/w/shoes"), "e": (100, "f/w/bags")}


def test_recommend_widens_once_when_too_few_survive():
    catalog, index = _catalog_and_index()
    ranked = recommend("q", 2, index, catalog, RankingConfig(fetch=3, widen_factor=2))
    assert index.fetches == [3, 6]
    assert ranked.widened and [r.item_id for r in ranked.items][:1] == ["c"]
    # A page bigger than what can survive: one widening, then a short answer.
    index.fetches.clear()
    ranked = recommend("q", 5, index, catalog, RankingConfig(fetch=6))
    assert index.fetches == [6] and len(ranked.items) == 3


def test_recommend_unknown_and_bad_k():
    catalog, index = _catalog_and_index()
    with pytest.raises(KeyError):
        recommend("nope", 3, index, catalog)
    with pytest.raises(ValueError):
        recommend("q", 0, index, catalog)
    with pytest.raises(ValueError):
        recommend("q", 101, index, catalog)


def test_catalog_upsert_delete_and_growth():
    catalog = ItemCatalog.from_columns(["x"], [10], ["a/b"], ["on_sale"])
    for i in range(40):
        catalog.upsert(f"n{i}", float(i), "a/c", "on_sale")
    assert len(catalog) == 41 and "n39" in catalog
    catalog.upsert("x", 12, "a/b", "reserved")
    assert catalog.get("x") == {"price": 12.0, "category": "a/b", "status": "reserved"}
    assert catalog.delete("n3") and "n3" not in catalog and not catalog.delete("n3")
    assert catalog.rows(["x", "zzz"]).tolist() == [0, -1]
    sims = catalog.category_similarities(catalog.category_codes[0])  # "a/b" against every category
    assert sims.tolist() == [1.0, 0.5]
    catalog.upsert("y", 5, "a/b/c", "on_sale")  # a new category extends the cached row
    assert catalog.category_similarities(catalog.category_codes[0]).tolist() == [1.0, 0.5, pytest.approx(2 / 3)]
    with pytest.raises(ValueError):
        ItemCatalog.from_columns(["x", "x"], [1, 1], ["a", "a"], ["on_sale", "on_sale"])


def test_catalog_from_bytes_and_codes_matches_catalog_from_strings():
    ids = ["q", "a", "bb", "c"]
    prices = [100, 200, 300, 400]
    categories = ["f/w/bags", "home", "f/w/bags", "f/w/shoes"]
    statuses = ["on_sale", "sold", "on_sale", "reserved"]
    plain = ItemCatalog.from_columns(ids, prices, categories, statuses)
    vocabulary = sorted(set(categories))
    coded = ItemCatalog.from_columns(
        np.array([i.encode() for i in ids]), np.array(prices),
        CodedColumn(np.array([vocabulary.index(c) for c in categories], np.int32), vocabulary),
        CodedColumn(np.array([0, 1, 0, 2], np.int32), ["on_sale", "sold", "reserved"]))
    for catalog in (plain, coded):
        assert [catalog.get(i) for i in ids] == [{"price": p, "category": c, "status": s}
                                                 for p, c, s in zip(prices, categories, statuses)]
        assert catalog.on_sale[catalog.rows(ids)].tolist() == [True, False, True, False]
        assert len(catalog) == 4 and catalog.item_id(catalog.row("bb")) == "bb" and catalog.row("zz") == -1
    catalog, row_a = plain, plain.row("a")
    assert catalog.delete("a") and not catalog.delete("a") and len(catalog) == 3
    catalog.upsert("a", 5, "home", "on_sale")  # back in its own row: rows never change
    catalog.upsert("new", 5, "home", "on_sale")
    assert len(catalog) == 5 and catalog.rows(["new", "a"]).tolist() == [4, row_a]


def test_labels_from_the_index_s_own_ids_equal_labels_from_a_list():
    catalog, index = _catalog_and_index()
    index.upsert(["x"], np.array([[0.97, 0.2]]))
    catalog.upsert("x", 100, "f/w/bags", "on_sale")
    index.delete(["c"])
    label_index_with_catalog(index, catalog, index.ids())  # vectorised: no str per item
    vectorised = index.search_labels(index.vector("q"), 6)[0].tolist()
    label_index_with_catalog(index, catalog, list(index.ids()))
    assert index.search_labels(index.vector("q"), 6)[0].tolist() == vectorised
    assert sorted(vectorised) == sorted(catalog.rows(["q", "a", "b", "d", "e", "x"]).tolist())


def test_read_catalog_keeps_values_and_reads_missing_categories_as_empty(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visrec.online.loading import read_catalog

    path = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_id": ["m1", "m22", "m333"], "price": [10, None, 30],
                             "category": ["a/b", None, "a/b"], "status": ["on_sale", "sold", None]}), path)
    catalog = read_catalog(str(path))
    assert catalog.get("m1") == {"price": 10, "category": "a/b", "status": "on_sale"}
    assert catalog.get("m333") == {"price": 30, "category": "a/b", "status": ""}
    assert catalog.get("m22") == {"price": 0, "category": "", "status": "sold"}
    assert catalog.on_sale[catalog.rows(["m1", "m22", "m333"])].tolist() == [True, False, False]
    pq.write_table(pa.table({"item_id": ["m1", "m1"], "price": [1, 2], "category": ["a", "a"],
                             "status": ["on_sale", "on_sale"]}), path)
    with pytest.raises(ValueError, match="duplicate item id 'm1'"):
        read_catalog(str(path))
