"""The file journal under a real write failure: a file-size limit hit part-way through an append."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from visrec.online.entry import JournalEntry
from visrec.online.journal import FileJournal

# Runs with RLIMIT_FSIZE set (after the imports, so nothing else is written under it): appends
# until one fails, then prints the ids whose append returned and the errno of the one that failed.
_APPEND_UNTIL_FULL = """
import json, resource, sys
from pathlib import Path
from visrec.online.entry import JournalEntry
from visrec.online.journal import FileJournal

path, limit, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
journal = FileJournal(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
acknowledged = []
for n in range(10_000):
    entries = [JournalEntry("delete", "x" * 700, float(n), id=f"e{n}-{k}") for k in range(batch)]
    try:
        journal.append_many(entries)
    except OSError as exc:
        print(json.dumps({"acknowledged": acknowledged, "errno": exc.errno}))
        break
    acknowledged += [e.id for e in entries]
"""


@pytest.mark.parametrize("batch", [1, 3])  # 3: complete lines of the failed batch get written before the limit
def test_an_append_past_the_file_size_limit_leaves_nothing_behind(tmp_path, batch):
    path = tmp_path / "journal.jsonl"
    FileJournal(path).append(JournalEntry("delete", "a", 0.0, id="before"))
    limit = path.stat().st_size + 10_000  # not a multiple of a line: the failing write is cut mid-line
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONDONTWRITEBYTECODE": "1"}
    child = subprocess.run([sys.executable, "-c", _APPEND_UNTIL_FULL, str(path), str(limit), str(batch)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    outcome = json.loads(child.stdout)
    assert outcome["errno"] == errno.EFBIG and outcome["acknowledged"]
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data) <= limit
    assert [e.id for e in FileJournal(path).read_new()] == ["before"] + outcome["acknowledged"]
    # Without the limit the journal takes writes again, and a replay reads them.
    FileJournal(path).append(JournalEntry("delete", "b", 1.0, id="after"))
    assert [e.id for e in FileJournal(path).read_new()] == ["before"] + outcome["acknowledged"] + ["after"]
