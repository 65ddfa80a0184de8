"""`visrec.core.io` against a real `gcp-storage-emulator` server: the `gs://` half of every stage's storage."""

from __future__ import annotations

import pytest

from visrec.core import io
from visrec.core.errors import UserError


def test_uri_helpers():
    assert io.join("gs://b/a/", "x", "/y.json") == "gs://b/a/x/y.json"
    assert io.parent("gs://b/a/x.json") == "gs://b/a"
    assert io.split_gcs("gs://b/a/b") == ("b", "a/b")
    with pytest.raises(UserError):
        io.split_gcs("gs:///x")


def test_read_write_exists(gcs_emulator):
    root = f"gs://{gcs_emulator()}/run"
    io.write_bytes(f"{root}/a.bin", b"\x00\x01")
    io.write_text(f"{root}/t/é.txt", "日本語")
    io.write_json(f"{root}/m.json", {"k": [1, 2], "名前": "x"})
    assert io.read_bytes(f"{root}/a.bin") == b"\x00\x01"
    assert io.read_text(f"{root}/t/é.txt") == "日本語"
    assert io.read_json(f"{root}/m.json") == {"k": [1, 2], "名前": "x"}
    assert io.exists(f"{root}/a.bin") and io.exists(f"{root}/t") and not io.exists(f"{root}/nope")
    with pytest.raises(FileNotFoundError):
        io.read_bytes(f"{root}/nope")
    io.write_bytes(f"{root}/a.bin", b"new")  # overwrite
    assert io.read_bytes(f"{root}/a.bin") == b"new"


def test_list_files_is_recursive_sorted_and_filtered(gcs_emulator):
    root = f"gs://{gcs_emulator()}/ds"
    for name in ("data-1.parquet", "data-0.parquet", "sub/data-2.parquet", "stats.json"):
        io.write_bytes(f"{root}/{name}", b"x")
    io.write_bytes(f"{root}-sibling/data-9.parquet", b"x")  # same prefix, another "directory"
    assert io.list_files(root, "data-*.parquet") == [f"{root}/data-0.parquet", f"{root}/data-1.parquet",
                                                     f"{root}/sub/data-2.parquet"]
    assert io.list_files(root + "/") == sorted(io.list_files(root))
    # (`limit` is not checked here: the emulator ignores `maxResults`, real GCS honours it.)
    assert io.list_files(f"{root}/empty") == []


def test_upload_download_and_context_managers(gcs_emulator, tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "nested" / "b.bin").write_bytes(b"\xff" * 1000)
    uri = f"gs://{gcs_emulator()}/copy"
    io.upload_dir(src, uri)
    assert io.list_files(uri) == [f"{uri}/a.txt", f"{uri}/nested/b.bin"]

    dest = io.download_dir(uri, tmp_path / "dest")
    assert (dest / "nested" / "b.bin").read_bytes() == b"\xff" * 1000
    # `exclude` skips a subtree the same way from gs:// and from a local directory.
    for source, name in ((uri, "from-gcs"), (str(src), "from-local")):
        partial = io.download_dir(source, tmp_path / name, exclude=("nested/",))
        assert sorted(p.relative_to(partial).as_posix() for p in partial.rglob("*")) == ["a.txt"]
    with io.local_dir(uri) as local:
        assert (local / "a.txt").read_text() == "a"
    assert not local.exists()  # the temporary download is cleaned up

    with io.output_dir(f"{uri}-out") as out:
        (out / "result.json").write_text("{}")
    assert io.read_text(f"{uri}-out/result.json") == "{}"

    path = io.local_file(f"{uri}/nested/b.bin", suffix=".bin")
    try:
        assert path.suffix == ".bin" and path.read_bytes() == b"\xff" * 1000
    finally:
        path.unlink()


def test_failed_output_block_uploads_nothing(gcs_emulator):
    uri = f"gs://{gcs_emulator()}/failed"
    with pytest.raises(RuntimeError):
        with io.output_dir(uri) as out:
            (out / "half.json").write_text("{")
            raise RuntimeError("stage crashed")
    assert io.list_files(uri) == []
