"""pifa-modifier: MPIFA low-rank compression (Pivoting Factorization) for llm-compressor.

Importing this package registers ``PIFAModifier`` with llm-compressor's
``ModifierFactory`` so YAML recipes can name it, guards recipe parsing and installs
the PIFA checkpoint loader into transformers.

A serving environment (vLLM pins other torch/compressed-tensors versions) installs
the package with ``--no-deps`` and has no llm-compressor: there the math, the module
and ``pifa_modifier.vllm`` still import, and only ``PIFAModifier`` is unavailable.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from pifa_modifier.math import density_of_rank, pivot_factorize, rank_for_density
from pifa_modifier.module import PIFALinear

__version__ = "0.1.0"

__all__ = [
    "PIFALinear",
    "PIFAModifier",
    "density_of_rank",
    "pivot_factorize",
    "rank_for_density",
]

if importlib.util.find_spec("llmcompressor") is not None:
    from llmcompressor.modifiers.factory import ModifierFactory

    from pifa_modifier.checkpoint import install as _install_checkpoint_loader
    from pifa_modifier.modifier import PIFAModifier
    from pifa_modifier.recipe import install_recipe_guard

    ModifierFactory.register(PIFAModifier.__name__, PIFAModifier)
    install_recipe_guard()
    _install_checkpoint_loader()


def __getattr__(name: str) -> Any:
    """Only reached without llm-compressor: say what is missing instead of a bare error."""
    if name == "PIFAModifier":
        raise ImportError(
            "PIFAModifier needs llm-compressor, which is not installed here (a --no-deps "
            "serving install?); run `pip install pifa-modifier` to compress models"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
