"""Which linears PIFAModifier compresses, inside which decoder layer, at which rank.

Everything here runs in ``on_initialize`` before any calibration, so every
configuration error surfaces before expensive work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from compressed_tensors.utils import match_named_modules
from torch import nn

from pifa_modifier.math import density_of_rank, rank_for_density

__all__ = ["TargetPlan", "plan_targets", "find_decoder_layers", "density_for"]

_ATTN = re.compile(r"(^|\.)(self_attn|attn|attention)\.")
_MLP = re.compile(r"(^|\.)(mlp|feed_forward|ffn)\.")


@dataclass(frozen=True)
class TargetPlan:
    """One linear to compress: its name, enclosing decoder layer, and rank."""

    name: str
    layer_name: str
    out_features: int
    in_features: int
    rank: int

    @property
    def density(self) -> float:
        return density_of_rank(self.out_features, self.in_features, self.rank)


def find_decoder_layers(model: nn.Module, sequential_targets: list[str]) -> dict[str, nn.Module]:
    """Decoder layers (the sequential pipeline's targets), by name, in model order."""
    layers = dict(match_named_modules(model, sequential_targets))
    if not layers:
        raise ValueError(
            f"no decoder layers match the sequential targets {sequential_targets}: "
            "pass `sequential_targets` (e.g. ['LlamaDecoderLayer']) to oneshot"
        )
    return layers


def density_for(
    name: str,
    density: float,
    attn_density: float | None,
    mlp_density: float | None,
    densities: dict[str, float],
) -> float:
    """Density of one module: explicit pattern > attention/MLP override > global."""
    for pattern, value in densities.items():
        if _pattern_matches(pattern, name):
            return value
    if attn_density is not None and _ATTN.search(name):
        return attn_density
    if mlp_density is not None and _MLP.search(name):
        return mlp_density
    return density


def plan_targets(
    model: nn.Module,
    targets: list[str],
    ignore: list[str],
    layers: dict[str, nn.Module],
    *,
    density: float,
    attn_density: float | None,
    mlp_density: float | None,
    densities: dict[str, float],
    rank_multiple: int,
) -> list[TargetPlan]:
    """Resolve targets to ranks; raise one error listing every unusable module."""
    matched = list(match_named_modules(model, targets, ignore))
    if not matched:
        raise ValueError(
            f"PIFAModifier targets {targets} (ignore {ignore}) match no module of "
            f"{type(model).__name__}; use class names such as 'Linear' or 're:' patterns"
        )
    plans: list[TargetPlan] = []
    problems: list[str] = []
    for name, module in matched:
        if type(module) is not nn.Linear:
            problems.append(
                f"{name} is a {type(module).__name__}; PIFA compresses nn.Linear only "
                "(narrow `targets` or add it to `ignore`)"
            )
            continue
        if not torch.isfinite(module.weight).all():
            problems.append(f"{name} has NaN or Inf weights; fix the checkpoint first")
            continue
        layer_name = _enclosing_layer(name, layers)
        if layer_name is None:
            problems.append(
                f"{name} lies outside every decoder layer; PIFAModifier calibrates layer "
                "by layer (add it to `ignore`)"
            )
            continue
        value = density_for(name, density, attn_density, mlp_density, densities)
        try:
            rank = rank_for_density(module.out_features, module.in_features, value, rank_multiple)
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        plans.append(TargetPlan(name, layer_name, module.out_features, module.in_features, rank))
    if problems:
        raise ValueError("PIFAModifier cannot compress:\n  - " + "\n  - ".join(problems))
    return plans


def _enclosing_layer(name: str, layers: dict[str, nn.Module]) -> str | None:
    for layer_name in layers:
        if name.startswith(layer_name + "."):
            return layer_name
    return None


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)
