"""Closing the loop offline: the service's log sink, `join-events`, experiment control and `ab-report`."""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from visrec.core import io
from visrec.core.errors import UserError
from visrec.data.schema import read_interactions
from visrec.online.eventlog import LogConfig, LogSink, ServiceLog, encode_rows
from visrec.stages.experiment.assignment import CONTROL, TREATMENT, arm_of
from visrec.stages.experiment.config import ExperimentConfig, ReportConfig
from visrec.stages.experiment.report import decide, summarise, user_totals
from visrec.stages.experiment.stats import srm_p_value
from visrec.stages.configs import JoinConfig
from visrec.stages.join_events import join_events

DAY = "2026-11-30"


def impression(request_id: str, item_id: str, position: int, user: str, arm: str | None = None,
               ts: str = f"{DAY}T10:00:00Z", **extra) -> dict:
    return {"request_id": request_id, "query_item_id": "q", "item_id": item_id, "position": position,
            "session_id": f"s-{user}", "user_id": user, "ts": ts, "release": "v1", "arm": arm, **extra}


def event(request_id: str, item_id: str, kind: str = "tap", ts: str = f"{DAY}T10:00:05Z") -> dict:
    return {"request_id": request_id, "item_id": item_id, "type": kind, "ts": ts}


# ---------------------------------------------------------------- the log sink

def test_sink_writes_batches_per_day_and_never_blocks(tmp_path):
    sink = LogSink(str(tmp_path), "impressions", LogConfig(uri=str(tmp_path), batch_rows=3, flush_seconds=30,
                                                           max_buffered_rows=10))
    rows = [impression(f"r{i}", "a", 0, "u") for i in range(4)] + [impression("late", "a", 0, "u",
                                                                             ts="2026-12-01T00:00:01Z")]
    assert sink.add(rows[:3])  # a full batch wakes the writer thread
    deadline = time.monotonic() + 10
    while sink.written_rows < 3:
        assert time.monotonic() < deadline, "the writer thread did not write a full batch"
        time.sleep(0.05)
    assert sink.add(rows[3:])
    sink.close()
    files = io.list_files(str(tmp_path / "impressions"), "*.jsonl")
    assert {Path(f).parent.name for f in files} == {f"dt={DAY}", "dt=2026-12-01"}
    written = [json.loads(line) for f in files for line in Path(f).read_text().splitlines()]
    assert sorted(r["request_id"] for r in written) == sorted(r["request_id"] for r in rows)
    assert (sink.written_rows, sink.dropped_rows) == (5, 0)


def test_sink_drops_and_counts_when_the_store_is_down(tmp_path, monkeypatch):
    from visrec.online import eventlog

    calls = []

    def failing_write(uri, text):
        calls.append(uri)
        raise OSError("store unavailable")

    monkeypatch.setattr(eventlog.io, "write_text", failing_write)
    sink = LogSink(str(tmp_path), "events", LogConfig(uri=str(tmp_path), batch_rows=100, flush_seconds=30,
                                                      max_buffered_rows=4))
    assert sink.add([event("r", "a")] * 3)
    assert not sink.add([event("r", "a")] * 2)  # over the bound: dropped at once, the request is not held
    sink.flush()  # fails: kept for one retry
    assert (sink.dropped_rows, sink.failed_batches) == (2, 1)
    sink.flush()  # fails again: dropped
    assert (sink.dropped_rows, sink.failed_batches) == (5, 2)
    sink.close()


def test_sink_writes_to_gcs(gcs_emulator):
    """`--log-uri gs://...` on Vertex AI: one object per batch and day under the stream's prefix."""
    root = f"gs://{gcs_emulator()}/logs"
    sink = LogSink(root, "impressions", LogConfig(uri=root, batch_rows=100, flush_seconds=30))
    assert sink.add([impression("r1", "a", 0, "u"), impression("r2", "b", 1, "u", ts="2026-12-01T00:00:01Z")])
    sink.close()
    files = io.list_files(f"{root}/impressions", "*.jsonl")
    assert sorted(f.rsplit("/", 2)[1] for f in files) == [f"dt={DAY}", "dt=2026-12-01"]
    assert sorted(json.loads(io.read_text(f))["request_id"] for f in files) == ["r1", "r2"]
    assert (sink.written_rows, sink.written_batches, sink.dropped_rows) == (2, 2, 0)


def test_service_log_off_by_default():
    log = ServiceLog(LogConfig())
    log.impressions(encode_rows([impression("r", "a", 0, "u")])[0])
    assert not log.enabled and log.counters() == {}


def test_impression_lines_are_the_contract_rows_of_one_answer(tmp_path):
    from datetime import datetime, timezone

    from visrec.online.experiments import Shown, impression_lines
    from visrec.online.ranking import RankedList, Recommendation

    items = [Recommendation(item_id, 0.9, 1000, "a/b") for item_id in ("a", 'b"q', "カメラ")]
    shown = Shown("r1", "v1", "treatment", "exp-1", RankedList(items, 200, 120, False), (1.0, 0.25, 0.25), True)
    encoded = impression_lines(shown, "q", "u1", None, ts=datetime(2026, 11, 30, 23, 59, 59, tzinfo=timezone.utc))
    rows = [json.loads(line) for line in encoded.text.splitlines()]
    shared = {"request_id": "r1", "query_item_id": "q", "session_id": "u1", "user_id": "u1",
              "ts": "2026-11-30T23:59:59.000000Z", "release": "v1", "arm": "treatment", "experiment": "exp-1",
              "explored": True}
    assert rows == [{"item_id": "a", "position": 0, "propensity": 1.0, **shared},
                    {"item_id": 'b"q', "position": 1, "propensity": 0.25, **shared},
                    {"item_id": "カメラ", "position": 2, "propensity": 0.25, **shared}]
    assert (encoded.day, encoded.rows) == (f"dt={DAY}", 3)
    # The interactions reader takes them as they are (join-events adds `tapped`).
    path = tmp_path / "part.jsonl"
    path.write_text("".join(json.dumps({**row, "tapped": 0}) + "\n" for row in rows))
    table, dead = read_interactions(str(path))
    assert (table.num_rows, dead) == (3, [])


# ---------------------------------------------------------------- join-events

def write_logs(root: Path, stream: str, day: str, rows: list[dict], name: str = "part") -> None:
    path = root / stream / f"dt={day}" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_join_fills_tapped_and_purchased_and_sets_bad_rows_aside(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "interactions"
    write_logs(logs, "impressions", DAY, [impression("r1", "a", 0, "u1"), impression("r1", "b", 1, "u1"),
                                          impression("r2", "a", 0, "u2")])
    write_logs(logs, "impressions", DAY, [impression("r1", "a", 0, "u1")], name="retried")  # a duplicate
    (logs / "impressions" / f"dt={DAY}" / "torn.jsonl").write_text('{"request_id": "r9"\n')
    write_logs(logs, "events", DAY, [event("r1", "b"), event("r1", "b", "purchase"), event("r3", "a"),
                                     {"request_id": "r2", "item_id": "a", "type": "like", "ts": f"{DAY}T10:01:00Z"}])
    write_logs(logs, "events", "2026-12-01", [event("r2", "a", ts="2026-12-01T09:00:00Z")])  # next day, in window
    result = join_events(JoinConfig(logs=str(logs), out=str(out), dates=[DAY], shards=2))
    counts = result.days[DAY]
    assert (counts["rows"], counts["taps"], counts["purchases"], counts["rejected"]) == (3, 2, 1, 3)
    partition = out / f"dt={DAY}"
    assert (partition / "_SUCCESS").exists()
    table, dead = read_interactions(str(partition))  # the data contract's reader accepts the output
    assert table.num_rows == 3 and not dead
    rows = {(r["request_id"], r["item_id"]): r for f in sorted(partition.glob("interactions-*.jsonl"))
            for r in map(json.loads, f.read_text().splitlines())}
    assert (rows["r1", "a"]["tapped"], rows["r1", "b"]["tapped"], rows["r1", "b"]["purchased"]) == (0, 1, 1)
    assert rows["r2", "a"]["tapped"] == 1 and rows["r2", "a"]["user_id"] == "u2"
    reasons = sorted(json.loads(line)["reason"] for line in (partition / "_rejected.jsonl").read_text().splitlines())
    assert reasons == ["event_without_impression", "invalid_type", "malformed_json"]


def test_join_reads_impressions_from_vertex_request_response_logs(tmp_path):
    """The BigQuery table Vertex AI logs `/predict` into, exported as JSON Lines, as the impression source."""
    logs, export, out = tmp_path / "logs", tmp_path / "bq-export", tmp_path / "interactions"
    prediction = {"item_id": "q1", "release": "v1", "request_id": "r1", "arm": None, "experiment": None,
                  "user_id": "u1", "items": [{"item_id": "a", "score": 0.9}, {"item_id": "b", "score": 0.8}]}
    export.mkdir()
    (export / "000000000000.json").write_text("\n".join(json.dumps(row) for row in [
        {"endpoint": "projects/p/locations/l/endpoints/e", "deployed_model_id": "1",
         "logging_time": f"{DAY} 10:00:00 UTC", "request_id": "12345",
         "request_payload": [json.dumps({"item_id": "q1", "k": 2})],
         "response_payload": [json.dumps(prediction), json.dumps({"item_id": "zz", "error": "unknown item"})]},
        {"logging_time": "2026-11-29 10:00:00 UTC", "response_payload": [json.dumps({**prediction, "request_id": "old"})]},
        {"no": "logging_time"}]) + "\n")
    write_logs(logs, "events", DAY, [event("r1", "b")])
    counts = join_events(JoinConfig(logs=str(logs), out=str(out), dates=[DAY], impressions_from=str(export))).days[DAY]
    assert (counts["rows"], counts["taps"], counts["rejected"]) == (2, 1, 1)
    rows = [json.loads(line) for f in (out / f"dt={DAY}").glob("interactions-*.jsonl") for line in f.read_text().splitlines()]
    assert {(r["item_id"], r["position"], r["tapped"], r["session_id"]) for r in rows} == {("a", 0, 0, "u1"),
                                                                                           ("b", 1, 1, "u1")}
    with pytest.raises(UserError, match="--date"):
        join_events(JoinConfig(logs=str(logs), out=str(out), impressions_from=str(export)))


def test_join_picks_pending_days_only(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "interactions"
    for day in ("2026-11-28", "2026-11-29", "2026-11-30"):
        write_logs(logs, "impressions", day, [impression("r", "a", 0, "u", ts=f"{day}T10:00:00Z")])
    first = join_events(JoinConfig(logs=str(logs), out=str(out)), today=date(2026, 11, 30))
    assert sorted(first.days) == ["2026-11-28", "2026-11-29"]  # not today: it is still being written
    second = join_events(JoinConfig(logs=str(logs), out=str(out)), today=date(2026, 12, 1))
    assert sorted(second.days) == ["2026-11-30"]
    with pytest.raises(UserError, match="nothing to join"):
        join_events(JoinConfig(logs=str(logs), out=str(out)), today=date(2026, 12, 1))


# ---------------------------------------------------------------- experiments

def test_assignment_is_stable_and_honours_the_share():
    users = [f"user-{i}" for i in range(20_000)]
    arms = [arm_of(u, "salt-1", 0.2) for u in users]
    assert arms == [arm_of(u, "salt-1", 0.2) for u in users]
    assert abs(arms.count(TREATMENT) / len(users) - 0.2) < 0.01
    reshuffled = [arm_of(u, "salt-2", 0.2) for u in users]
    assert sum(a != b for a, b in zip(arms, reshuffled)) > 0.25 * len(users)


def test_srm_flags_a_broken_split():
    assert srm_p_value((5000, 5000), 0.5) > 0.9
    assert srm_p_value((5000, 4500), 0.5) < 1e-5
    assert srm_p_value((8000, 2000), 0.2) > 0.9


def test_start_stop_status_are_audited(tmp_path, tiny_models):
    from test_serving import build_release
    from visrec.stages.experiment.control import (EXPERIMENTS_LOG, experiment_status, read_experiment,
                                                  start_experiment, stop_experiment)

    registry = tmp_path / "registry"
    build_release(tiny_models, registry, "v1", n_items=12)
    build_release(tiny_models, registry, "v2", n_items=12)
    (registry / "CURRENT").write_text("v1\n")
    with pytest.raises(UserError, match="two"):
        start_experiment(str(registry), ExperimentConfig(treatment="v1"), "me", "test")
    with pytest.raises(UserError, match="not a complete release"):
        start_experiment(str(registry), ExperimentConfig(treatment="v9"), "me", "test")
    record = start_experiment(str(registry), ExperimentConfig(treatment="v2", share=0.3), "me", "try v2")
    assert read_experiment(str(registry)) == record and record["salt"] == record["id"]
    assert (record["control"], record["share"]) == ("v1", 0.3)
    with pytest.raises(UserError, match="already running"):
        start_experiment(str(registry), ExperimentConfig(treatment="v2"), "me", "again")
    (registry / "CURRENT").write_text("v2\n")
    assert "not the control" in experiment_status(str(registry))["warning"]
    stop_experiment(str(registry), "me", "done")
    assert read_experiment(str(registry)) is None
    assert [r["action"] for r in io.read_jsonl(str(registry / EXPERIMENTS_LOG))] == ["start", "stop"]
    audit = [json.loads(line)["action"] for line in (registry / "releases" / "v2" / "audit.jsonl").read_text()
             .splitlines()]
    assert audit[-2:] == ["experiment_start", "experiment_stop"]


def synthetic_rows(users: int, ctr: dict[str, float], seed: int, share: float = 0.5) -> list[dict]:
    """Users split by `arm_of`, each with a per-user propensity to tap (so taps correlate within a
    user, as real ones do) around the arm's CTR."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        user = f"u{u}"
        arm = arm_of(user, "s", share)
        p = np.clip(ctr[arm] * rng.gamma(4.0, 0.25), 0, 1)
        for i in range(int(rng.integers(5, 40))):
            tapped = int(rng.random() < p)
            rows.append({"arm": arm, "user_id": user, "session_id": user, "tapped": tapped,
                         "purchased": int(tapped and rng.random() < 0.2)})
    return rows


def test_report_finds_a_real_uplift_and_none_in_an_a_a_test():
    config = ReportConfig(logs="-", resamples=400)
    lifted = summarise(user_totals(synthetic_rows(3000, {CONTROL: 0.10, TREATMENT: 0.13}, seed=1)), 0.5, config)
    low, high = lifted["uplift"]["ctr"]["ci95"]
    assert low < 0.30 < high and low > 0  # the generator's uplift is +30%
    assert lifted["decision"] == "promote"
    same = summarise(user_totals(synthetic_rows(3000, {CONTROL: 0.10, TREATMENT: 0.10}, seed=2)), 0.5, config)
    low, high = same["uplift"]["ctr"]["ci95"]
    assert low < 0 < high and same["decision"] == "keep"


def test_report_stops_on_sample_ratio_mismatch_before_reading_metrics():
    rows = synthetic_rows(3000, {CONTROL: 0.10, TREATMENT: 0.13}, seed=3)
    rows = [r for r in rows if r["arm"] == CONTROL or int(r["user_id"][1:]) % 4]  # lose a quarter of treatment
    result = summarise(user_totals(rows), 0.5, ReportConfig(logs="-", resamples=200))
    assert result["decision"] == "stop" and "sample-ratio" in result["why"]
    arms = {CONTROL: {"users": 10}, TREATMENT: {"users": 10}}
    assert decide(arms, {}, 0.5, 0, ReportConfig(logs="-"))[0] == "keep"  # too few users


# ---------------------------------------------------------------- the service side

def test_exploration_swaps_two_slots_and_logs_propensities():
    import random

    from visrec.online.experiments import explore
    from visrec.online.ranking import RankedList, Recommendation

    items = [Recommendation(f"i{p}", 1.0 - p / 10, 1000.0, "c") for p in range(6)]
    ranked = RankedList(items, fetched=200, survivors=150, widened=False)
    same, propensities, explored = explore(ranked, 0.0, 4, random.Random(0))
    assert same is ranked and not explored and propensities == (1.0,) * 6
    rng = random.Random(1)
    shown, propensities, explored = explore(ranked, 1.0, 4, rng)
    moved = [p for p, item in enumerate(shown.items) if item is not items[p]]
    assert explored and len(moved) == 2 and max(moved) < 4  # one swap, within the depth
    assert all(propensities[p] == pytest.approx(1.0 / 6) for p in moved)  # exploration / C(4, 2)
    assert all(propensities[p] == pytest.approx(0.5) for p in range(4) if p not in moved)  # 1 - 2 / 4
    assert propensities[4:] == (1.0, 1.0)
    # Over many answers the logged propensity is the frequency: item 0 stays at 0 with 1 - 2 * 0.2 / 4.
    stays = sum(explore(ranked, 0.2, 4, rng)[0].items[0] is items[0] for _ in range(20_000)) / 20_000
    assert stays == pytest.approx(0.9, abs=0.01)


def test_events_endpoint_needs_a_token_and_valid_events(tmp_path, tiny_models):
    import asyncio

    import httpx

    from serving.app import create_app
    from test_serving import build_release
    from visrec.online.config import ServingConfig

    release = build_release(tiny_models, tmp_path / "registry", "v1", n_items=12)
    logs = tmp_path / "logs"
    app = create_app(str(release), ServingConfig(logging=LogConfig(uri=str(logs), flush_seconds=0.1)),
                     admin_token="admin-token-0123456789abcdef", events_token="events-token-0123456789abcdef")
    app.state.service.start()
    good = {"Authorization": "Bearer events-token-0123456789abcdef"}

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            answer = (await client.get("/v1/items/item-0001/similar", params={"k": 3, "user_id": "u1"})).json()
            event = {"request_id": answer["request_id"], "item_id": answer["items"][0]["item_id"], "type": "tap"}
            return answer, [
                (await client.post("/v1/events", json=event)).status_code,
                (await client.post("/v1/events", json=event, headers={"Authorization": "Bearer wrong"})).status_code,
                (await client.post("/v1/events", json={**event, "type": "like"}, headers=good)).status_code,
                (await client.post("/v1/events", json={"events": [event, {**event, "type": "purchase"}]},
                                   headers=good)).status_code]

    answer, statuses = asyncio.run(scenario())
    assert statuses == [401, 401, 422, 202]
    assert len(answer["request_id"]) == 32 and answer["arm"] is None  # no experiment runs
    app.state.service.log.close()
    app.state.service.state.close()
    impressions = [json.loads(line) for f in io.list_files(str(logs / "impressions"), "*.jsonl")
                   for line in Path(f).read_text().splitlines()]
    events = [json.loads(line) for f in io.list_files(str(logs / "events"), "*.jsonl")
              for line in Path(f).read_text().splitlines()]
    assert [(r["position"], r["user_id"], r["request_id"]) for r in impressions] == [
        (p, "u1", answer["request_id"]) for p in range(3)]
    assert sorted(e["type"] for e in events) == ["purchase", "tap"]
