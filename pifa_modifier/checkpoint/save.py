"""Route every ``save_pretrained`` of a PIFA model through an atomic, PIFA-aware writer.

llmcompressor wraps ``model.save_pretrained`` (``modify_save_pretrained``, called
by ``oneshot``'s pre-processing) and, inside that wrapper, rewrites config.json
twice after transformers saved it: ``resave_config`` (from the original
model's config, dropping unknown keys) and ``ModelCompressor.update_config``.
Our wrapper must therefore be the outermost one: ``attach_pifa_save`` installs
llmcompressor's wrapper first if it is missing, wraps it, and marks the result
``_overridden`` so a later ``modify_save_pretrained`` leaves it in place.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from compressed_tensors.distributed import is_source_process
from compressed_tensors.quantization import QuantizationConfig
from llmcompressor.transformers.compression.compressed_tensors_utils import (
    modify_save_pretrained,
)
from transformers import PreTrainedModel

from pifa_modifier.checkpoint.atomic import atomic_directory
from pifa_modifier.checkpoint.errors import PIFACheckpointError
from pifa_modifier.checkpoint.guard import GUARD_KEY, GUARD_VALUE
from pifa_modifier.checkpoint.metadata import CONFIG_KEY, build_pifa_config, parse_pifa_config
from pifa_modifier.checkpoint.packed import keep_factors_packed, keeps_factors_packed
from pifa_modifier.checkpoint.quant_config import write_dense_quantization_config
from pifa_modifier.checkpoint.recipe_file import sanitize_recipe_file
from pifa_modifier.checkpoint.tensors import (
    check_pifa_tensors,
    index_safetensors,
    safetensors_files,
)
from pifa_modifier.module import PIFALinear

__all__ = ["attach_pifa_save"]

_MARK = "_pifa_save"
_QUANT_KEY = "quantization_config"


def attach_pifa_save(model: PreTrainedModel) -> None:
    """Make ``model.save_pretrained`` write PIFA checkpoints (idempotent).

    Call it once the model holds its ``PIFALinear`` layers (PIFAModifier: at the
    end of ``on_initialize``). Every later save -- ``model.save_pretrained(dir)``
    or ``oneshot(..., output_dir=dir)`` -- then writes into a temporary sibling
    directory, adds ``pifa_config`` (and a dense ``quantization_config`` when
    nothing is quantized) after llmcompressor's config rewrites, checks the
    written tensors, and only then renames the directory into place.
    """
    if getattr(model.save_pretrained, _MARK, False):
        return
    build_pifa_config(model)  # fail now, not at save time, if there is nothing to save
    modify_save_pretrained(model)  # no-op when oneshot already installed it
    inner = model.save_pretrained

    @functools.wraps(inner)
    def save_pretrained(save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("push_to_hub"):
            raise ValueError(
                "PIFA checkpoints are saved atomically to a local directory; "
                "push_to_hub is not supported: save, then upload the directory"
            )
        if not is_source_process():  # only the source rank writes files (llmcompressor)
            inner(save_directory, *args, **kwargs)
            return
        _require_factorized(model)
        pifa_config = build_pifa_config(model)
        # decide before llmcompressor compresses the model in place during the save
        quantized = QuantizationConfig.from_pretrained(model) is not None
        with atomic_directory(save_directory) as tmp:
            inner(str(tmp), *args, **kwargs)
            _finish_checkpoint(tmp, pifa_config, quantized)
        if keeps_factors_packed(model):  # the save re-registered compressed-tensors' hook
            keep_factors_packed(model)

    save_pretrained._overridden = True  # llmcompressor's marker: keep this wrapper outermost
    setattr(save_pretrained, _MARK, True)
    model.save_pretrained = save_pretrained


def _require_factorized(model: PreTrainedModel) -> None:
    """Refuse to save skeletons that still compute with a temporary dense weight."""
    for name, module in model.named_modules():
        if isinstance(module, PIFALinear) and getattr(module, "dense_weight", None) is not None:
            raise PIFACheckpointError(
                f"{name}: not factorized yet (it still holds the dense weight PIFAModifier "
                "keeps until it has compressed that layer: compression was interrupted or "
                "has not finished), so its PIFA factors are meaningless; nothing was written"
            )


def _finish_checkpoint(directory: Path, pifa_config: dict[str, Any], quantized: bool) -> None:
    """Add the PIFA entries to config.json, then check what was written."""
    if not quantized:
        # replaces a stale config that resave_config may copy from the source checkpoint
        write_dense_quantization_config(directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    if (config.get(_QUANT_KEY) or {}).get("quant_method") != "compressed-tensors":
        raise PIFACheckpointError(
            f"{config_path}: the save wrote no compressed-tensors {_QUANT_KEY}; without it "
            "transformers would never run the PIFA loader"
        )
    sanitize_recipe_file(directory / "recipe.yaml")
    config[CONFIG_KEY] = pifa_config
    config[GUARD_KEY] = GUARD_VALUE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    check_pifa_tensors(
        parse_pifa_config(pifa_config), index_safetensors(safetensors_files(directory))
    )
