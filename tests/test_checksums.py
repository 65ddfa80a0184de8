"""Checksummed directories (`visrec.core.checksums`): the one manifest format the index and the release record."""

from __future__ import annotations

import pytest

from visrec.core.checksums import ChecksumMismatch, checksum_files, sha256_file, verify_checksums


def test_a_directory_verifies_against_its_checksums_and_a_bad_file_is_named(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0\1")
    (tmp_path / "journal.jsonl").write_text("{}\n")
    files = checksum_files(tmp_path, skip=lambda name: name == "journal.jsonl")
    assert files == {"a.txt": sha256_file(tmp_path / "a.txt"), "sub/b.bin": sha256_file(tmp_path / "sub" / "b.bin")}
    verify_checksums(tmp_path, files)
    (tmp_path / "journal.jsonl").write_text("changed\n")  # skipped files may change
    verify_checksums(tmp_path, files)
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0\2")
    with pytest.raises(ChecksumMismatch, match=r"sub/b.bin is corrupt \(sha256 mismatch\)") as corrupt:
        verify_checksums(tmp_path, files)
    assert corrupt.value.name == "sub/b.bin" and not corrupt.value.missing
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ChecksumMismatch, match="a.txt is missing") as missing:
        verify_checksums(tmp_path, files)
    assert missing.value.missing
