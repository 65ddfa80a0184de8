"""Where a training run writes: atomic checkpoints that resume bit-for-bit, models, RNG state.

Each checkpoint directory is complete only once its marker file is written, so a run
killed mid-write never resumes from a half checkpoint; outputs go to a local or gs://
directory through `RunOutput`.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from visrec.core import io


CHECKPOINT_DIR = "checkpoints"


CHECKPOINT_MARKER = "COMPLETE"  # written last: a checkpoint without it is incomplete and ignored


STATE_FILE = "state.pt"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(out_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `out_dir/checkpoints` as (step, uri), oldest first.

    A checkpoint is complete when its marker exists; a directory a crash left
    half-written (no marker, or a temp name) is never picked.
    """
    found = []
    for marker in io.list_files(io.join(out_dir, CHECKPOINT_DIR), pattern=CHECKPOINT_MARKER):
        ckpt = io.parent(marker)
        m = re.fullmatch(r"step-(\d+)", ckpt.rstrip("/").rsplit("/", 1)[-1])
        if m and io.parent(ckpt).rstrip("/") == io.join(out_dir, CHECKPOINT_DIR).rstrip("/"):
            found.append((int(m.group(1)), ckpt))
    return sorted(found)


class RunOutput:
    """The output directory: written locally (the directory itself, or a temp dir for `gs://`),
    each finished piece published to `gs://` right away so a preempted job loses nothing."""

    def __init__(self, uri: str):
        self.uri = uri
        self.remote = io.is_gcs(uri)
        self.local = Path(tempfile.mkdtemp(prefix="visrec-train-")) if self.remote else Path(uri)
        self.local.mkdir(parents=True, exist_ok=True)
        for stale in (self.local / CHECKPOINT_DIR).glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def replace_dir(self, name: str, write: Callable[[Path], None]) -> None:
        """Write directory `name` via `write(tmp)`, then swap it in by rename (never half-written)."""
        tmp = self.local / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        write(tmp)
        old = self.local / f".old-{name}"
        target = self.local / name
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
        if self.remote:
            io.upload_dir(target, io.join(self.uri, name))

    def write_checkpoint(self, state: dict, step: int, keep: int) -> None:
        name = checkpoint_name(step)
        root = self.local / CHECKPOINT_DIR
        tmp = root / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / STATE_FILE)
        (tmp / CHECKPOINT_MARKER).write_text(f"{step}\n")
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if self.remote:  # GCS has no rename: the marker goes up last, after the state it vouches for
            remote = io.join(self.uri, CHECKPOINT_DIR, name)
            io.upload_file(final / STATE_FILE, io.join(remote, STATE_FILE))
            io.upload_file(final / CHECKPOINT_MARKER, io.join(remote, CHECKPOINT_MARKER))
            shutil.rmtree(final)  # the local copy of a remote run is only a staging area
        for _, old in list_checkpoints(self.uri)[:-keep] if keep > 0 else []:
            io.remove_tree(old)

    def write_file(self, name: str, data: bytes) -> None:
        io.write_bytes(io.join(self.uri, name), data)  # locally `self.local` is `uri` itself

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def load_state(uri: str) -> dict:
    # Our own checkpoint (RNG states are plain Python/NumPy objects), hence weights_only=False.
    import io as bytes_io

    return torch.load(bytes_io.BytesIO(io.read_bytes(io.join(uri, STATE_FILE))), map_location="cpu",
                      weights_only=False)


def rng_state(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def model_writer(model: Any, processor: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        model.save_pretrained(path)
        processor.save_pretrained(path)

    return write
