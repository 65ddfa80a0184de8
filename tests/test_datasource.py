"""`visrec.data.datasource`: resolving an input to what a run reads, and the fingerprint that keys its data tasks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from visrec import cli

from visrec.core import io
from visrec.data.datasource import ResolveConfig, ResolvedInput, resolve_input
from visrec.core.errors import UserError

ROW = '{"item_id": "1", "title": "t", "image_uri": "a.jpg", "category": "c", "price": 1, "status": "on_sale", ' \
      '"listed_at": "2026-11-30T00:00:00Z"}\n'


def write(path: Path, text: str = ROW) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def partitioned(root: Path, complete: tuple[str, ...], incomplete: tuple[str, ...] = ()) -> Path:
    for value in complete + incomplete:
        write(root / f"dt={value}" / "part-0.jsonl", ROW * 2)
    for value in complete:
        write(root / f"dt={value}" / "_SUCCESS", "")
    return root


# ---------------------------------------------------------------- local files and prefixes


def test_a_file_is_itself(tmp_path):
    f = write(tmp_path / "listings.jsonl", ROW * 3)
    r = resolve_input(str(f))
    assert (r.requested, r.uri, r.partition, r.files, r.bytes) == (str(f), str(f), None, 1, len(ROW) * 3)
    assert r.fingerprint.startswith("sha256:") and len(r.fingerprint) >= len("sha256:") + 16
    assert r.newest_modified.endswith("+00:00") and r.skipped_partitions == ()
    assert resolve_input(str(f)) == r


def test_a_prefix_fingerprints_its_data_files_and_nothing_else(tmp_path):
    root = tmp_path / "listings"
    a, b = write(root / "a.jsonl"), write(root / "sub" / "b.jsonl")
    first = resolve_input(str(root))
    assert (first.uri, first.partition, first.files, first.bytes) == (str(root), None, 2, 2 * len(ROW))
    assert resolve_input(str(root)) == first  # unchanged -> same fingerprint
    assert resolve_input(str(root) + "/").fingerprint == first.fingerprint

    # Marker files, side files in a data format (`join-events`' `_rejected.jsonl`), images and
    # other objects are not data: the fingerprint does not move.
    write(root / "images" / "x.png", "png")
    write(root / "_SUCCESS", "")
    write(root / "_rejected.jsonl", "")
    write(root / ".part-1.jsonl.swp", ROW)
    write(root / "README.txt", "notes")
    assert resolve_input(str(root)).fingerprint == first.fingerprint

    # A new mtime (same bytes) is a new version.
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = resolve_input(str(root))
    assert touched.fingerprint != first.fingerprint and touched.bytes == first.bytes

    # A row appended, a file added or removed: all new fingerprints, none equal to another.
    with b.open("a") as fh:
        fh.write(ROW)
    appended = resolve_input(str(root))
    write(root / "c.jsonl")
    added = resolve_input(str(root))
    (root / "c.jsonl").unlink()
    removed = resolve_input(str(root))
    prints = [first.fingerprint, touched.fingerprint, appended.fingerprint, added.fingerprint]
    assert len(set(prints)) == 4 and (appended.files, added.files) == (2, 3)
    assert removed.fingerprint == appended.fingerprint  # back to the same files, versions and sizes


def test_the_same_files_elsewhere_are_another_input(tmp_path):
    for name in ("x", "y"):  # same relative path, size and mtime
        os.utime(write(tmp_path / name / "a.jsonl"), ns=(1_700_000_000_000_000_000,) * 2)
    assert resolve_input(str(tmp_path / "x")).fingerprint != resolve_input(str(tmp_path / "y")).fingerprint


def test_newest_complete_partition_is_chosen_and_newer_incomplete_ones_are_reported(tmp_path, caplog):
    root = partitioned(tmp_path / "logs", complete=("2026-11-29", "2026-11-30"), incomplete=("2026-12-01",))
    with caplog.at_level(logging.WARNING, logger="visrec.data.datasource"):
        r = resolve_input(str(root))
    assert (r.uri, r.partition, r.skipped_partitions, r.files) == (
        str(root / "dt=2026-11-30"), "2026-11-30", ("2026-12-01",), 1)
    assert "dt=2026-12-01" in caplog.text and "_SUCCESS" in caplog.text
    assert json.loads(json.dumps(r.as_dict())) == r.as_dict()
    assert r.as_dict()["skipped_partitions"] == ["2026-12-01"]

    write(root / "dt=2026-12-01" / "_SUCCESS", "")
    done = resolve_input(str(root))
    assert (done.uri, done.partition, done.skipped_partitions) == (str(root / "dt=2026-12-01"), "2026-12-01", ())
    assert done.fingerprint != r.fingerprint


def test_partitions_are_only_children_named_key_equals_value(tmp_path):
    root = partitioned(tmp_path / "logs", complete=("2026-11-30",))
    write(root / "other" / "x.jsonl")  # not a partition: ignored once partitions exist
    write(root / "hour=99" / "_SUCCESS", "")  # another key
    assert resolve_input(str(root)).partition == "2026-11-30"
    assert resolve_input(str(root / "dt=2026-11-30")).partition is None  # a partition given directly
    custom = partitioned(tmp_path / "hourly", complete=())
    write(custom / "hour=2026-11-30T03" / "p.csv", "item_id\n1\n")
    write(custom / "hour=2026-11-30T03" / "DONE", "")
    got = resolve_input(str(custom), ResolveConfig(partition_key="hour", done_marker="DONE"))
    assert got.partition == "2026-11-30T03"


def test_no_complete_partition_is_an_error_naming_what_was_found(tmp_path):
    root = partitioned(tmp_path / "logs", complete=(), incomplete=("2026-11-30", "2026-12-01"))
    with pytest.raises(UserError, match=r"no complete partition.*dt=2026-11-30, dt=2026-12-01.*_SUCCESS"):
        resolve_input(str(root))


def test_an_empty_marker_accepts_any_partition_holding_data(tmp_path):
    root = partitioned(tmp_path / "logs", complete=("2026-11-29",), incomplete=("2026-11-30",))
    write(root / "dt=2026-12-01" / "images" / "a.png", "png")  # no data file: still not a partition to read
    r = resolve_input(str(root), ResolveConfig(done_marker=""))
    assert (r.partition, r.skipped_partitions) == ("2026-11-30", ("2026-12-01",))
    empty = tmp_path / "empty"
    write(empty / "dt=2026-11-30" / "_SUCCESS", "")
    with pytest.raises(UserError, match=r"dt=2026-11-30; no data file"):
        resolve_input(str(empty), ResolveConfig(done_marker=""))


def test_nothing_to_read_is_an_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_input(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="no .jsonl"):
        resolve_input(str(tmp_path / "missing"))
    write(tmp_path / "imgs" / "a.png", "png")
    with pytest.raises(UserError, match="no .jsonl"):
        resolve_input(str(tmp_path / "imgs"))
    root = partitioned(tmp_path / "logs", complete=())
    write(root / "dt=2026-11-30" / "_SUCCESS", "")  # complete but empty: not silently the week before
    with pytest.raises(UserError, match="dt=2026-11-30"):
        resolve_input(str(root))


def test_config_rejects_names_that_cannot_work():
    for bad in ({"partition_key": ""}, {"partition_key": "a=b"}, {"done_marker": "a/_SUCCESS"},
                {"done_marker": "done.json"}):
        with pytest.raises(UserError):
            ResolveConfig(**bad)


# ---------------------------------------------------------------- io.file_versions / io.list_dirs (local)


def test_local_file_versions_and_dirs(tmp_path):
    f = write(tmp_path / "d" / "a.jsonl")
    write(tmp_path / "d" / "s" / "b.bin", "xyz")
    versions = io.file_versions(str(tmp_path / "d"))
    assert [v.uri for v in versions] == io.list_files(str(tmp_path / "d"))
    assert versions[0] == io.FileVersion(str(f), len(ROW), str(f.stat().st_mtime_ns), f.stat().st_mtime_ns / 1e9)
    assert io.file_versions(str(f)) == versions[:1] and io.file_versions(str(tmp_path / "none")) == []
    assert io.list_dirs(str(tmp_path / "d")) == [str(tmp_path / "d" / "s")]
    assert io.list_dirs(str(tmp_path / "none")) == [] and io.list_dirs(str(f)) == []


# ---------------------------------------------------------------- GCS through the emulator


def test_gcs_fingerprint_follows_objects_and_generations(gcs_emulator):
    root = f"gs://{gcs_emulator()}/listings"
    io.write_text(f"{root}/a.jsonl", ROW)
    io.write_text(f"{root}/sub/b.jsonl", ROW * 2)
    io.write_bytes(f"{root}/images/x.png", b"png")
    first = resolve_input(root)
    assert (first.uri, first.files, first.bytes) == (root, 2, 3 * len(ROW))
    assert first.newest_modified is not None
    assert resolve_input(root) == first and resolve_input(root + "/").fingerprint == first.fingerprint

    io.write_bytes(f"{root}/_SUCCESS", b"")
    io.write_bytes(f"{root}/images/y.png", b"png")
    assert resolve_input(root).fingerprint == first.fingerprint  # not data

    io.write_text(f"{root}/c.jsonl", ROW)
    added = resolve_input(root)
    assert added.files == 3 and added.fingerprint != first.fingerprint

    io.write_text(f"{root}/a.jsonl", ROW)  # identical bytes and size, a new generation
    rewritten = resolve_input(root)
    assert rewritten.bytes == added.bytes and rewritten.fingerprint not in (first.fingerprint, added.fingerprint)

    single = resolve_input(f"{root}/a.jsonl")
    assert (single.uri, single.files, single.bytes) == (f"{root}/a.jsonl", 1, len(ROW))
    with pytest.raises(UserError, match="not found"):
        resolve_input(f"{root}/nope.jsonl")


def test_gcs_newest_complete_partition(gcs_emulator):
    root = f"gs://{gcs_emulator()}/interactions"
    for value in ("2026-11-29", "2026-11-30", "2026-12-01"):
        io.write_text(f"{root}/dt={value}/part-0.jsonl", ROW)
    for value in ("2026-11-29", "2026-11-30"):
        io.write_bytes(f"{root}/dt={value}/_SUCCESS", b"")
    io.write_text(f"{root}-other/dt=2027-01-01/part-0.jsonl", ROW)  # a sibling prefix, not a child
    assert io.list_dirs(root) == [f"{root}/dt=2026-11-29", f"{root}/dt=2026-11-30", f"{root}/dt=2026-12-01"]
    r = resolve_input(root)
    assert (r.uri, r.partition, r.skipped_partitions, r.files) == (
        f"{root}/dt=2026-11-30", "2026-11-30", ("2026-12-01",), 1)
    io.write_bytes(f"{root}/dt=2026-12-01/_SUCCESS", b"")
    done = resolve_input(root)
    assert (done.partition, done.skipped_partitions) == ("2026-12-01", ()) and done.fingerprint != r.fingerprint


def test_gcs_file_versions_come_from_the_listing(gcs_emulator):
    root = f"gs://{gcs_emulator()}/v"
    io.write_bytes(f"{root}/a.jsonl", b"12345")
    [v] = io.file_versions(root)
    blob = io.gcs_client().bucket(root.split("/")[2]).get_blob("v/a.jsonl")
    assert (v.uri, v.size, v.version) == (f"{root}/a.jsonl", 5, str(blob.generation))
    assert io.file_versions(f"{root}/a.jsonl") == [v] and io.file_versions(f"{root}/none") == []


# ---------------------------------------------------------------- CLI


def test_cli_prints_one_json_object_per_input_and_writes_out(tmp_path, capsys):
    f = write(tmp_path / "listings.jsonl")
    logs = partitioned(tmp_path / "logs", complete=("2026-11-30",), incomplete=("2026-12-01",))
    out = tmp_path / "resolved.json"
    assert cli.main(["resolve-data", str(f), str(logs), "--out", str(out)]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["uri"] for p in printed] == [str(f), str(logs / "dt=2026-11-30")]
    assert printed[1]["skipped_partitions"] == ["2026-12-01"]
    assert json.loads(out.read_text()) == printed
    assert printed[0] == resolve_input(str(f)).as_dict()
    assert set(printed[0]) == set(ResolvedInput.__dataclass_fields__)

    assert cli.main(["resolve-data", str(logs), "--done-marker", ""]) == 0
    assert json.loads(capsys.readouterr().out)["partition"] == "2026-12-01"


def test_cli_defaults_come_from_the_config():
    parser = cli.build_parser()
    args = parser.parse_args(["resolve-data", "x"])
    assert (args.partition_key, args.done_marker) == (ResolveConfig.partition_key, ResolveConfig.done_marker)


def test_cli_missing_input_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["resolve-data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visrec resolve-data: error:") and "missing.jsonl" in err and "Traceback" not in err


def test_an_input_changing_between_its_two_listings_is_an_error(tmp_path, monkeypatch):
    root = tmp_path / "listings"
    write(root / "a.jsonl")
    real = io.file_versions

    def with_a_late_file(uri):
        write(root / "late.jsonl")  # lands after schema.input_files listed the prefix
        return real(uri)

    monkeypatch.setattr(io, "file_versions", with_a_late_file)
    with pytest.raises(UserError, match="changed while it was being resolved"):
        resolve_input(str(root))
