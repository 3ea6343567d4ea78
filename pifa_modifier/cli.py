"""``pifa`` command line (also ``python -m pifa_modifier``).

Exit codes: 0 success, 2 bad arguments or input (clear message on stderr),
1 anything unexpected (traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"pifa {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
