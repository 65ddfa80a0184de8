"""Pipeline run configuration files (`visrec/configs/local.yaml`, `visrec/configs/vertex.yaml`).

A file has a `parameters:` mapping (the pipeline's parameters) and, for Vertex AI,
a `vertex:` mapping (project, region, pipeline root, service account, ...) and an
`ingest:` mapping (`visrec ingest --config`: the listing-events job beside the pipeline).
Flags given on the command line override the file.
"""

from __future__ import annotations

from typing import Any

import yaml

from visrec.core import io
from visrec.core.errors import UserError

SECTIONS = ("parameters", "vertex", "ingest")


def load_run_config(uri: str | None, default_name: str) -> dict[str, Any]:
    """The parsed config file (`visrec/configs/<default_name>` when `uri` is None), with every section present."""
    if uri is None:
        text = io.packaged_config(default_name)
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
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise UserError(f"config {uri or default_name}: unknown sections {sorted(unknown)}")
    for section in SECTIONS:
        data.setdefault(section, {})
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


# ---- stage defaults as KFP parameters ----------------------------------------------------------
# KFP parameters cannot be None: an unset optional setting travels as its type's "unset" value
# ("" for strings, 0 for numbers, or the `kfp_unset` a field's metadata names when 0 means
# something, as `warmup_steps=0` does). These two functions are the only translation, so a
# pipeline or component default is always its stage dataclass's default.


def _unset_value(config_cls: type, name: str) -> Any:
    import dataclasses
    import typing

    spec = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    if "kfp_unset" in spec.metadata:
        return spec.metadata["kfp_unset"]
    kind = typing.get_type_hints(config_cls)[name]
    args = set(typing.get_args(kind)) - {type(None)}
    return "" if str in args else 0


def kfp_default(config_cls: type, name: str) -> Any:
    """The default of `config_cls.name` as a KFP parameter default (None -> its unset value)."""
    from visrec.core.defaults import field_defaults

    value = field_defaults(config_cls)[name]  # KeyError for a required field
    return _unset_value(config_cls, name) if value is None else value


def from_kfp(config_cls: type, **values: Any) -> dict[str, Any]:
    """KFP parameter values for fields of `config_cls`, with unset values turned back into None."""
    return {name: None if value == _unset_value(config_cls, name) and _optional(config_cls, name) else value
            for name, value in values.items()}


def _optional(config_cls: type, name: str) -> bool:
    import typing

    return type(None) in typing.get_args(typing.get_type_hints(config_cls)[name])
