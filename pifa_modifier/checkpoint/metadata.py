"""``pifa_config``: the top-level config.json entry naming the Linears stored in PIFA form.

Schema (``format_version`` 1, specified in docs/checkpoint-format.md)::

    "pifa_config": {
      "format": "pifa",
      "format_version": 1,
      "modules": {
        "model.layers.0.self_attn.q_proj":
            {"in_features": 4096, "out_features": 4096, "rank": 2048, "bias": false},
        ...
      }
    }

Module names are paths in the transformers model (``model.named_modules()``),
which are also the tensor-name prefixes in the safetensors files. The entry is
parsed strictly: a typo must fail the load, not silently load a wrong model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.module import PIFALinear

__all__ = [
    "CONFIG_KEY",
    "FORMAT",
    "FORMAT_VERSION",
    "ModuleSpec",
    "build_pifa_config",
    "parse_pifa_config",
]

CONFIG_KEY = "pifa_config"
FORMAT = "pifa"
FORMAT_VERSION = 1
_ENTRY_FIELDS = ("in_features", "out_features", "rank", "bias")


@dataclass(frozen=True)
class ModuleSpec:
    """Shape of one PIFA layer: ``W`` is ``out_features x in_features`` of rank ``rank``."""

    in_features: int
    out_features: int
    rank: int
    bias: bool


def build_pifa_config(model: nn.Module) -> dict[str, Any]:
    """The ``pifa_config`` dict describing every ``PIFALinear`` in ``model``."""
    modules = {
        name: asdict(ModuleSpec(m.in_features, m.out_features, m.rank, m.bias is not None))
        for name, m in model.named_modules()
        if isinstance(m, PIFALinear)
    }
    if not modules:
        raise PIFACheckpointError(
            f"{type(model).__name__} has no PIFALinear modules: there is nothing to save in "
            "PIFA format (swap Linears for PIFALinear first, e.g. with PIFAModifier)"
        )
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": modules}


def parse_pifa_config(raw: Any) -> dict[str, ModuleSpec]:
    """Validate a ``pifa_config`` value read from config.json; map module name -> spec."""
    if not isinstance(raw, Mapping):
        raise PIFACheckpointError(f"pifa_config must be a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise PIFACheckpointError(
            f"pifa_config.format must be {FORMAT!r}, got {raw.get('format')!r}"
        )
    version = raw.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise PIFACheckpointError(
            f"pifa_config.format_version {version!r} is not supported: this pifa_modifier "
            f"reads format_version {FORMAT_VERSION} (upgrade pifa-modifier for newer checkpoints)"
        )
    unknown = set(raw) - {"format", "format_version", "modules"}
    if unknown:
        raise PIFACheckpointError(f"pifa_config has unknown keys {sorted(unknown)}")
    modules = raw.get("modules")
    if not isinstance(modules, Mapping) or not modules:
        raise PIFACheckpointError("pifa_config.modules must be a non-empty JSON object")
    return {_check_name(name): _parse_entry(name, entry) for name, entry in modules.items()}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
        raise PIFACheckpointError(f"pifa_config.modules: {name!r} is not a module path")
    return name


def _parse_entry(name: str, entry: Any) -> ModuleSpec:
    where = f"pifa_config.modules[{name!r}]"
    if not isinstance(entry, Mapping):
        raise PIFACheckpointError(f"{where} must be a JSON object, got {type(entry).__name__}")
    missing = [k for k in _ENTRY_FIELDS if k not in entry]
    if missing:
        raise PIFACheckpointError(f"{where} lacks {missing}")
    unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
    if unknown:
        raise PIFACheckpointError(f"{where} has unknown keys {unknown}")
    for key in ("in_features", "out_features", "rank"):
        value = entry[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PIFACheckpointError(f"{where}.{key} must be a positive integer, got {value!r}")
    if not isinstance(entry["bias"], bool):
        raise PIFACheckpointError(f"{where}.bias must be true or false, got {entry['bias']!r}")
    spec = ModuleSpec(**{k: entry[k] for k in _ENTRY_FIELDS})
    if not (spec.rank < spec.out_features and spec.rank <= spec.in_features):
        raise PIFACheckpointError(
            f"{where}: rank {spec.rank} is invalid for a {spec.out_features}x{spec.in_features} "
            "layer (needs rank < out_features and rank <= in_features)"
        )
    return spec
