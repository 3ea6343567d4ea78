"""``export_dense``: turn a PIFA checkpoint into a plain dense one any runtime can load.

W is not stored, so a dense fallback needs this explicit conversion: each
``PIFALinear`` becomes the ``nn.Linear`` with ``W[pivot_idx] = P``,
``W[other rows] = C P`` (computed in fp32, quantized factors dequantized
first), and the result is saved without ``pifa_config`` or
``quantization_config``. The dense model computes the same function up to
floating-point rounding (``C P`` is formed once instead of per token).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CompressedTensorsConfig,
    PreTrainedModel,
)

from pifa_modifier.checkpoint.atomic import atomic_directory, copy_missing_files
from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.load import install
from pifa_modifier.checkpoint.metadata import CONFIG_KEY
from pifa_modifier.module import PIFALinear

__all__ = ["export_dense"]


def export_dense(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Write the dense equivalent of the PIFA checkpoint ``src_dir`` to ``dst_dir`` (atomically).

    Files of ``src_dir`` that are neither weights nor written by the save
    (tokenizer, recipe) are copied along.
    """
    install()
    config = AutoConfig.from_pretrained(src_dir)
    if getattr(config, CONFIG_KEY, None) is None:
        raise PIFACheckpointError(
            f"{src_dir}: config.json has no {CONFIG_KEY}; it is not a PIFA checkpoint"
        )
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, config=config, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, module in list(model.named_modules()):
        if isinstance(module, PIFALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.to_linear())
    delattr(model.config, CONFIG_KEY)
    if getattr(model.config, "quantization_config", None) is not None:
        raise PIFACheckpointError(
            f"{src_dir}: quantized modules outside the PIFA layers remain after dequantizing; "
            "a dense export cannot represent them"
        )
    with atomic_directory(dst_dir) as tmp:
        # the class method, not the PIFA wrapper the loader attached to this instance
        PreTrainedModel.save_pretrained(model, tmp)
        copy_missing_files(Path(src_dir), tmp)
