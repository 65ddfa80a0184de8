"""`visrec ingest`: event parsing, the Beam transforms under a `TestStream` (event-time order, late and
duplicate events, bad images), the Pub/Sub branch's construction, and the watched prefix on the GCS
emulator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_serving import COLOURS, build_release, jpeg
from visrec.core.errors import UserError
from visrec.online.entry import DELETE, UPSERT
from visrec.online.ingest import (DEAD_LETTERS, BadEvent, ingest_events, parse_event, run_ingest,
                                  target_of)
from visrec.online.ingest_config import IngestConfig
from visrec.online.journal import open_journal
from visrec.online.writes import WriteRegisters

T0 = 1_790_000_000.0  # event times: epoch seconds


def line(**event) -> bytes:
    return json.dumps(event).encode()


def listing(item_id: str, image_uri: str, at: float, **extra) -> bytes:
    return line(type="listing", item_id=item_id, title=f"title of {item_id}", category="home/kitchen/mugs",
                price=1500, status="on_sale", image_uri=image_uri, event_time=at, **extra)


# ---------------------------------------------------------------- parsing

def test_parse_listing_update_delete():
    event = parse_event(listing("n1", "gs://b/n1.jpg", T0))
    entry = event.entry((0.5, 0.5), "abc")
    assert (entry.op, entry.item_id, entry.at, entry.id) == (UPSERT, "n1", T0, event.id)
    assert (entry.category, entry.price, entry.status, entry.sent) == ("home/kitchen/mugs", 1500, "on_sale",
                                                                      ("category", "price", "status"))
    assert event.image_uri == "gs://b/n1.jpg" and entry.vector == (0.5, 0.5) and entry.image_sha256 == "abc"

    update = parse_event(line(type="update", item_id="n1", status="sold", event_time="2026-12-01T10:00:00+09:00"))
    entry = update.entry()
    assert entry.sent == ("status",) and entry.status == "sold" and entry.vector is None
    assert entry.at == 1_796_086_800.0

    price = parse_event(line(type="update", item_id=7, price="1,200", event_time=T0)).entry()
    assert (price.item_id, price.sent, price.price) == ("7", ("price",), 1200)

    delete = parse_event(line(type="delete", item_id="n1", event_time=T0 + 1)).entry()
    assert (delete.op, delete.at) == (DELETE, T0 + 1)


def test_replayed_event_has_the_same_entry_id():
    raw = listing("n1", "gs://b/n1.jpg", T0)
    assert parse_event(raw).id == parse_event(raw + b"\n").id != parse_event(listing("n1", "gs://b/n1.jpg", T0 + 1)).id


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed_json"),
    (line(type="create", item_id="a", event_time=T0), "invalid_type"),
    (line(type="delete", item_id="", event_time=T0), "invalid_item_id"),
    (line(type="delete", item_id="a"), "missing_column:event_time"),
    (line(type="delete", item_id="a", event_time="2026-12-01T10:00:00"), "invalid_event_time"),
    (line(type="update", item_id="a", event_time=T0), "empty_update"),
    (line(type="update", item_id="a", price=0, event_time=T0), "invalid_price"),
    (line(type="update", item_id="a", status=" ", event_time=T0), "invalid_status"),
    (line(type="listing", item_id="a", title="t", category="c", price=1, status="on_sale", event_time=T0),
     "missing_column:image_uri"),
    (listing("a", "images/a.jpg", T0), "invalid_image_uri"),
])
def test_bad_events_say_why(raw, reason):
    with pytest.raises(BadEvent) as exc:
        parse_event(raw)
    assert exc.value.reason == reason


def test_config_is_checked():
    with pytest.raises(UserError):
        IngestConfig(release="r", source="s", poll_seconds=0)
    with pytest.raises(UserError):
        IngestConfig(release="r", source="s", device="tpu")
    assert IngestConfig(release="r", source="projects/p/subscriptions/s").from_pubsub


# ---------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("ingest")
    build_release(tiny_models, root / "registry", "v1", n_items=12)
    (root / "registry" / "CURRENT").write_text("v1\n")
    images = root / "images"
    images.mkdir()
    for name, colour in (("red", COLOURS[0]), ("blue", COLOURS[2])):
        (images / f"{name}.jpg").write_bytes(jpeg(colour, 2))
    (images / "broken.jpg").write_bytes(b"not an image")
    return root / "registry"


def registers_of(state_uri: str) -> tuple[WriteRegisters, list]:
    entries = open_journal(state_uri).read_new()
    registers = WriteRegisters()
    for entry in entries:
        registers.apply(entry)
    return registers, entries


def dead_letter_reasons(state_uri: str) -> list[str]:
    from visrec.core import io

    return sorted(json.loads(row)["reason"] for uri in io.list_files(io.join(state_uri, DEAD_LETTERS))
                  for row in io.read_text(uri).splitlines())


def test_test_stream_order_late_duplicate_and_bad_events(registry, tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.direct.direct_runner import BundleBasedDirectRunner
    from apache_beam.testing.test_stream import TestStream

    from visrec.data.images import decode_image
    from visrec.model.encode import encode_images
    from visrec.model.encoders import load_image_encoder
    from visrec.stages.embed import load_image_processor

    images = registry.parent / "images"
    config = IngestConfig(release=str(registry), source=str(tmp_path), batch_size=4, segment_size=3)
    target = target_of(config)
    new_red = listing("new-red", str(images / "red.jpg"), T0 + 10)
    stream = (TestStream()
              .add_elements([new_red, listing("new-blue", str(images / "blue.jpg"), T0 + 10),
                             line(type="update", item_id="item-0001", status="sold", event_time=T0 + 5)])
              .advance_watermark_to(T0 + 20)
              .add_elements([line(type="delete", item_id="new-blue", event_time=T0 + 20),
                             new_red,  # a replay
                             line(type="delete", item_id="new-red", event_time=T0 + 1),  # late: older than the listing
                             line(type="update", item_id="item-0001", status="on_sale", event_time=T0 + 2),  # late
                             listing("bad", str(images / "broken.jpg"), T0 + 10),
                             listing("gone", str(images / "missing.jpg"), T0 + 10),
                             b"{not json"])
              .advance_watermark_to_infinity())
    with beam.Pipeline(runner=BundleBasedDirectRunner(), options=PipelineOptions(["--streaming"])) as p:
        ingest_events(p | stream, target, config, load_image_processor(target.model_uri))

    registers, entries = registers_of(target.state_uri)
    assert registers.alive("new-red", False) and not registers.alive("new-blue", False)
    catalog_row = {"category": "home/kitchen/mugs", "price": 1000, "status": "on_sale"}
    assert registers.metadata("item-0001", catalog_row)["status"] == "sold"  # the newest event time wins
    assert {"bad", "gone"}.isdisjoint(e.item_id for e in entries)
    red = [e for e in entries if e.item_id == "new-red" and e.op == UPSERT]
    assert len(red) == 2 and len({e.id for e in red}) == 1  # the replay is the same entry, not a second item
    # The vector is the one encode function's, with the release's encoder and PCA.
    encoder = load_image_encoder(target.model_uri, kind=target.kind)
    expected = encode_images(encoder, [decode_image((images / "red.jpg").read_bytes())], target.pca)[0]
    np.testing.assert_allclose(red[0].vector, expected, atol=1e-5)
    assert (Path(target.state_uri) / "images" / red[0].image_sha256).exists()
    assert dead_letter_reasons(target.state_uri) == ["malformed_json", "undecodable_image", "unreadable_image"]


def test_pubsub_branch_constructs_with_read_from_pubsub(registry):
    import apache_beam as beam

    p = beam.Pipeline()
    config = IngestConfig(release=str(registry), source="projects/visrec-prod/subscriptions/listing-events")
    assert run_ingest(config, test_pipeline=p) == 0
    reads = [t for t in p.transforms_stack[0].parts if t.full_label == "ReadPubSub"]
    assert len(reads) == 1 and isinstance(reads[0].transform, beam.io.ReadFromPubSub)
    assert reads[0].transform._source.full_subscription == "projects/visrec-prod/subscriptions/listing-events"
    with pytest.raises(UserError, match="subscription"):
        run_ingest(IngestConfig(release=str(registry), source="projects/p/subscriptions/s"),
                   test_pipeline=beam.Pipeline())


def test_watched_gcs_prefix(registry, gcs_emulator, tmp_path):
    from visrec.core import io

    bucket = gcs_emulator()
    image = f"gs://{bucket}/images/red.jpg"
    io.write_bytes(image, (registry.parent / "images" / "red.jpg").read_bytes())
    release = tmp_path / "registry"
    import shutil

    shutil.copytree(registry, release, ignore=shutil.ignore_patterns("state"))
    events = f"gs://{bucket}/events"
    io.write_text(f"{events}/000.jsonl", (listing("dropped", image, T0) + b"\n"
                                         + line(type="delete", item_id="item-0002", event_time=T0) + b"\n").decode())
    io.write_text(f"{events}/ignored.txt", "not an event file")
    files = run_ingest(IngestConfig(release=str(release), source=events, max_polls=2, poll_seconds=0.1))
    assert files == 1
    registers, entries = registers_of(target_of(IngestConfig(release=str(release), source=events)).state_uri)
    assert len(entries) == 2  # the second poll found nothing new
    assert registers.alive("dropped", False) and not registers.alive("item-0002", True)


def wait_for(check, seconds: float, what: str):
    """Poll `check` until it returns something truthy; fail after `seconds`."""
    import time

    deadline = time.monotonic() + seconds
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what} not within {seconds} s"
        time.sleep(0.2)
    return result


def test_a_real_server_serves_a_dropped_listing_and_never_a_deleted_one(registry, tmp_path):
    import shutil
    import subprocess
    import sys

    import httpx

    from visrec.core.servers import ServeProcess, stop_process

    release = tmp_path / "registry"
    shutil.copytree(registry, release, ignore=shutil.ignore_patterns("state"))
    events = tmp_path / "events"
    events.mkdir()
    image = registry.parent / "images" / "red.jpg"
    ingest = subprocess.Popen([sys.executable, "-m", "visrec", "ingest", "--release", str(release),
                               "--source", str(events), "--poll-seconds", "0.2"],
                              stdout=open(tmp_path / "ingest.log", "wb"), stderr=subprocess.STDOUT)
    try:
        with ServeProcess(release, log_path=tmp_path / "serve.log") as server:
            server.wait_healthy()

            def similar(item_id: str) -> httpx.Response:
                return httpx.get(f"{server.url}/v1/items/{item_id}/similar", params={"k": 100})

            def listed(item_id: str) -> list[str]:
                return [row["item_id"] for row in similar(item_id).json()["items"]]

            assert similar("dropped").status_code == 404
            (events / "001.jsonl").write_bytes(listing("dropped", str(image), T0) + b"\n")
            neighbours = wait_for(lambda: similar("dropped").status_code == 200 and listed("dropped"), 20,
                                  "the dropped listing served")
            assert "dropped" in listed(neighbours[0])
            (events / "002.jsonl").write_bytes(line(type="delete", item_id="dropped", event_time=T0 + 1) + b"\n")
            wait_for(lambda: similar("dropped").status_code == 404, 20, "the deleted listing gone")
            assert "dropped" not in listed(neighbours[0])
            assert ingest.poll() is None, (tmp_path / "ingest.log").read_text()
    finally:
        stop_process(ingest)


def test_gcs_batch_appends_are_segments_of_many_entries(gcs_emulator, monkeypatch):
    """What ingest appends to a `gs://` release: objects of many entries each, read back entry by entry,
    beside single-entry objects (serving's writes)."""
    from visrec.core import io
    from visrec.online import journal as journal_module
    from visrec.online.entry import JournalEntry

    monkeypatch.setattr(journal_module, "SEGMENT_ENTRIES", 4)
    bucket = gcs_emulator()
    state = f"gs://{bucket}/registry/releases/v1/state"
    writer, reader = open_journal(state), open_journal(state)
    writer.append(JournalEntry("delete", "single", T0, id="single"))
    writer.append_many([JournalEntry("delete", f"item-{i}", T0, id=f"batch-{i}") for i in range(10)])
    names = [b.name for b in io.gcs_client().bucket(bucket).list_blobs(prefix="registry/releases/v1/state/journal/")]
    assert sorted(n.rsplit(".", 1)[1] for n in names) == ["json", "jsonl", "jsonl", "jsonl"]  # 1 + 4 + 4 + 2
    assert sorted(e.id for e in reader.read_new()) == sorted(["single", *(f"batch-{i}" for i in range(10))])
    assert reader.read_new() == [] and reader.skipped == 0


def test_cli_defaults_come_from_the_config():
    from visrec import cli
    from visrec.cli.ingest import config_from

    args = cli.build_parser().parse_args(["ingest", "--release", "r", "--source", "s", "--", "--project=p"])
    config = config_from(args)
    assert (config.poll_seconds, config.batch_size, config.segment_size, config.max_polls, config.follow_seconds) == (
        IngestConfig.poll_seconds, IngestConfig.batch_size, IngestConfig.segment_size, IngestConfig.max_polls,
        IngestConfig.follow_seconds)
    assert config.beam_options == ["--project=p"]


def test_vertex_config_makes_ingest_a_dataflow_streaming_job_and_flags_win(tmp_path):
    from visrec import cli
    from visrec.cli.ingest import config_from
    from visrec.core import io

    packaged = str(Path(cli.__file__).parents[1] / "configs" / "vertex.yaml")
    config = config_from(cli.build_parser().parse_args(["ingest", "--config", packaged]))
    assert config.from_pubsub and (config.runner, config.device) == ("DataflowRunner", "gpu")
    assert config.release.startswith("gs://") and "--job_name=visrec-ingest" in config.beam_options
    assert config.poll_seconds == IngestConfig.poll_seconds  # not in the file: the dataclass default

    given = config_from(cli.build_parser().parse_args(
        ["ingest", "--config", packaged, "--runner", "DirectRunner", "--batch-size", "16", "--", "--x=1"]))
    assert (given.runner, given.batch_size, given.beam_options) == ("DirectRunner", 16, ["--x=1"])

    typo = tmp_path / "typo.yaml"
    io.write_text(str(typo), "ingest:\n  release: r\n  sorce: s\n")
    with pytest.raises(UserError, match="sorce"):
        config_from(cli.build_parser().parse_args(["ingest", "--config", str(typo)]))
    with pytest.raises(UserError, match="--source"):
        config_from(cli.build_parser().parse_args(["ingest", "--release", "r"]))


# ---------------------------------------------------------------- following CURRENT

@pytest.fixture
def two_releases(registry, tmp_path, tiny_models) -> Path:
    """A copy of the module's registry with a second release, v2; CURRENT is v1."""
    import shutil

    copy = tmp_path / "registry"
    shutil.copytree(registry, copy, ignore=shutil.ignore_patterns("state"))
    build_release(tiny_models, copy, "v2", n_items=12)
    (copy / "CURRENT").write_text("v1\n")
    return copy


def test_a_watched_prefix_follows_current_and_keeps_one_encoder_loaded(registry, two_releases, tmp_path,
                                                                       monkeypatch):
    import threading

    from visrec.stages import embed

    loads = []
    real_load = embed.load_image_encoder
    monkeypatch.setattr(embed, "load_image_encoder", lambda uri, kind: loads.append(uri) or real_load(uri, kind))
    events = tmp_path / "events"
    events.mkdir()
    image = str(registry.parent / "images" / "red.jpg")
    config = IngestConfig(release=str(two_releases), source=str(events), poll_seconds=0.1, max_polls=150,
                          follow_seconds=0)
    v1, v2 = (str(two_releases / "releases" / v / "state") for v in ("v1", "v2"))
    worker = threading.Thread(target=run_ingest, args=(config,), daemon=True)
    (events / "001.jsonl").write_bytes(listing("first", image, T0) + b"\n")
    worker.start()
    wait_for(lambda: registers_of(v1)[0].alive("first", False), 30, "the first listing in v1's journal")
    (events / "002.jsonl").write_bytes(listing("second", image, T0 + 1) + b"\n")
    wait_for(lambda: registers_of(v1)[0].alive("second", False), 30, "the second listing in v1's journal")
    (two_releases / "CURRENT").write_text("v2\n")  # a deploy
    (events / "003.jsonl").write_bytes(listing("third", image, T0 + 2) + b"\n")
    wait_for(lambda: registers_of(v2)[0].alive("third", False), 30, "the third listing in v2's journal")
    assert not registers_of(v1)[0].alive("third", False)
    # One load per release, not per poll: the second file reused v1's encoder.
    assert [Path(uri).parent.name for uri in loads] == ["v1", "v2"]


def test_a_dataflow_ingest_job_is_replaced_in_place_when_current_moves(two_releases, monkeypatch):
    """Dataflow cannot run here: `Pipeline.run` is intercepted (the launch), everything before it is real."""
    import apache_beam as beam

    from visrec.stages import dataflow

    launched = []

    class Running:
        state = "RUNNING"

    def launch(pipeline):
        appends = [t.transform.fn.state_uri for t in pipeline.transforms_stack[0].parts
                   if t.full_label == "AppendSegments"]
        launched.append((pipeline.options.get_all_options(), appends))
        (two_releases / "CURRENT").write_text("v2\n")  # a deploy while the first job runs
        return Running()

    monkeypatch.setattr(beam.Pipeline, "run", launch)
    monkeypatch.setattr(dataflow, "find_active_job", lambda project, region, name: None)
    # Beam's own test flags: no credentials looked up, no bucket checked.
    options = ["--project=visrec-test", "--region=us-central1", "--temp_location=gs://visrec-test/tmp", "--no_auth",
               "--dry_run=True"]
    config = IngestConfig(release=str(two_releases), source="projects/visrec-test/subscriptions/listing-events",
                          runner="DataflowRunner", max_polls=2, follow_seconds=0,
                          beam_options=[*options, "--job_name=visrec-ingest"])
    assert run_ingest(config) == 0
    (first, first_state), (second, second_state) = launched
    assert first["streaming"] and not first["update"] and second["streaming"] and second["update"]
    assert first["job_name"] == second["job_name"] == "visrec-ingest"
    assert first_state == [str(two_releases / "releases" / "v1" / "state")]
    assert second_state == [str(two_releases / "releases" / "v2" / "state")]

    with pytest.raises(UserError, match="job_name"):
        run_ingest(IngestConfig(release=str(two_releases), source=config.source, runner="DataflowRunner",
                                beam_options=options))
