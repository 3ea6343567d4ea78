"""``pifa compress``: run ``llmcompressor.oneshot`` with a recipe on a local model directory.

Every input is checked before the model is loaded (loading a large model takes
minutes and gigabytes, so a typo must fail first): the model directory, the recipe
(parsed and instantiated, so unknown modifiers and bad fields fail here), the
calibration text (read, tokenized and cut into windows), the output directory and
the device. Calibration samples are non-overlapping ``seq_len``-token windows of the
texts joined with ``"\\n\\n"``, as the perplexity protocol cuts its own text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DTYPES", "WIKI", "CompressResult", "check_output_dir", "compress", "load_windows"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIKI = "wiki"  # the bundled Wikipedia train text (pifa_modifier.eval.wiki_texts)
RESULT_FILE = "pifa_compress.json"


@dataclass
class CompressResult:
    """What ``pifa compress`` did (also written as ``pifa_compress.json`` in the output)."""

    output: str
    model: str
    recipe: str
    dataset: str
    num_samples: int
    seq_len: int
    dtype: str
    device: str
    pifa_layers: int
    dense_params: int  # of the PIFA-compressed linears only (see DESIGN §5)
    kept_params: int
    density: float | None  # None when the recipe compressed no layer to PIFA
    compress_seconds: float  # oneshot alone
    total_seconds: float  # checks, loading, oneshot and saving
    peak_rss_gib: float
    peak_gpu_gib: float | None


def check_model_dir(model: Path) -> dict[str, Any]:
    """config.json of a dense model directory, or a ValueError/FileNotFoundError with the fix."""
    config_file = model / "config.json"
    if not model.is_dir():
        raise FileNotFoundError(f"model directory {model} does not exist; pass --model DIR")
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{model} has no config.json: --model must be a local Hugging Face model directory "
            "(the hub is not used)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    if "pifa_config" in config:
        raise ValueError(
            f"{model} is already a PIFA checkpoint; compress the dense original "
            "(or `pifa export-dense` it first)"
        )
    return config


def check_recipe(recipe: Path) -> None:
    """Parse and instantiate the recipe, so a bad one fails before the model loads."""
    if not recipe.is_file():
        raise FileNotFoundError(
            f"recipe {recipe} does not exist; pass --recipe PATH to a YAML recipe "
            "(e.g. recipes/mpifa.yaml)"
        )
    try:
        data = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {recipe} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"recipe {recipe} must be a YAML mapping of stages, e.g.\n"
            "pifa_stage:\n  pifa_modifiers:\n    PIFAModifier:\n      density: 0.5"
        )
    from llmcompressor.recipe import Recipe

    import pifa_modifier  # noqa: F401  (registers PIFAModifier, guards empty recipes)

    try:
        Recipe.create_instance(str(recipe))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"recipe {recipe} is invalid: {e}") from e


def check_output_dir(output: Path, flag: str = "--output") -> None:
    """The output must be absent or an empty directory: never overwrite a checkpoint."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a directory; choose another {flag}")
    if output.is_dir() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose another {flag}")


def check_device(device: str | None) -> str:
    """The device llm-compressor will calibrate on, checked against ``--device``.

    llm-compressor onloads each layer to the first visible accelerator, whatever the
    model's device; so ``--device`` is checked, not forced.
    """
    from llmcompressor.utils.dev import get_main_device

    actual = get_main_device().type
    if device == "cuda" and actual != "cuda":
        raise ValueError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    if device == "cpu" and actual != "cpu":
        raise ValueError(
            f"--device cpu, but llm-compressor calibrates on the visible {actual} device; "
            "hide it to compress on the CPU: CUDA_VISIBLE_DEVICES= pifa compress ..."
        )
    return actual


def load_tokenizer(model: Path) -> PreTrainedTokenizerBase:
    """The model directory's tokenizer, or a ValueError saying it must be there."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"cannot load a tokenizer from {model} ({e}); copy the base model's tokenizer "
            "files into it"
        ) from e


def load_windows(
    tokenizer: PreTrainedTokenizerBase, dataset: str, num_samples: int, seq_len: int
) -> torch.Tensor:
    """``(num_samples, seq_len)`` calibration windows from ``dataset`` (a path or ``wiki``)."""
    from pifa_modifier.eval import calibration_windows, read_texts, text_windows, wiki_token_ids

    try:
        if dataset == WIKI:
            return calibration_windows(wiki_token_ids(tokenizer)[0], num_samples, seq_len)
        return text_windows(tokenizer, read_texts(dataset), num_samples, seq_len)
    except ValueError as e:
        if "too short" not in str(e):
            raise
        raise ValueError(
            f"dataset {dataset}: {e}; lower --num-samples or --seq-len, or supply more text"
        ) from e


def compress(
    model: Path,
    recipe: Path,
    dataset: str,
    output: Path,
    num_samples: int = 128,
    seq_len: int = 512,
    dtype: str = "fp32",
    device: str | None = None,
) -> CompressResult:
    """Check everything, load, ``oneshot``, save compressed with the tokenizer."""
    from pifa_modifier.demo import peak_rss_gib, pifa_param_counts

    start = time.perf_counter()
    if num_samples < 1:
        raise ValueError(f"--num-samples must be > 0, got {num_samples}")
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = check_model_dir(model)
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and seq_len > context:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the model's context (max_position_embeddings "
            f"{context}); pass --seq-len {context} or less"
        )
    check_recipe(recipe)
    if dataset != WIKI and not Path(dataset).exists():
        raise FileNotFoundError(
            f"dataset {dataset} does not exist; pass a .txt/.json/.jsonl file, a datasets "
            f"save_to_disk directory, or '{WIKI}' for the bundled Wikipedia text"
        )
    check_output_dir(output)
    actual_device = check_device(device)
    tokenizer = load_tokenizer(model)
    windows = load_windows(tokenizer, dataset, num_samples, seq_len)

    from transformers import AutoModelForCausalLM

    from pifa_modifier.eval import oneshot_windows

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype])
    loaded.eval()
    compress_seconds = oneshot_windows(loaded, windows, str(recipe), tokenizer)
    dense, kept = pifa_param_counts(loaded)
    loaded.save_pretrained(output, save_compressed=True)
    tokenizer.save_pretrained(output)

    result = CompressResult(
        output=str(output),
        model=str(model),
        recipe=str(recipe),
        dataset=dataset,
        num_samples=num_samples,
        seq_len=seq_len,
        dtype=dtype,
        device=actual_device,
        pifa_layers=_count_pifa_layers(loaded),
        dense_params=dense,
        kept_params=kept,
        density=kept / dense if dense else None,
        compress_seconds=compress_seconds,
        total_seconds=time.perf_counter() - start,
        peak_rss_gib=peak_rss_gib(),
        peak_gpu_gib=(
            torch.cuda.max_memory_allocated() / 2**30 if actual_device == "cuda" else None
        ),
    )
    (output / RESULT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return result


def _count_pifa_layers(model: torch.nn.Module) -> int:
    from pifa_modifier.module import PIFALinear

    return sum(isinstance(m, PIFALinear) for m in model.modules())


def format_result(result: CompressResult) -> str:
    """The summary ``pifa compress`` prints."""
    if result.density is None:
        params = "no PIFA layers (the recipe has no PIFAModifier?)"
    else:
        params = (
            f"density {result.density:.4f} of the {result.pifa_layers} PIFA linears "
            f"({result.kept_params:,} of {result.dense_params:,} params; embeddings, "
            "lm_head and norms not counted)"
        )
    gpu = f", peak GPU {result.peak_gpu_gib:.2f} GiB" if result.peak_gpu_gib is not None else ""
    return (
        f"compressed {result.model} with {result.recipe}\n"
        f"  calibration {result.num_samples} windows x {result.seq_len} tokens "
        f"from {result.dataset}, {result.dtype} on {result.device}\n"
        f"  {params}\n"
        f"  oneshot {result.compress_seconds:.1f}s (total {result.total_seconds:.1f}s), "
        f"peak RSS {result.peak_rss_gib:.2f} GiB{gpu}\n"
        f"  saved to {result.output}"
    )
