"""The main job: compress SmolLM2-135M with the default recipe, evaluate, save, reload.

Everything runs offline from PyPI-shipped assets (see ../shared/data/README.md):
the model and the wiki text are converted/tokenized once and cached.
"""

from __future__ import annotations

import json
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

from pifa_modifier.eval import (
    calibration_windows,
    oneshot_windows,
    perplexity,
    smollm2_path,
    wiki_token_ids,
)
from pifa_modifier.math import pifa_params
from pifa_modifier.module import PIFALinear

__all__ = ["DemoResult", "default_recipe", "run_demo", "peak_rss_gib"]


@dataclass
class DemoResult:
    """What the demo measured (also written as ``demo_result.json`` in the output)."""

    dense_ppl: float
    compressed_ppl: float
    reloaded_ppl: float
    density: float
    dense_params: int
    kept_params: int
    compress_seconds: float
    peak_rss_gib: float
    reload_max_abs_logit_diff: float
    calibration_windows: int
    eval_windows: int
    seq_len: int
    sample: str


def default_recipe() -> Path:
    """``recipes/mpifa.yaml`` of this checkout (the README's default recipe)."""
    return Path(__file__).resolve().parents[1] / "recipes" / "mpifa.yaml"


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def pifa_param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(dense, kept) parameters of the PIFA-compressed linears (indices, bias excluded).

    Counted from the shapes, r(m+n-r), not from the factor tensors: a quantized
    checkpoint may hold them packed (``weight_packed``) with no ``weight`` at all.
    """
    dense = kept = 0
    for module in model.modules():
        if isinstance(module, PIFALinear):
            dense += module.out_features * module.in_features
            kept += pifa_params(module.out_features, module.in_features, module.rank)
    return dense, kept


def run_demo(
    output: Path,
    recipe: Path | None = None,
    calib_windows: int = 8,
    eval_windows: int = 16,
    seq_len: int = 512,
) -> DemoResult:
    """Compress, evaluate (protocol perplexity), save, reload, check, generate."""
    import pifa_modifier  # noqa: F401  (registers PIFAModifier, installs the loader)

    recipe = recipe or default_recipe()
    if not recipe.is_file():
        raise FileNotFoundError(f"recipe {recipe} does not exist; pass --recipe PATH")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose another --output")
    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train_ids, test_ids = wiki_token_ids(tokenizer)
    windows = calibration_windows(train_ids, calib_windows, seq_len)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()

    logger.info(f"dense perplexity on {eval_windows} wiki test windows of {seq_len} tokens")
    dense_ppl = perplexity(model, test_ids, seq_len, eval_windows).ppl
    logger.info(f"dense perplexity {dense_ppl:.3f}; compressing with {recipe}")

    seconds = oneshot_windows(model, windows, str(recipe), tokenizer)
    dense_params, kept_params = pifa_param_counts(model)
    compressed_ppl = perplexity(model, test_ids, seq_len, eval_windows).ppl
    logger.info(f"compressed perplexity {compressed_ppl:.3f} in {seconds:.0f}s")

    model.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)
    reloaded = AutoModelForCausalLM.from_pretrained(output)
    reloaded.eval()
    probe = test_ids[:seq_len][None]
    with torch.no_grad():
        diff = float((reloaded(probe).logits - model(probe).logits).abs().max())
    reloaded_ppl = perplexity(reloaded, test_ids, seq_len, eval_windows).ppl
    sample = _generate(reloaded, tokenizer, "The capital of France is")

    result = DemoResult(
        dense_ppl=dense_ppl,
        compressed_ppl=compressed_ppl,
        reloaded_ppl=reloaded_ppl,
        density=kept_params / dense_params,
        dense_params=dense_params,
        kept_params=kept_params,
        compress_seconds=seconds,
        peak_rss_gib=peak_rss_gib(),
        reload_max_abs_logit_diff=diff,
        calibration_windows=calib_windows,
        eval_windows=eval_windows,
        seq_len=seq_len,
        sample=sample,
    )
    (output / "demo_result.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _generate(model, tokenizer, prompt: str) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)
