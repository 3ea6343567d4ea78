"""``pifa inspect``: what a PIFA checkpoint holds, read from config.json alone.

No weights are loaded, so this is instant even for a large checkpoint: ranks and
shapes come from ``pifa_config``, each factor's storage format from the
compressed-tensors ``quantization_config`` groups that match ``N.pivot`` /
``N.coeff`` (the same matching compressed-tensors applies at load time).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.metadata import CONFIG_KEY, parse_pifa_config
from pifa_modifier.math import pifa_params

__all__ = ["LayerSummary", "format_summary", "summarize_checkpoint"]

DENSE = "dense"
# Every PIFA factor is an nn.Linear: class-name targets such as "Linear" match it.
_FACTOR = nn.Linear(1, 1, device="meta")


@dataclass(frozen=True)
class LayerSummary:
    """One PIFA layer as stored: shape, rank and the format of its two factors."""

    name: str
    out_features: int
    in_features: int
    rank: int
    bias: bool
    pivot_format: str
    coeff_format: str

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def kept_params(self) -> int:
        return pifa_params(self.out_features, self.in_features, self.rank)

    @property
    def density(self) -> float:
        return self.kept_params / self.dense_params

    @property
    def format(self) -> str:
        if self.pivot_format == self.coeff_format:
            return self.pivot_format
        return f"P {self.pivot_format}, C {self.coeff_format}"


def summarize_checkpoint(path: Path) -> list[LayerSummary]:
    """Per-layer summary of the PIFA checkpoint at ``path`` (config.json only)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if CONFIG_KEY not in config:
        raise PIFACheckpointError(
            f"{path} is not a PIFA checkpoint (config.json has no {CONFIG_KEY}); "
            "produce one with `pifa compress` or a recipe with PIFAModifier"
        )
    specs = parse_pifa_config(config[CONFIG_KEY])
    quant = config.get("quantization_config") or {}
    return [
        LayerSummary(
            name=name,
            out_features=spec.out_features,
            in_features=spec.in_features,
            rank=spec.rank,
            bias=spec.bias,
            pivot_format=factor_format(quant, f"{name}.pivot"),
            coeff_format=factor_format(quant, f"{name}.coeff"),
        )
        for name, spec in specs.items()
    ]


def factor_format(quant: Mapping[str, Any], name: str) -> str:
    """``dense`` or e.g. ``int4 g64`` for the factor Linear ``name`` under ``quant``."""
    from compressed_tensors.utils.match import is_match

    groups = quant.get("config_groups") or {}
    ignore = quant.get("ignore") or []
    for group in groups.values():
        if not isinstance(group, Mapping) or not group.get("targets"):
            continue
        if is_match(name, _FACTOR, group["targets"], ignore):
            return scheme_format(group)
    return DENSE


def scheme_format(scheme: Mapping[str, Any]) -> str:
    """Short name of a compressed-tensors scheme: ``int4 g64``, ``fp8 channel + a fp8``..."""
    weights = scheme.get("weights")
    if not weights:
        return DENSE
    text = _args_format(weights)
    activations = scheme.get("input_activations")
    if activations:
        text += f" + a {_args_format(activations)}"
    return text


def _args_format(args: Mapping[str, Any]) -> str:
    kind = {"int": "int", "float": "fp"}.get(str(args.get("type")), str(args.get("type")))
    text = f"{kind}{args.get('num_bits')}"
    strategy = args.get("strategy")
    if strategy in ("group", "tensor_group") and args.get("group_size"):
        text += f" g{args['group_size']}"
    elif strategy == "block" and args.get("block_structure"):
        text += f" block{args['block_structure']}"
    elif strategy:
        text += f" {strategy}"
    if args.get("symmetric") is False:
        text += " asym"
    if args.get("dynamic") is True:
        text += " dynamic"
    return text


def format_summary(path: Path, layers: list[LayerSummary]) -> str:
    """The table ``pifa inspect`` prints, with totals over all PIFA layers."""
    headers = ("module", "out x in", "rank", "density", "format")
    rows = [
        (
            layer.name,
            f"{layer.out_features}x{layer.in_features}",
            str(layer.rank),
            f"{layer.density:.4f}",
            layer.format,
        )
        for layer in layers
    ]
    dense = sum(layer.dense_params for layer in layers)
    kept = sum(layer.kept_params for layer in layers)
    formats = sorted({layer.format for layer in layers})
    total = (f"total: {len(layers)} layers", "", "", f"{kept / dense:.4f}", ", ".join(formats))
    widths = [max(len(r[i]) for r in [headers, *rows, total]) for i in range(len(headers))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in (2, 3) else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join(
        [
            f"{path}: PIFA checkpoint",
            line(headers),
            rule,
            *map(line, rows),
            rule,
            line(total),
            f"kept {kept:,} of {dense:,} parameters of the PIFA linears "
            "(embeddings, lm_head, norms and other layers not counted)",
        ]
    )
