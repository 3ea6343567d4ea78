"""Perplexity vs density from ``quality.py`` results (JSON in, PNG out).

Entries named ``method@density`` (a ``--density`` sweep) and plain ``method`` entries
(density 0.5, or the measured PIFA density when recorded) become one curve per method;
the dense model is a horizontal line. Needs matplotlib (``pip install -e .[bench]``).

    python benchmarks/plot_quality.py benchmarks/results/sweep_smollm2.json \\
        --out benchmarks/results/sweep_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def curves(methods: dict[str, dict]) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(density, ppl), ...]}`` sorted by density; failed entries dropped."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, result in methods.items():
        if "ppl" not in result or key == "dense":
            continue
        name, _, nominal = key.partition("@")
        density = result.get("density") or (float(nominal) if nominal else 0.5)
        points[name].append((density, result["ppl"]))
    return {name: sorted(p) for name, p in sorted(points.items())}


def plot(results: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, pts in curves(results["methods"]).items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    if "ppl" in results["methods"].get("dense", {}):
        ax.axhline(results["methods"]["dense"]["ppl"], color="k", ls="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("density (kept fraction of the decoder linears' parameters)")
    ax.set_ylabel("wiki test perplexity (log)")
    protocol = results.get("protocol", {})
    ax.set_title(
        f"{title}\n{protocol.get('calibration_samples')} calibration / "
        f"{protocol.get('eval_windows')} eval windows of {protocol.get('seq_len')} tokens",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON written by benchmarks/quality.py")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="SmolLM2-135M, perplexity vs density")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"{args.results}: no such results file; run benchmarks/quality.py", file=sys.stderr)
        return 2
    plot(json.loads(args.results.read_text()), args.out, args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
