"""Perplexity vs density and vs checkpoint size from ``quality.py`` results (JSON in, PNG out).

Entries named ``method@density`` (a ``--density`` sweep) and plain ``method`` entries
become one curve per method. A method's density is its measured PIFA density, 0.5 for
2:4 pruning, else 1; ``+w4a16`` variants are dashed. Panels: wiki perplexity and
out-of-domain (chat) perplexity against density, and wiki perplexity against the
checkpoint's size on disk. Needs matplotlib (``.[bench]``).

    python benchmarks/plot_quality.py benchmarks/results/sweep_smollm2.json \\
        --out benchmarks/results/sweep_smollm2.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

# (result key, axis label, x from the entry); panels without data are left out
PANELS = (
    ("ppl", "wiki test perplexity (log)", "density"),
    ("ppl_ood", "chat perplexity, out of domain (log)", "density"),
    ("ppl", "wiki test perplexity (log)", "checkpoint_mb"),
)
X_LABELS = {
    "density": "density (kept share of the decoder linears' parameters)",
    "checkpoint_mb": "checkpoint on disk (MB)",
}


def entry_density(name: str, result: dict) -> float:
    """PIFA density, else 0.5 for 2:4 pruning (``*24`` methods), else 1 (dense weights).

    Counting zeros would not do: 4-bit rounding zeroes weights too.
    """
    if result.get("density"):
        return result["density"]
    return 0.5 if name.partition("+")[0].endswith("24") else 1.0


def curves(methods: dict[str, dict], y: str, x: str) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(x, y), ...]}`` sorted by x; entries lacking ``x`` or ``y`` dropped."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, result in methods.items():
        if y not in result:
            continue
        if x == "density":
            xv = entry_density(key, result)
        elif "checkpoint_bytes" in result:
            xv = result["checkpoint_bytes"] / 1e6
        else:
            continue
        points[key.partition("@")[0]].append((xv, result[y]))
    return {name: sorted(p) for name, p in sorted(points.items())}


def plot(results: dict, out: Path, title: str, max_ppl: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    panels = [p for p in PANELS if curves(methods, p[0], p[2])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    colors: dict[str, str] = {}
    for ax, (y, label, x) in zip(axes[0], panels, strict=True):
        for name, pts in curves(methods, y, x).items():
            kept = [(xv, yv) for xv, yv in pts if yv <= max_ppl]
            if not kept:  # e.g. plain SVD: listed, not drawn, so the scale stays readable
                ax.plot([], [], " ", label=f"{name}: PPL > {max_ppl:g}, off scale")
                continue
            base = name.removesuffix("+w4a16")
            colors.setdefault(base, f"C{len(colors) % 10}")
            xs, ys = zip(*kept, strict=True)
            style = "--" if name.endswith("+w4a16") else "-"
            marker = "s" if name.endswith("+w4a16") else "o"
            ax.plot(xs, ys, style, marker=marker, color=colors[base], label=name)
        ax.set_yscale("log")
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper right")
    protocol = results.get("protocol", {})
    fig.suptitle(
        f"{title} — {protocol.get('calibration_samples')} calibration / "
        f"{protocol.get('eval_windows')} wiki + {protocol.get('ood_windows', 0)} chat test "
        f"windows of {protocol.get('seq_len')} tokens",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="JSON written by benchmarks/quality.py")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--title", default="SmolLM2-135M")
    parser.add_argument(
        "--max-ppl", type=float, default=1e4, help="points above are left out (named in the legend)"
    )
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"{args.results}: no such results file; run benchmarks/quality.py", file=sys.stderr)
        return 2
    plot(json.loads(args.results.read_text()), args.out, args.title, args.max_ppl)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
