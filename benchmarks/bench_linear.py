"""Time dense, low-rank and PIFA linear layers side by side, in one run.

Why: PIFA's claim is speed as well as memory (ideal speed-up over the plain
low-rank pair ``A(B(x))`` at the same rank: (m+n)/(m+n-r); over dense: 1/density).
This measures how much of it the torch path and the fused Triton kernels get.

Shapes are ``(in_features, out_features)`` pairs, i.e. ``nn.Linear(in, out)``:
4096x4096 (LLaMA-7B attention), 4096x11008 / 11008x4096 (LLaMA-7B MLP up/gate
and down), 4096x14336 (LLaMA-3-8B MLP up/gate). Per shape, ranks come from
r/d (d = min(in, out)) and from PIFA densities, rounded down to a rank multiple.
Low-rank and PIFA use the same rank, so PIFA is the smaller of the two.

Methods: ``dense`` (nn.Linear), ``lowrank`` (two nn.Linear), ``pifa_torch``
(``PIFALinear``'s torch path), ``pifa_triton`` (its fused kernels; GPU only), and
for each ``--quant-bits`` b (default 4) the same PIFA layer with its factors
round-to-nearest quantized to int b, group ``--quant-group-size``, kept packed as
a reloaded W{b}A16 checkpoint keeps them: ``pifa_w{b}_torch`` (dequantize per call,
then the torch path) and ``pifa_w{b}_triton`` (dequantizing kernels; GPU only).
Settings whose rank the group size does not divide get no quantized rows.
Weights are random: speed does not depend on values (random pivot sets, |C| <= 1).
On the GPU, token counts <= ``--graph-max-tokens`` (decode) are timed as CUDA
graph replays of ``--graph-calls`` calls, so launch overhead is not measured.
After a warm-up (which also runs Triton's autotuning), all methods of a shape
and token count are timed in ``--rounds`` interleaved rounds, each round one
``torch.utils.benchmark`` blocked run whose median is recorded. A method's time
is its fastest round median: on a shared machine interference only adds time,
and interleaving exposes every method to the same drifts. All round medians
are kept in the JSON.

TFLOP/s counts 2*tokens*(multiply-adds); GB/s uses the minimal traffic of each
method (weights, bias, input, output and, for two-GEMM methods, the (tokens, r)
intermediate written and read once), so it is an effective bandwidth: the torch
path really moves more (cat, index_select and bias passes).

    python benchmarks/bench_linear.py --peak-tflops 989 --peak-gbps 3350   # GPU
    nice -n 10 python benchmarks/bench_linear.py --device cpu              # reduced grid
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

import pifa_modifier.module as pifa_module
from pifa_modifier.checkpoint.packed import quantize_factors_rtn
from pifa_modifier.kernels import use_triton_kernels, use_triton_quant_kernels
from pifa_modifier.math import density_of_rank, rank_for_density
from pifa_modifier.module import PIFALinear

RESULTS = Path(__file__).resolve().parent / "results"
GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]
CPU_SHAPES = [(1024, 1024), (1024, 2752), (2752, 1024), (1024, 3584)]  # LLaMA shapes / 4
GPU_TOKENS = [1, 16, 128, 2048, 8192]
CPU_TOKENS = [1, 16, 128]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Setting:
    """One compression level of a shape: how it was asked for, and the rank it gives."""

    label: str
    rank: int
    density_pifa: float
    density_lowrank: float


@dataclass
class Row:
    """One timing; ``rank`` is 0 for dense."""

    in_features: int
    out_features: int
    setting: str
    rank: int
    tokens: int
    method: str
    seconds: float
    round_medians_s: list[float]
    tflops: float
    gbps: float
    pct_peak_tflops: float | None
    pct_peak_gbps: float | None


def settings_for(
    n_in: int, n_out: int, rank_ratios: list[float], densities: list[float], multiple: int
) -> list[Setting]:
    """Ranks for r/d ratios (d = min(in, out)) and PIFA densities, rounded down to ``multiple``."""
    d = min(n_in, n_out)
    asked = [(f"r/d={k:g}", int(k * d) // multiple * multiple) for k in rank_ratios]
    asked += [
        (f"density={rho:g}", rank_for_density(n_out, n_in, rho, multiple)) for rho in densities
    ]
    return [
        Setting(label, r, density_of_rank(n_out, n_in, r), r * (n_in + n_out) / (n_in * n_out))
        for label, r in asked
    ]


def flops(method: str, tokens: int, n_in: int, n_out: int, rank: int) -> int:
    if method == "dense":
        return 2 * tokens * n_in * n_out
    if method == "lowrank":
        return 2 * tokens * rank * (n_in + n_out)
    return 2 * tokens * rank * (n_in + n_out - rank)


def quant_bits(method: str) -> int | None:
    """``b`` for the quantized PIFA methods ``pifa_w{b}_*``, else None."""
    if method.startswith("pifa_w"):
        return int(method.removeprefix("pifa_w").split("_")[0])
    return None


def min_bytes(
    method: str, tokens: int, n_in: int, n_out: int, rank: int, elem: int, group: int = 0
) -> int:
    """Minimal traffic; quantized methods count packed factors plus one scale per group."""
    io = tokens * (n_in + n_out) + n_out  # input, output, bias
    if method == "dense":
        return elem * (io + n_in * n_out)
    weights = rank * (n_in + n_out) if method == "lowrank" else rank * (n_in + n_out - rank)
    bits = quant_bits(method)
    if bits is None:
        return elem * (io + weights + 2 * tokens * rank)
    scales = (rank * n_in + (n_out - rank) * rank) // group
    return elem * (io + scales + 2 * tokens * rank) + weights * bits // 8


def random_pifa(
    n_in: int, n_out: int, rank: int, device: torch.device, dtype: torch.dtype, g: torch.Generator
) -> PIFALinear:
    """A PIFA layer with random factors: P ~ N(0, 1/n), |C| <= 1, random pivot set."""
    layer = PIFALinear(n_in, n_out, rank, device=device, dtype=dtype)
    with torch.no_grad():
        layer.pivot.weight.copy_(torch.randn(rank, n_in, generator=g) / math.sqrt(n_in))
        layer.coeff.weight.copy_(torch.rand(n_out - rank, rank, generator=g) * 2 - 1)
        layer.bias.copy_(torch.randn(n_out, generator=g))
        layer.set_pivot_idx(torch.randperm(n_out, generator=g)[:rank].sort().values.to(device))
    return layer


def lowrank_pair(
    n_in: int, n_out: int, rank: int, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    return nn.Sequential(
        nn.Linear(n_in, rank, bias=False, device=device, dtype=dtype),
        nn.Linear(rank, n_out, device=device, dtype=dtype),
    )


def quantized_pifa(pifa: PIFALinear, bits: int, group: int) -> PIFALinear:
    """A copy of ``pifa`` with int``bits`` group-``group`` factors, packed (RTN; speed only)."""
    layer = copy.deepcopy(pifa)
    quantize_factors_rtn(layer, bits, group)
    return layer


@contextlib.contextmanager
def torch_path_only() -> Iterator[None]:
    """Make ``PIFALinear`` skip its Triton dispatch, to time the module's own torch path."""
    original = pifa_module.use_triton_kernels, pifa_module.use_triton_quant_kernels
    pifa_module.use_triton_kernels = lambda layer, x: False
    pifa_module.use_triton_quant_kernels = lambda layer, x, factors=None: False
    try:
        yield
    finally:
        pifa_module.use_triton_kernels, pifa_module.use_triton_quant_kernels = original


def make_timer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    graph_calls: int,
    min_run_time: float,
) -> Callable[[], float]:
    """Warm ``fn(x)`` up once; the result times one block and returns seconds per call.

    With ``graph_calls > 0`` the block replays a CUDA graph of that many calls.
    """
    for _ in range(3):  # caches, allocator, Triton autotuning
        fn(x)
    if not graph_calls:
        timer = Timer("fn(x)", globals={"fn": fn, "x": x})
        return lambda: timer.blocked_autorange(min_run_time=min_run_time).median
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph recommends
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(graph_calls):
            fn(x)
    timer = Timer("graph.replay()", globals={"graph": graph})
    return lambda: timer.blocked_autorange(min_run_time=min_run_time).median / graph_calls


def torch_path_timer(pifa: PIFALinear, x: torch.Tensor, **timing: float) -> Callable[[], float]:
    """``make_timer`` for the torch path (the dispatch is bypassed while warming and timing)."""
    with torch_path_only():
        timer = make_timer(pifa, x, **timing)

    def run() -> float:
        with torch_path_only():
            return timer()

    return run


def bench_shape(
    n_in: int, n_out: int, settings: list[Setting], args: argparse.Namespace
) -> tuple[list[Row], list[dict]]:
    """Time every method and setting of one shape, for each token count.

    Methods are timed in ``args.rounds`` interleaved rounds (see the module docstring).
    """
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator().manual_seed(n_in * 7 + n_out)
    dense = nn.Linear(n_in, n_out, device=device, dtype=dtype)
    models = {
        s.label: (
            s,
            lowrank_pair(n_in, n_out, s.rank, device, dtype),
            random_pifa(n_in, n_out, s.rank, device, dtype, g),
        )
        for s in settings
    }
    group = args.quant_group_size
    quantized = {
        (label, bits): quantized_pifa(pifa, bits, group)
        for label, (s, _, pifa) in models.items()
        if s.rank % group == 0 and n_in % group == 0
        for bits in args.quant_bits
    }
    for label, (s, _, _) in models.items():
        if args.quant_bits and (s.rank % group or n_in % group):
            print(
                f"{n_in}x{n_out} {label}: group {group} does not divide rank {s.rank} and "
                f"in_features {n_in}; no quantized rows",
                flush=True,
            )
    rows: list[Row] = []
    ratios: list[dict] = []
    for tokens in args.tokens:
        x = torch.randn(tokens, n_in, generator=g).to(device, dtype)
        graph = device.type == "cuda" and tokens <= args.graph_max_tokens
        timing = {
            "graph_calls": args.graph_calls if graph else 0,
            "min_run_time": args.min_run_time,
        }
        with torch.inference_mode():
            timers = {("dense", "dense"): make_timer(dense, x, **timing)}
            errors = {}
            for label, (_, lowrank, pifa) in models.items():
                timers[label, "lowrank"] = make_timer(lowrank, x, **timing)
                timers[label, "pifa_torch"] = torch_path_timer(pifa, x, **timing)
                if device.type == "cuda":
                    if not use_triton_kernels(pifa, x):
                        raise SystemExit("no Triton dispatch: it needs fp16/bf16 on sm_80+")
                    timers[label, "pifa_triton"] = make_timer(pifa, x, **timing)
                    with torch_path_only():
                        reference = pifa(x).float()
                    err = (pifa(x).float() - reference).abs().max() / reference.abs().max()
                    errors[label] = float(err)
            for (label, bits), qpifa in quantized.items():
                method = f"pifa_w{bits}"
                timers[label, f"{method}_torch"] = torch_path_timer(qpifa, x, **timing)
                if device.type == "cuda":
                    if not use_triton_quant_kernels(qpifa, x):
                        raise SystemExit("no quantized Triton dispatch for the packed factors")
                    timers[label, f"{method}_triton"] = make_timer(qpifa, x, **timing)
                    with torch_path_only():
                        reference = qpifa(x).float()
                    err = (qpifa(x).float() - reference).abs().max() / reference.abs().max()
                    errors[label, method] = float(err)
            samples: dict[tuple[str, str], list[float]] = {key: [] for key in timers}
            for _ in range(args.rounds):
                for key, timer in timers.items():
                    samples[key].append(timer())
        del timers  # frees the CUDA graphs' memory pools before the next token count
        best = {key: min(values) for key, values in samples.items()}
        t_dense = best["dense", "dense"]
        rows.append(
            _row("dense", "dense", 0, tokens, samples["dense", "dense"], n_in, n_out, elem, args)
        )
        for label, (s, _, _) in models.items():
            times = {method: t for (lab, method), t in best.items() if lab == label}
            entry = {
                "in_features": n_in,
                "out_features": n_out,
                "setting": label,
                "rank": s.rank,
                "tokens": tokens,
                "density_pifa": s.density_pifa,
                "density_lowrank": s.density_lowrank,
                "ideal_vs_lowrank": (n_in + n_out) / (n_in + n_out - s.rank),
                "ideal_vs_dense": 1 / s.density_pifa,
                "lowrank_vs_dense": t_dense / times["lowrank"],
            }
            if label in errors:
                entry["max_rel_err_triton_vs_torch"] = errors[label]
            for bits in args.quant_bits:
                if (label, f"pifa_w{bits}") in errors:
                    entry[f"max_rel_err_w{bits}_triton_vs_torch"] = errors[label, f"pifa_w{bits}"]
            for method, seconds in times.items():
                rows.append(
                    _row(
                        method,
                        label,
                        s.rank,
                        tokens,
                        samples[label, method],
                        n_in,
                        n_out,
                        elem,
                        args,
                    )
                )
                if quant_bits(method) is not None:
                    entry[f"{method}_vs_pifa_torch"] = times["pifa_torch"] / seconds
                if method != "lowrank":
                    entry[f"{method}_vs_lowrank"] = times["lowrank"] / seconds
                    entry[f"{method}_vs_dense"] = t_dense / seconds
            ratios.append(entry)
            print(_ratio_line(entry, times, t_dense), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, ratios


def _row(
    method: str,
    setting: str,
    rank: int,
    tokens: int,
    rounds: list[float],
    n_in: int,
    n_out: int,
    elem: int,
    args: argparse.Namespace,
) -> Row:
    seconds = min(rounds)
    tf = flops(method, tokens, n_in, n_out, rank) / seconds / 1e12
    gb = min_bytes(method, tokens, n_in, n_out, rank, elem, args.quant_group_size) / seconds / 1e9
    return Row(
        n_in,
        n_out,
        setting,
        rank,
        tokens,
        method,
        seconds,
        rounds,
        tf,
        gb,
        100 * tf / args.peak_tflops if args.peak_tflops else None,
        100 * gb / args.peak_gbps if args.peak_gbps else None,
    )


def _ratio_line(entry: dict, times: dict[str, float], t_dense: float) -> str:
    timings = "  ".join(f"{k} {v * 1e6:9.1f}us" for k, v in {"dense": t_dense, **times}.items())
    best = "pifa_triton" if "pifa_triton" in times else "pifa_torch"
    return (
        f"{entry['in_features']:>5}x{entry['out_features']:<5} {entry['setting']:<12} "
        f"r={entry['rank']:<5} T={entry['tokens']:<5} {timings}  {best}: "
        f"x{entry[f'{best}_vs_lowrank']:.2f} vs low-rank (ideal x{entry['ideal_vs_lowrank']:.2f}), "
        f"x{entry[f'{best}_vs_dense']:.2f} vs dense (ideal x{entry['ideal_vs_dense']:.2f})"
    )


def plot(ratios: list[dict], path: Path, title: str) -> None:
    """Speed-ups of the best PIFA path vs low-rank (top) and dense (bottom), ideal dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = "pifa_triton" if any("pifa_triton_vs_lowrank" in e for e in ratios) else "pifa_torch"
    shapes = list(dict.fromkeys((e["in_features"], e["out_features"]) for e in ratios))
    labels = list(dict.fromkeys(e["setting"] for e in ratios))
    colors = dict(zip(labels, plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        for row, versus in enumerate(("lowrank", "dense")):
            ax = axes[row][col]
            for label in labels:
                pts = [
                    e
                    for e in ratios
                    if (e["in_features"], e["out_features"]) == shape and e["setting"] == label
                ]
                tokens = [e["tokens"] for e in pts]
                ax.plot(
                    tokens,
                    [e[f"{best}_vs_{versus}"] for e in pts],
                    "o-",
                    color=colors[label],
                    label=label,
                )
                ax.axhline(pts[0][f"ideal_vs_{versus}"], color=colors[label], ls=":", lw=1)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(tokens, [str(t) for t in tokens])
            ax.minorticks_off()
            ax.set_xlabel("tokens")
            ax.set_title(f"{shape[0]}x{shape[1]} (in x out)", fontsize=9)
            if col == 0:
                ax.set_ylabel(f"speed-up of {best} vs {versus}")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{title}  (dotted: ideal)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float16 (cuda), float32 (cpu)")
    p.add_argument("--shapes", nargs="+", metavar="INxOUT", help="default: LLaMA shapes (cpu: / 4)")
    p.add_argument(
        "--tokens", nargs="+", type=int, help="default: 1 16 128 2048 8192 (cpu: 1 16 128)"
    )
    p.add_argument("--rank-ratios", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--densities", nargs="+", type=float, default=[0.4, 0.5, 0.6])
    p.add_argument("--rank-multiple", type=int, help="default: 128 (cuda), 64 (cpu)")
    p.add_argument(
        "--quant-bits",
        nargs="*",
        type=int,
        choices=[4, 8],
        default=[4],
        help="int widths of the packed-factor PIFA variants (none: no variants)",
    )
    p.add_argument("--quant-group-size", type=int, help="default: 128 (cuda), 64 (cpu)")
    p.add_argument("--peak-tflops", type=float, help="peak for %% of peak (e.g. 989 H100 bf16)")
    p.add_argument("--peak-gbps", type=float, help="device peak bandwidth (e.g. 3350 H100 SXM)")
    p.add_argument("--graph-max-tokens", type=int, default=16, help="CUDA graphs up to this many")
    p.add_argument("--graph-calls", type=int, default=20, help="calls captured per CUDA graph")
    p.add_argument("--min-run-time", type=float, default=0.03, help="seconds per timed block")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; fastest is kept")
    p.add_argument("--out", type=Path, help="JSON (default: results/bench_linear_<device>.json)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda needs a GPU; use --device cpu for the reduced CPU grid")
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    args.shapes = (
        [tuple(map(int, s.lower().split("x"))) for s in args.shapes]
        if args.shapes
        else (GPU_SHAPES if gpu else CPU_SHAPES)
    )
    args.tokens = args.tokens or (GPU_TOKENS if gpu else CPU_TOKENS)
    args.rank_multiple = args.rank_multiple or (128 if gpu else 64)
    args.quant_group_size = args.quant_group_size or (128 if gpu else 64)
    args.out = args.out or RESULTS / f"bench_linear_{args.device}.json"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    load_start = os.getloadavg()
    rows: list[Row] = []
    ratios: list[dict] = []
    for n_in, n_out in args.shapes:
        settings = settings_for(n_in, n_out, args.rank_ratios, args.densities, args.rank_multiple)
        shape_rows, shape_ratios = bench_shape(n_in, n_out, settings, args)
        rows += shape_rows
        ratios += shape_ratios
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    meta = {
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "shape_convention": "(in_features, out_features), nn.Linear(in, out)",
        "ranks": "same rank for lowrank and PIFA; r/d uses d = min(in, out)",
        "rank_multiple": args.rank_multiple,
        "tokens": args.tokens,
        "quant_bits": args.quant_bits,
        "quant_group_size": args.quant_group_size,
        "quant": "RTN symmetric int, packed as compressed-tensors pack-quantized",
        "peak_tflops": args.peak_tflops,
        "peak_gbps": args.peak_gbps,
        "graph_calls": args.graph_calls if args.device == "cuda" else 0,
        "graph_max_tokens": args.graph_max_tokens,
        "min_run_time_s": args.min_run_time,
        "rounds": args.rounds,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_s": round(time.time() - started, 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "ratios": ratios, "rows": [asdict(r) for r in rows]}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    plot(ratios, args.out.with_suffix(".png"), f"{device_name}, {args.dtype}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {meta['wall_s']} s")


if __name__ == "__main__":
    main()
