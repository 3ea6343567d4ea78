"""Evaluation kit: offline real assets, calibration windows and protocol perplexity.

Kept out of ``pifa_modifier``'s import path so the modifier never pays for it.
"""

from pifa_modifier.eval.assets import (
    MissingAssetError,
    cache_root,
    qwen25_05b_path,
    sharegpt_text,
    smollm2_path,
    tokenize_text,
    wiki_texts,
    wiki_token_ids,
)
from pifa_modifier.eval.calibration import (
    calibration_dataset,
    calibration_windows,
    oneshot_windows,
    text_windows,
)
from pifa_modifier.eval.perplexity import NonFiniteError, PerplexityResult, perplexity
from pifa_modifier.eval.texts import read_texts

__all__ = [
    "MissingAssetError",
    "NonFiniteError",
    "PerplexityResult",
    "cache_root",
    "calibration_dataset",
    "calibration_windows",
    "oneshot_windows",
    "perplexity",
    "qwen25_05b_path",
    "read_texts",
    "sharegpt_text",
    "smollm2_path",
    "text_windows",
    "tokenize_text",
    "wiki_texts",
    "wiki_token_ids",
]
