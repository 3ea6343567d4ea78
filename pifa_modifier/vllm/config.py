"""``@register_quantization_config("pifa")``: vLLM's entry point into PIFA checkpoints.

Imports vLLM: import this module only through ``pifa_modifier.vllm.register``.
Written against vLLM 0.33 (``QuantizationConfig`` in
``vllm/model_executor/layers/quantization/base_config.py``); see docs/vllm.md.

How vLLM reaches it: ``ModelConfig._verify_quantization`` asks every registered
config's ``override_quantization_method`` about the checkpoint's
``quantization_config`` (PIFA checkpoints always carry a compressed-tensors
one); this class answers ``"pifa"`` when the HF config also has
``pifa_config``. ``from_config`` then receives only ``quantization_config``;
``maybe_update_config`` (called right after, before the model is built) reads
``pifa_config`` from the HF config.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from pifa_modifier.checkpoint.metadata import ModuleSpec
from pifa_modifier.vllm.layout import (
    DEFAULT_PACKED_MODULES,
    build_fused_layout,
    claim_checkpoint,
    delegate_quant_config,
    factor_quant,
    pifa_specs_of,
)

__all__ = ["PIFAConfig"]


def _as_dict(hf_config: Any) -> dict[str, Any]:
    """A plain dict view of an HF ``PretrainedConfig`` (or a dict) for the pure predicates."""
    if hf_config is None:
        return {}
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return dict(vars(hf_config))


@register_quantization_config("pifa")
class PIFAConfig(QuantizationConfig):
    """PIFA layers (pivot rows + coefficients) plus compressed-tensors for the rest."""

    def __init__(self, quant_cfg: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.quant_cfg = quant_cfg or None
        self.specs: dict[str, ModuleSpec] = {}
        self._renames: list[Any] = []
        delegate = delegate_quant_config(self.quant_cfg)
        self.delegate: QuantizationConfig | None = None
        if delegate is not None:
            from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (  # noqa: E501
                CompressedTensorsConfig,
            )

            self.delegate = CompressedTensorsConfig.from_config(dict(delegate))

    # ----------------------------------------------------------- identity
    def get_name(self) -> str:
        return "pifa"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        # the PIFA layers use plain torch GEMMs; a delegated scheme checks its own needs
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PIFAConfig:
        return cls(config)

    @classmethod
    def override_quantization_method(
        cls, hf_quant_cfg: dict[str, Any], user_quant: str | None, hf_config: Any = None
    ) -> str | None:
        """Claim checkpoints whose HF config has ``pifa_config`` (whatever the user passed)."""
        return claim_checkpoint(_as_dict(hf_config))

    def maybe_update_config(
        self, model_name: str, hf_config: Any = None, revision: str | None = None
    ) -> None:
        """Read ``pifa_config`` (``from_config`` only saw ``quantization_config``)."""
        self.specs = pifa_specs_of(_as_dict(hf_config))
        for mapper in self._renames:
            self._rename(mapper)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Follow the model's HF -> vLLM module renames (vLLM passes renames only)."""
        self._renames.append(hf_to_vllm_mapper)
        self._rename(hf_to_vllm_mapper)
        if self.delegate is not None:
            self.delegate.apply_vllm_mapper(hf_to_vllm_mapper)

    def _rename(self, mapper: Any) -> None:
        renamed = {}
        for name, spec in self.specs.items():
            new = mapper.map_name(name)
            renamed[name if new is None else new] = spec
        self.specs = renamed

    # ---------------------------------------------------------- per layer
    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        """PIFA method for layers listed in pifa_config; compressed-tensors (or none) otherwise."""
        packed = self.packed_modules_mapping or DEFAULT_PACKED_MODULES
        if isinstance(layer, LinearBase):
            layout = build_fused_layout(prefix, self.specs, packed)
            if layout is not None:
                from pifa_modifier.vllm.method import PIFALinearMethod

                quants = {factor_quant(self.quant_cfg, s.module) for s in layout.shards}
                if len(quants) != 1:
                    raise ValueError(f"{prefix}: fused PIFA shards are quantized differently")
                return PIFALinearMethod(layout, quants.pop())
        if self.delegate is not None:
            self.delegate.packed_modules_mapping = self.packed_modules_mapping
            return self.delegate.get_quant_method(layer, prefix)
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None
