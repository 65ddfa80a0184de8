"""The defaults of a config dataclass, read from the dataclass itself.

Each stage's config dataclass is the only place its defaults are written; the CLI flags
(`visrec/cli`) and the pipeline parameters (`visrec.orchestration.pipeline_config.kfp_default`)
read them through `field_defaults`, so a default changed there changes everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def field_defaults(config_cls: type) -> dict[str, Any]:
    """Field name -> default, for every field of dataclass `config_cls` that has one (a fresh value
    for a `default_factory`); required fields are absent."""
    out: dict[str, Any] = {}
    for spec in dataclasses.fields(config_cls):
        if spec.default is not dataclasses.MISSING:
            out[spec.name] = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            out[spec.name] = spec.default_factory()
    return out
