"""Pipeline run configuration files (`configs/local.yaml`, `configs/vertex.yaml`).

A file has a `parameters:` mapping (the pipeline's parameters) and, for Vertex AI,
a `vertex:` mapping (project, region, pipeline root, service account, ...). Flags
given on the command line override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from visrec import io
from visrec.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def load_run_config(uri: str | None, default_name: str) -> dict[str, Any]:
    """The parsed config file (`configs/<default_name>` when `uri` is None), with both sections present."""
    if uri is None:
        path = CONFIG_DIR / default_name
        text = path.read_text() if path.exists() else ""
    else:
        try:
            text = io.read_text(uri)
        except FileNotFoundError:
            raise UserError(f"config file not found: {uri}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config {uri or default_name} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {uri or default_name} must be a mapping")
    unknown = set(data) - {"parameters", "vertex"}
    if unknown:
        raise UserError(f"config {uri or default_name}: unknown sections {sorted(unknown)}")
    data.setdefault("parameters", {})
    data.setdefault("vertex", {})
    return data


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`--param key=value` flags -> {key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--param expects key=value, got {pair!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):
            # YAML 1.1 reads `1e-5` as a string; a learning rate is meant.
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key.strip()] = parsed
    return out
