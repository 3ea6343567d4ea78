"""vLLM serving plugin for PIFA checkpoints (install: docs/vllm.md, "Installing").

vLLM calls ``register`` (entry point group ``vllm.general_plugins``) in every
process; it registers the ``"pifa"`` quantization config, which claims any
checkpoint whose config.json carries ``pifa_config``. Only ``config.py`` and
``method.py`` import vLLM, and only once ``register`` finds it installed; all
layout logic lives in ``layout.py`` (pure torch, tested without vLLM).
See docs/vllm.md.
"""

from __future__ import annotations

import importlib.util

__all__ = ["register"]


def register() -> None:
    """Register the PIFA quantization config with vLLM; a no-op without vLLM."""
    if importlib.util.find_spec("vllm") is None:
        return
    from pifa_modifier.vllm import config  # noqa: F401  (registers on import)
