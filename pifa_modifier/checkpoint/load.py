"""Load PIFA checkpoints through transformers' compressed-tensors quantizer.

transformers picks the quantizer class from ``quantization_config.quant_method``
via ``AUTO_QUANTIZER_MAPPING``; ``install`` swaps in a subclass of the
compressed-tensors quantizer that, for checkpoints carrying ``pifa_config``:

1. ``update_tp_plan`` (the first hook that sees the config, and it runs before
   the weights files are resolved): removes the no-plugin guard;
2. ``_process_model_before_weight_loading`` (model on the meta device): checks
   the base architecture, swaps each listed ``nn.Linear`` for a ``PIFALinear``
   skeleton, lets compressed-tensors lay out the (packed) factor parameters,
   then checks every PIFA tensor in the safetensors headers against it;
3. ``_process_model_after_weight_loading``: rebuilds each layer's ``out_perm``
   (a non-persistent buffer transformers never fills) from the loaded
   ``pivot_idx``, attaches the PIFA save wrapper and, unless ``dequantize=True``
   was asked for, keeps int4/int8 factors packed at run time
   (``pifa_modifier.checkpoint.packed``: compressed-tensors would dequantize
   them on the first forward).

Checkpoints without ``pifa_config`` load exactly as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.quantizers import auto as quantizer_auto
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.guard import release_guard
from pifa_modifier.checkpoint.metadata import CONFIG_KEY, ModuleSpec, parse_pifa_config
from pifa_modifier.checkpoint.packed import keep_factors_packed
from pifa_modifier.checkpoint.save import attach_pifa_save
from pifa_modifier.checkpoint.tensors import (
    check_pifa_tensors,
    check_tensor_layout,
    index_safetensors,
)
from pifa_modifier.module import PIFALinear, validate_pivot_idx

__all__ = ["PIFACompressedTensorsHfQuantizer", "install"]

_QUANT_METHOD = "compressed-tensors"


class PIFACompressedTensorsHfQuantizer(CompressedTensorsHfQuantizer):
    """compressed-tensors quantizer that also rebuilds the PIFA layers named in ``pifa_config``."""

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._pifa_modules: list[str] = []

    def update_tp_plan(self, config: PretrainedConfig) -> PretrainedConfig:
        release_guard(config)
        return super().update_tp_plan(config)

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> Any:
        raw = getattr(model.config, CONFIG_KEY, None)
        specs = parse_pifa_config(raw) if raw is not None else {}
        files = [str(f) for f in kwargs.get("checkpoint_files") or []]
        if specs:
            if not files:
                raise PIFACheckpointError(
                    "PIFA checkpoints load from their safetensors files, not from a state_dict"
                )
            _check_base_modules(model, specs)
            _install_skeletons(model, specs)
        result = super()._process_model_before_weight_loading(model, **kwargs)
        if specs:
            index = index_safetensors(files)
            check_pifa_tensors(specs, index)
            shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
            check_tensor_layout(specs, shapes, index)
        else:  # PIFA tensors whose pifa_config was removed must not load as random Linears
            safetensors = [f for f in files if f.endswith(".safetensors")]
            check_pifa_tensors({}, index_safetensors(safetensors))
        self._pifa_modules = list(specs)
        return result

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> Any:
        result = super()._process_model_after_weight_loading(model, **kwargs)
        for name in self._pifa_modules:
            layer = model.get_submodule(name)
            validate_pivot_idx(layer.pivot_idx, layer.out_features, layer.rank)
            layer.refresh_permutation()
        if self._pifa_modules:
            attach_pifa_save(model)
            if not self.quantization_config.dequantize:
                keep_factors_packed(model)
        return result


def install() -> None:
    """Register the PIFA loader with transformers (idempotent)."""
    current = quantizer_auto.AUTO_QUANTIZER_MAPPING.get(_QUANT_METHOD)
    if current is PIFACompressedTensorsHfQuantizer:
        return
    if current is not CompressedTensorsHfQuantizer:
        raise RuntimeError(
            f"transformers' {_QUANT_METHOD} quantizer was already replaced by {current!r}; "
            "the PIFA loader would silently disable it, so it is not installed"
        )
    quantizer_auto.AUTO_QUANTIZER_MAPPING[_QUANT_METHOD] = PIFACompressedTensorsHfQuantizer


def _check_base_modules(model: nn.Module, specs: Mapping[str, ModuleSpec]) -> None:
    """Each listed module is an ``nn.Linear`` of the listed shape in the base architecture."""
    arch = type(model).__name__
    for name, spec in specs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise PIFACheckpointError(
                f"{name}: listed in pifa_config, but {arch} has no such module"
            ) from None
        if not isinstance(module, nn.Linear):
            raise PIFACheckpointError(
                f"{name}: listed in pifa_config, but in {arch} it is a "
                f"{type(module).__name__}, not an nn.Linear"
            )
        listed = (spec.in_features, spec.out_features, spec.bias)
        actual = (module.in_features, module.out_features, module.bias is not None)
        if listed != actual:
            raise PIFACheckpointError(
                f"{name}: pifa_config says (in_features, out_features, bias) = {listed}, "
                f"but {arch} built {actual} from config.json"
            )


def _install_skeletons(model: nn.Module, specs: Mapping[str, ModuleSpec]) -> None:
    """Replace each listed Linear by an empty ``PIFALinear`` on the Linear's device and dtype."""
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight = getattr(parent, child).weight
        # PIFALinear.__init__ derives out_perm with nonzero(), which the meta device cannot
        # run: build it on the CPU without initialising (torch.empty only), then move it.
        with no_init_weights():
            layer = PIFALinear(
                spec.in_features,
                spec.out_features,
                spec.rank,
                bias=spec.bias,
                device="cpu",
                dtype=weight.dtype,
            )
        setattr(parent, child, layer.to(weight.device))
