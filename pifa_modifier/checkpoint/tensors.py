"""Check a checkpoint's PIFA tensors against ``pifa_config`` from the safetensors headers.

transformers does not compare tensor shapes while a quantizer is active and
only warns about missing or unexpected tensors, so a damaged checkpoint would
load as a silently wrong model. These checks read headers (and the few tiny
``pivot_idx`` / ``weight_shape`` tensors) before any weight is loaded, and
raise ``PIFACheckpointError`` naming the module and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.metadata import ModuleSpec
from pifa_modifier.module import validate_pivot_idx

__all__ = [
    "TensorInfo",
    "check_pifa_tensors",
    "check_tensor_layout",
    "index_safetensors",
    "safetensors_files",
]

_SAFE_WEIGHTS = "model.safetensors"
_SAFE_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and its header shape / dtype (safetensors dtype code, e.g. ``I32``)."""

    file: str
    shape: tuple[int, ...]
    dtype: str


def safetensors_files(directory: str | Path) -> list[str]:
    """The weight files of a local checkpoint directory (single file or sharded)."""
    directory = Path(directory)
    if (directory / _SAFE_INDEX).is_file():
        weight_map = json.loads((directory / _SAFE_INDEX).read_text())["weight_map"]
        return [str(directory / name) for name in sorted(set(weight_map.values()))]
    if (directory / _SAFE_WEIGHTS).is_file():
        return [str(directory / _SAFE_WEIGHTS)]
    raise PIFACheckpointError(f"{directory} has no {_SAFE_WEIGHTS} or {_SAFE_INDEX}")


def index_safetensors(files: Iterable[str]) -> dict[str, TensorInfo]:
    """Map tensor name -> ``TensorInfo`` by reading only the safetensors headers."""
    index: dict[str, TensorInfo] = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            raise PIFACheckpointError(f"PIFA checkpoints are safetensors only, got {file}")
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                index[key] = TensorInfo(str(file), tuple(tensor.get_shape()), tensor.get_dtype())
    return index


def check_pifa_tensors(specs: Mapping[str, ModuleSpec], index: Mapping[str, TensorInfo]) -> None:
    """Every PIFA tensor exists with the shapes ``specs`` imply; no PIFA tensor is unlisted."""
    unlisted = sorted(
        key.removesuffix(".pivot_idx")
        for key in index
        if key.endswith(".pivot_idx") and key.removesuffix(".pivot_idx") not in specs
    )
    if unlisted:
        others = f" (nor for {len(unlisted) - 1} other modules)" if len(unlisted) > 1 else ""
        raise PIFACheckpointError(
            f"{unlisted[0]}: the checkpoint stores PIFA tensors for this module but "
            f"pifa_config has no entry for it{others}"
        )
    for name, spec in specs.items():
        _check_pivot_idx(name, spec, index)
        _check_factor(name, "pivot", (spec.rank, spec.in_features), spec, index)
        _check_factor(name, "coeff", (spec.out_features - spec.rank, spec.rank), spec, index)
        _check_bias(name, spec, index)


def check_tensor_layout(
    names: Iterable[str],
    expected: Mapping[str, tuple[int, ...]],
    index: Mapping[str, TensorInfo],
) -> None:
    """Tensors under each PIFA module are exactly the model's, with the model's shapes.

    ``expected`` maps the skeleton's state-dict keys to shapes after compressed-tensors
    laid out its (possibly packed) parameters, so this covers quantized formats
    without knowing them.
    """
    for name in names:
        prefix = name + "."
        want = {k: tuple(v) for k, v in expected.items() if k.startswith(prefix)}
        have = {k: info.shape for k, info in index.items() if k.startswith(prefix)}
        if missing := sorted(want.keys() - have.keys()):
            raise PIFACheckpointError(f"{name}: the checkpoint lacks tensors {missing}")
        if unexpected := sorted(have.keys() - want.keys()):
            raise PIFACheckpointError(
                f"{name}: the checkpoint has tensors {unexpected} that a PIFA layer with this "
                "quantization_config does not have"
            )
        for key, shape in want.items():
            if have[key] != shape:
                raise PIFACheckpointError(
                    f"{key}: shape {list(have[key])} in the checkpoint, but pifa_config and "
                    f"quantization_config imply {list(shape)}"
                )


def _check_pivot_idx(name: str, spec: ModuleSpec, index: Mapping[str, TensorInfo]) -> None:
    key = f"{name}.pivot_idx"
    info = _require(key, name, index)
    if info.dtype != "I32":
        raise PIFACheckpointError(f"{key}: dtype must be int32 (I32), got {info.dtype}")
    if info.shape != (spec.rank,):
        raise PIFACheckpointError(
            f"{key}: shape {list(info.shape)} does not match rank {spec.rank} in pifa_config"
        )
    try:
        validate_pivot_idx(_read(info, key), spec.out_features, spec.rank)
    except ValueError as err:
        raise PIFACheckpointError(f"{key}: {err}") from err


def _check_factor(
    name: str,
    factor: str,
    shape: tuple[int, int],
    spec: ModuleSpec,
    index: Mapping[str, TensorInfo],
) -> None:
    dense, packed_shape = f"{name}.{factor}.weight", f"{name}.{factor}.weight_shape"
    if dense in index:
        found = index[dense].shape
    elif packed_shape in index:  # compressed-tensors packed formats store the logical shape
        found = tuple(int(v) for v in _read(index[packed_shape], packed_shape).tolist())
    else:
        raise PIFACheckpointError(
            f"{name}: the checkpoint has no {factor} weight ({dense} or {packed_shape})"
        )
    if found != shape:
        raise PIFACheckpointError(
            f"{name}: {factor} weight is {list(found)}, but pifa_config (rank {spec.rank}, "
            f"{spec.out_features}x{spec.in_features}) implies {list(shape)}"
        )


def _check_bias(name: str, spec: ModuleSpec, index: Mapping[str, TensorInfo]) -> None:
    key = f"{name}.bias"
    if not spec.bias:
        if key in index:
            raise PIFACheckpointError(f"{key}: present but pifa_config says bias is false")
        return
    info = _require(key, name, index)
    if info.shape != (spec.out_features,):
        raise PIFACheckpointError(
            f"{key}: shape {list(info.shape)}, expected [{spec.out_features}]"
        )


def _require(key: str, name: str, index: Mapping[str, TensorInfo]) -> TensorInfo:
    if key not in index:
        raise PIFACheckpointError(f"{name}: the checkpoint lacks tensor {key}")
    return index[key]


def _read(info: TensorInfo, key: str) -> torch.Tensor:
    with safe_open(info.file, framework="pt") as handle:
        return handle.get_tensor(key)
