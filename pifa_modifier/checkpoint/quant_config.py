"""compressed-tensors ``quantization_config`` for PIFA checkpoints whose factors are not quantized.

transformers runs its compressed-tensors quantizer (and so our PIFA loader)
only when config.json has a compressed-tensors ``quantization_config``. A
quantized model gets one from llmcompressor; an unquantized PIFA model gets
this one: a single group over the factors with ``weights: null``, format
``dense``, status ``frozen`` (what llmcompressor writes for dense saves).
"""

from __future__ import annotations

from pathlib import Path

from compressed_tensors import ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
)

__all__ = ["FACTOR_TARGET", "write_dense_quantization_config"]

# compressed-tensors target matching the two nn.Linear children of every PIFALinear.
FACTOR_TARGET = r"re:.*\.(pivot|coeff)$"


def write_dense_quantization_config(save_dir: str | Path) -> None:
    """Write the no-quantization ``quantization_config`` into ``save_dir/config.json``."""
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=[FACTOR_TARGET])},
        format=CompressionFormat.dense.value,
        quantization_status=QuantizationStatus.FROZEN,
    )
    # the same writer llmcompressor uses, so both kinds of checkpoint look alike
    ModelCompressor(quantization_config=config).update_config(str(save_dir))
