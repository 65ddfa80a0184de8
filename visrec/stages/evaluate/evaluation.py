"""Stage 5: offline evaluation of embedding models on impression-and-tap logs, and the gate.

As in the paper: for every impression list (`query_item_id`, `session_id`) with at
least one tap, the impressed candidates are ranked by cosine similarity to the
query item's embedding and the ranking is scored against the taps (nDCG@5,
precision@1/@3, hit rate@1/@3). The candidate, the MobileNetV2 baseline, the
champion (if any), a seeded random ranking and the logged order are all scored on
exactly the same lists; a paired bootstrap over lists gives 95% intervals of the
uplifts; the gate policy (`visrec.stages.evaluate.gate`) turns them into `deploy` or `reject`.

Everything is vectorised over rows (Arrow dictionary encoding, `np.lexsort`,
`np.bincount`), so a million impression rows take seconds, not a Python loop per row.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from visrec.core import io
from visrec.data.embeddings import read_embeddings
from visrec.data.schema import read_interactions, read_listings
from visrec.model.pca import l2_normalise
from visrec.core.errors import UserError
from visrec.stages.configs import EvaluateConfig
from visrec.stages.evaluate.gate import DEFAULT_POLICY, evaluate_gate, parse_policy, read_policy_text
from visrec.stages.evaluate.metrics import IPS_METRIC, METRICS, all_metrics, graded_ndcg_at_k

log = logging.getLogger(__name__)

# Deepest cut-off any metric needs: only the top DEPTH of each ranking is materialised.
DEPTH = max(k for _, k in METRICS.values())
RANDOM = "random"
LOGGED = "logged_order"
TIE_BREAK_SEED = 20240607  # fixed: the same logs always break ties the same way
# IPS weights are capped at 1 / MIN_PROPENSITY (clipped IPS): one rare explored slot must not decide a metric.
MIN_PROPENSITY = 0.01
# Keeps one bootstrap chunk (resamples x lists index matrix) around 32 MB.
_BOOTSTRAP_CELLS = 4_000_000


# ---------------------------------------------------------------- grouping and ranking

@dataclass
class ImpressionLists:
    """Impression rows grouped into lists, rows sorted by list; ids coded into one vocabulary.

    `vocab` holds every item id seen (queries and candidates); `item_code[r]` and
    `query_code[l]` index into it, so each model maps ids to its own rows once per
    distinct id rather than once per row.
    """

    vocab: pa.Array
    list_of_row: np.ndarray  # (rows,) int64, lists numbered 0..n_lists-1, non-decreasing
    item_code: np.ndarray  # (rows,) int64 into vocab
    position: np.ndarray  # (rows,) int64
    relevance: np.ndarray  # (rows,) float64 0/1 (tapped)
    query_code: np.ndarray  # (n_lists,) int64 into vocab
    tie_break: np.ndarray  # (rows,) float64, a fixed random key that orders equal scores
    weight: np.ndarray  # (rows,) float64, 1 / logged propensity (clipped): the IPS weight of a tap

    @property
    def n_lists(self) -> int:
        return len(self.query_code)

    def lengths(self) -> np.ndarray:
        return np.bincount(self.list_of_row, minlength=self.n_lists)

    def n_relevant(self) -> np.ndarray:
        return np.bincount(self.list_of_row, weights=self.relevance, minlength=self.n_lists)

    def subset(self, keep_list: np.ndarray) -> "ImpressionLists":
        """Only the lists where `keep_list` is True, renumbered."""
        new_id = np.cumsum(keep_list) - 1
        rows = keep_list[self.list_of_row]
        return ImpressionLists(self.vocab, new_id[self.list_of_row[rows]], self.item_code[rows],
                               self.position[rows], self.relevance[rows], self.query_code[keep_list],
                               self.tie_break[rows], self.weight[rows])

    def query_ids(self) -> np.ndarray:
        return np.asarray(self.vocab.take(pa.array(self.query_code)).to_pylist(), dtype=object)


def group_lists(table: pa.Table) -> ImpressionLists:
    """Group impression rows into lists keyed by (`query_item_id`, `session_id`)."""
    ids = pa.concat_arrays([table["query_item_id"].combine_chunks(), table["item_id"].combine_chunks()])
    encoded = ids.dictionary_encode()
    codes = encoded.indices.to_numpy().astype(np.int64)
    n = len(table)
    query_code_row, item_code = codes[:n], codes[n:]
    session = table["session_id"].combine_chunks().dictionary_encode()
    session_code = session.indices.to_numpy().astype(np.int64)
    key = query_code_row * max(len(session.dictionary), 1) + session_code
    order = np.argsort(key, kind="stable")
    keys, list_of_row = np.unique(key[order], return_inverse=True)
    return ImpressionLists(
        vocab=encoded.dictionary,
        list_of_row=list_of_row.astype(np.int64),
        item_code=item_code[order],
        position=table["position"].to_numpy()[order].astype(np.int64),
        relevance=(table["tapped"].to_numpy()[order] > 0).astype(np.float64),
        query_code=keys // max(len(session.dictionary), 1),
        tie_break=np.random.default_rng(TIE_BREAK_SEED).random(n),
        weight=1.0 / np.clip(table["propensity"].to_numpy()[order] if "propensity" in table.column_names
                             else np.ones(n), MIN_PROPENSITY, 1.0),
    )


def vocab_rows(vocab: pa.Array, model_ids: list[str]) -> np.ndarray:
    """For each vocabulary id, its row in a model's embedding matrix, or -1 if it has none."""
    idx = pc.index_in(vocab, value_set=pa.array(model_ids, pa.string()))
    return idx.fill_null(-1).to_numpy().astype(np.int64)


def cosine_scores(lists: ImpressionLists, rows_of_vocab: np.ndarray, vectors: np.ndarray,
                  chunk: int = 1 << 16) -> np.ndarray:
    """Cosine(query, candidate) per row; candidates without an embedding get -inf (rank last).

    `vectors` must be L2-normalised; every list's query must have a row. Chunked so
    the gathered (rows, dims) matrices stay small.
    """
    query_row = rows_of_vocab[lists.query_code][lists.list_of_row]
    item_row = rows_of_vocab[lists.item_code]
    out = np.full(len(item_row), -np.inf, dtype=np.float64)
    for s in range(0, len(item_row), chunk):
        q, it = query_row[s:s + chunk], item_row[s:s + chunk]
        have = it >= 0
        dots = np.einsum("ij,ij->i", vectors[q[have]], vectors[it[have]])
        block = out[s:s + chunk]
        block[have] = np.nan_to_num(dots, nan=-np.inf)
    return out


def ranked_top(lists: ImpressionLists, scores: np.ndarray, depth: int = DEPTH,
               values: np.ndarray | None = None) -> np.ndarray:
    """(n_lists, depth) relevance (or per-row `values`) of each list's top `depth` by descending score.

    Ties (and missing items, all at -inf) are broken by a fixed random key per row,
    never by the logged `position`: the logged order carries the production ranker's
    signal, so a model that cannot tell items apart (a collapsed encoder, all scores
    equal) would inherit it and score like production instead of like chance.
    """
    order = np.lexsort((lists.tie_break, -scores, lists.list_of_row))
    sorted_list = lists.list_of_row[order]
    lengths = lists.lengths()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    rank = np.arange(len(order)) - starts[sorted_list]
    keep = rank < depth
    top = np.zeros((lists.n_lists, depth), dtype=np.float64)
    top[sorted_list[keep], rank[keep]] = (lists.relevance if values is None else values)[order][keep]
    return top


def score_lists(lists: ImpressionLists, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric per list for a ranking given by per-row `scores`, and `IPS_METRIC` beside them."""
    metrics = all_metrics(ranked_top(lists, scores), lists.n_relevant(), lists.lengths())
    gains = lists.relevance * lists.weight
    k = METRICS["ndcg@5"][1]
    metrics[IPS_METRIC] = graded_ndcg_at_k(ranked_top(lists, scores, k, gains), ranked_top(lists, gains, k, gains), k)
    return metrics


def reference_rankings(lists: ImpressionLists, seed: np.random.SeedSequence) -> dict[str, dict[str, np.ndarray]]:
    """Per-list metrics of the two reference rankings: a random order and the order users saw."""
    return {RANDOM: score_lists(lists, np.random.default_rng(seed).random(len(lists.list_of_row))),
            LOGGED: score_lists(lists, -lists.position.astype(np.float64))}


# ---------------------------------------------------------------- bootstrap and summaries

def paired_bootstrap_ci(columns: np.ndarray, resamples: int, rng: np.random.Generator,
                        level: float = 0.95) -> np.ndarray:
    """Percentile interval of the mean of each column, resampling rows (lists) jointly.

    The same resampled lists serve every column, so differences between models keep
    their pairing. Resamples are drawn in chunks as count matrices (one multinomial
    draw per resample), and the means are one matrix product per chunk.
    Returns a (n_columns, 2) array.
    """
    n, c = columns.shape
    if n == 0 or resamples <= 0:
        return np.full((c, 2), np.nan)
    per_chunk = max(1, _BOOTSTRAP_CELLS // n)
    means = np.empty((resamples, c))
    data = columns.astype(np.float64)
    for s in range(0, resamples, per_chunk):
        b = min(per_chunk, resamples - s)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)
        means[s:s + b] = counts @ data / n
    alpha = (1.0 - level) / 2.0
    return np.quantile(means, [alpha, 1.0 - alpha], axis=0).T


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def summarise(per_list: dict[str, dict[str, np.ndarray]], comparisons: list[tuple[str, str]],
              resamples: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """Means of every ranking's metrics and the uplift of each (model, reference) pair.

    Returns (values: ranking -> metric -> {mean, ci95}, uplift: "a_vs_b" -> metric ->
    {value, reference, absolute, relative, ci95}). All intervals come from one paired
    bootstrap over the same lists.
    """
    cols, labels = [], []
    for ranking, metrics in per_list.items():
        for m, v in metrics.items():
            cols.append(v)
            labels.append(("value", ranking, m))
    for a, b in comparisons:
        for m in METRICS:
            cols.append(per_list[a][m] - per_list[b][m])
            labels.append(("diff", f"{a}_vs_{b}", m))
    ci = paired_bootstrap_ci(np.stack(cols, axis=1), resamples, rng)
    ci_of = {label: (None if np.isnan(ci[i]).any() else [_r(ci[i, 0]), _r(ci[i, 1])])
             for i, label in enumerate(labels)}
    values = {r: {m: {"mean": _r(v.mean()), "ci95": ci_of[("value", r, m)]} for m, v in ms.items()}
              for r, ms in per_list.items()}
    uplift = {}
    for a, b in comparisons:
        name = f"{a}_vs_{b}"
        uplift[name] = {}
        for m in METRICS:
            va, vb = per_list[a][m].mean(), per_list[b][m].mean()
            uplift[name][m] = {"value": _r(va), "reference": _r(vb), "absolute": _r(va - vb),
                               "relative": _r((va - vb) / abs(vb)) if vb else None,
                               "ci95": ci_of[("diff", name, m)]}
    return values, uplift


def _model_section(values: dict) -> dict:
    """One model's entry in metrics.json: metric -> mean, plus `ci95`: metric -> [low, high]."""
    out: dict = {m: v["mean"] for m, v in values.items()}
    out["ci95"] = {m: v["ci95"] for m, v in values.items()}
    return out


def top_level_category(category: str | None) -> str | None:
    """`Women/Tops/T-shirts` -> `Women` (the data contract's category path)."""
    if not category:
        return None
    head = category.replace(">", "/").split("/", 1)[0].strip()
    return head or None


# ---------------------------------------------------------------- report examples

def _thumbnail(uri: str | None, base_dir: str | None, size: int = 112) -> bytes | None:
    """A small JPEG of a listing's image (`uri` as in the listings, relative to `base_dir`), or None
    when it cannot be read (the report shows the id)."""
    if not uri:
        return None
    try:
        from io import BytesIO

        from visrec.data.images import decode_image, load_image_bytes

        img = decode_image(load_image_bytes(uri, base_dir))
        img.thumbnail((size, size))
        buf = BytesIO()
        img.save(buf, format="JPEG", quality=80)
        return buf.getvalue()
    except Exception as exc:  # a broken picture must not lose the evaluation
        log.debug("no thumbnail for %s: %s", uri, exc)
        return None


def nearest_neighbours(query_ids: list[str], ids: list[str], vectors: np.ndarray, k: int) -> list[list[str]]:
    """Top-k catalog items by brute-force cosine for each query (the query itself excluded)."""
    row = {item: i for i, item in enumerate(ids)}
    k = min(k, len(ids) - 1)
    out = []
    for q in query_ids:
        sims = vectors @ vectors[row[q]]
        sims[row[q]] = -np.inf
        best = np.argpartition(-sims, k - 1)[:k] if k > 0 else np.array([], dtype=np.int64)
        out.append([ids[i] for i in best[np.argsort(-sims[best], kind="stable")]])
    return out


def report_examples(lists: ImpressionLists, embeddings: dict[str, tuple[list[str], np.ndarray]],
                    images: dict[str, str], count: int, seed: int, image_base: str | None = None) -> list[dict]:
    """`count` sampled query items with the candidate's and the baseline's top 5, as thumbnails.

    `images`: item id -> the listing's `image_uri`, relative ones resolved against `image_base`
    (the listings file's directory).

    Items the logs show tapped for that query are flagged, so a reader sees at a
    glance which model surfaces what users actually wanted.
    """
    queries = lists.query_ids()
    pool = sorted(set(queries.tolist()))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(pool, size=min(count, len(pool)), replace=False).tolist()) if pool else []
    tapped_rows = (lists.relevance > 0) & np.isin(queries[lists.list_of_row], chosen)
    tapped = set(zip(queries[lists.list_of_row[tapped_rows]].tolist(),
                     lists.vocab.take(pa.array(lists.item_code[tapped_rows])).to_pylist()))
    neighbours = {name: nearest_neighbours(chosen, *embeddings[name], k=5) for name in ("candidate", "baseline")}
    def card(query: str, item: str) -> dict:
        return {"item_id": item, "image": _thumbnail(images.get(item), image_base), "tapped": (query, item) in tapped}

    return [{"query": card(q, q), "candidate": [card(q, x) for x in neighbours["candidate"][i]],
             "baseline": [card(q, x) for x in neighbours["baseline"][i]]} for i, q in enumerate(chosen)]


# ---------------------------------------------------------------- the stage

def score_models(lists: ImpressionLists, models: dict[str, tuple[list[str], np.ndarray]],
                 reference_seed: np.random.SeedSequence) -> tuple[ImpressionLists, dict[str, int],
                                                                  dict[str, dict[str, np.ndarray]],
                                                                  dict[str, tuple[list[str], np.ndarray]]]:
    """Per-list metrics of every model, and of the reference rankings, on the same lists.

    A list counts if it has a tap and every model embeds its query item. Returns (the
    lists used, skipped lists by reason, per-list metrics by ranking, the models with
    L2-normalised vectors). `UserError` if no list is left. Shared by the evaluation
    stage and the offline study, so both score exactly alike.
    """
    has_tap = lists.n_relevant() > 0
    usable = has_tap.copy()
    skipped = {"no_taps": int((~has_tap).sum())}
    normalised, rows_of_vocab = {}, {}
    for name, (ids, vectors) in models.items():
        normalised[name] = (ids, l2_normalise(vectors, np.float32))
        rows_of_vocab[name] = vocab_rows(lists.vocab, ids)
        has_query = rows_of_vocab[name][lists.query_code] >= 0
        skipped[f"query_not_in_{name}"] = int((usable & ~has_query).sum())
        usable &= has_query
        log.info("%s: %d embeddings of %d dims", name, len(ids), normalised[name][1].shape[1])
    used = lists.subset(usable)
    log.info("evaluating %d lists (%d rows); skipped %s", used.n_lists, len(used.list_of_row), skipped)
    if used.n_lists == 0:
        raise UserError("no impression list has a tap and a query item embedded by every model")
    per_list: dict[str, dict[str, np.ndarray]] = {}
    for name, (_, vectors) in normalised.items():
        t = time.perf_counter()
        per_list[name] = score_lists(used, cosine_scores(used, rows_of_vocab[name], vectors))
        dt = time.perf_counter() - t
        log.info("scored %s: %d rows in %.2fs (%.0f rows/s)", name, len(used.list_of_row), dt,
                 len(used.list_of_row) / max(dt, 1e-9))
    per_list.update(reference_rankings(used, reference_seed))
    return used, skipped, per_list, normalised


@dataclass(frozen=True)
class EvaluateResult:
    """What `run_evaluation` returns, and `metrics.json` records (docs/gate.md): each model's metrics
    (`champion` None before the first release), the uplifts, how many lists were used and
    skipped, and the gate's `decision` (`deploy` | `reject`) with its `reasons`."""

    candidate: dict
    baseline: dict
    champion: dict | None
    uplift: dict
    lists_used: int
    lists_skipped: int
    decision: str
    reasons: list[dict]

    def as_dict(self) -> dict:
        """The `metrics.json` content, keys in this order."""
        return asdict(self)


def run_evaluation(config: EvaluateConfig) -> EvaluateResult:
    """Score the models, bootstrap the uplifts, apply the gate; write metrics.json and report.html.

    The decision is data (`deploy`/`reject`), not an exception: the pipeline's `gate_decision`
    task reads it from metrics.json and the deploy stage re-checks it.
    """
    from visrec.stages.evaluate.report import render_report

    t0 = time.perf_counter()
    policy_text = read_policy_text(config.gate_config)
    policy = parse_policy(policy_text, config.gate_config or DEFAULT_POLICY)

    table, rejected = read_interactions(config.interactions_uri)
    log.info("read %d impression rows (%d rejected) in %.1fs", len(table), len(rejected), time.perf_counter() - t0)
    if len(table) == 0:
        raise UserError(f"interactions {config.interactions_uri}: no usable impression rows")

    t = time.perf_counter()
    lists = group_lists(table)
    has_tap = lists.n_relevant() > 0
    log.info("grouped into %d lists (%d with taps) in %.1fs", lists.n_lists, int(has_tap.sum()),
             time.perf_counter() - t)

    models = {"candidate": read_embeddings(config.candidate_uri), "baseline": read_embeddings(config.baseline_uri)}
    if config.champion_uri:
        models["champion"] = read_embeddings(config.champion_uri)
    seeds = np.random.SeedSequence(config.seed).spawn(2)
    used, skipped, per_list, models = score_models(lists, models, seeds[0])

    has_champion = config.champion_uri is not None
    comparisons = [("candidate", "baseline")]
    if has_champion:
        comparisons += [("champion", "baseline"), ("candidate", "champion")]
    comparisons += [(RANDOM, "baseline"), (LOGGED, "baseline")]

    rng = np.random.default_rng(seeds[1])
    t = time.perf_counter()
    values, uplift = summarise(per_list, comparisons, config.bootstrap_resamples, rng)
    log.info("paired bootstrap (%d resamples over %d lists) in %.1fs", config.bootstrap_resamples,
             used.n_lists, time.perf_counter() - t)

    sections = {r: _model_section(v) for r, v in values.items()}
    images: dict[str, str] = {}
    if config.listings_uri:
        listings = read_listings(config.listings_uri)
        if listings.rejected:
            log.warning("listings: %d invalid rows ignored (%s)", sum(listings.rejected.values()), listings.rejected)
        category = {row["item_id"]: row["category"] for row in listings.rows}
        images = {row["item_id"]: row["image_uri"] for row in listings.rows}
        slice_of_list = np.array([top_level_category(category.get(q)) or "" for q in used.query_ids()], dtype=object)
        uplift["slices"] = {}
        for r in sections:
            sections[r]["slices"] = {}
        for name in sorted(set(slice_of_list) - {""}):
            mask = slice_of_list == name
            sub = {r: {m: v[mask] for m, v in ms.items()} for r, ms in per_list.items()}
            s_values, s_uplift = summarise(sub, comparisons, config.bootstrap_resamples, rng)
            for r, v in s_values.items():
                sections[r]["slices"][name] = {"lists": int(mask.sum()), **{m: x["mean"] for m, x in v.items()}}
            uplift["slices"][name] = s_uplift
        log.info("slices by top-level category: %s",
                 {n: s["lists"] for n, s in sections["candidate"]["slices"].items()})

    # The two reference rankings have no section of their own in metrics.json: their
    # values are the `value` of their uplift entries (random_vs_baseline, logged_order_vs_baseline).
    scores = {
        "candidate": sections["candidate"],
        "baseline": sections["baseline"],
        "champion": sections["champion"] if has_champion else None,
        "uplift": uplift,
        "lists_used": int(used.n_lists),
        "lists_skipped": int(sum(skipped.values())),
    }
    decision, reasons = evaluate_gate(policy, scores)
    result = EvaluateResult(**scores, decision=decision, reasons=reasons)
    log.info("gate: %s (%d/%d thresholds passed)", decision, sum(r["passed"] for r in reasons), len(reasons))

    with io.output_dir(config.out_dir) as out:
        io.write_json(str(out / "metrics.json"), result.as_dict())
        io.write_text(str(out / "gate.yaml"), policy_text)
        if rejected:
            io.write_text(str(out / "rejected.jsonl"),
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected))
        examples = report_examples(used, models, images,
                                   config.report_examples, config.seed,
                                   image_base=io.parent(config.listings_uri) if config.listings_uri else None)
        html = render_report(result.as_dict(), per_ranking=values, skipped=skipped, examples=examples,
                             inputs={"interactions": config.interactions_uri, "candidate": config.candidate_uri,
                                     "baseline": config.baseline_uri, "champion": config.champion_uri,
                                     "listings": config.listings_uri, "gate policy": config.gate_config or DEFAULT_POLICY,
                                     "bootstrap resamples": config.bootstrap_resamples,
                                     "seed": config.seed})
        io.write_text(str(out / "report.html"), html)
    log.info("evaluation done in %.1fs -> %s", time.perf_counter() - t0, config.out_dir)
    return result
