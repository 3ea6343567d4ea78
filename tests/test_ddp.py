"""``torchrun --nproc_per_node 2`` on CPU (gloo) gives the single-process checkpoint.

llm-compressor shards the calibration set across ranks; PIFAModifier sums its
statistics over ranks and broadcasts each linear's factors from one owner, so
both ranks hold identical factors and the source rank's checkpoint matches a
one-process run up to float32 summation order.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import calibration_dataset, make_model, make_tokenizer
from llmcompressor import oneshot
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pifa_modifier  # noqa: F401  (registers the modifier, installs the loader)
from pifa_modifier import PIFALinear, PIFAModifier

SAMPLES = 8
FIELDS = dict(density=0.5, rank_multiple=4)

_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])  # tests/, for conftest
    from conftest import calibration_dataset, make_tokenizer
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from pifa_modifier import PIFALinear, PIFAModifier

    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # init_dist() needs an accelerator
    rank = dist.get_rank()
    base, out = sys.argv[2], sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # each rank loads its own shard (llm-compressor's get_rank_partition recipe): 0.14's
    # automatic partitioning of an identical dataset gives every rank the first shard
    per_rank = {samples} // dist.get_world_size()
    shard = calibration_dataset({samples}).select(range(rank * per_rank, (rank + 1) * per_rank))
    oneshot(
        model=model,
        processor=make_tokenizer(),
        recipe=PIFAModifier(density=0.5, rank_multiple=4),
        dataset=shard,
        num_calibration_samples=len(shard),
        max_seq_length=32,
        shuffle_calibration_samples=False,  # (shuffling draws from the global torch RNG)
        output_dir=os.path.join(out, "ckpt"),
    )
    dense = {{n: m.to_dense() for n, m in model.named_modules() if isinstance(m, PIFALinear)}}
    save_file(dense, os.path.join(out, f"rank{{rank}}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    """
).format(samples=SAMPLES)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dense_factors(model) -> dict[str, torch.Tensor]:
    return {n: m.to_dense() for n, m in model.named_modules() if isinstance(m, PIFALinear)}


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
def test_torchrun_two_ranks_match_one_process(tmp_path):
    base = tmp_path / "base"
    single = make_model("llama", base)
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        str(torchrun if torchrun.exists() else shutil.which("torchrun")),
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()),
        str(worker), str(Path(__file__).parent), str(base), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    # the one-process reference, while the ranks run
    oneshot(
        model=single,
        processor=make_tokenizer(),
        recipe=PIFAModifier(**FIELDS),
        dataset=calibration_dataset(SAMPLES),
        num_calibration_samples=SAMPLES,
        max_seq_length=32,
        shuffle_calibration_samples=False,
    )
    reference = _dense_factors(single)

    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()[-4000:]
    log = out.decode()
    assert "Requested" not in log  # no rank ran short of samples
    assert "partitioning dataset across ranks" not in log  # each rank got its own shard

    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert ranks[0].keys() == reference.keys()
    for name in reference:  # the owner's factors were broadcast: bitwise equal on all ranks
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    saved = _dense_factors(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"))
    diffs = {}
    for name, weight in reference.items():
        assert torch.equal(saved[name], ranks[0][name]), name  # rank 0 wrote what it uses
        diffs[name] = float((saved[name] - weight).abs().max() / weight.abs().max())
    rest = max(d for n, d in diffs.items() if not n.endswith("o_proj"))
    print(f"max relative |W_ddp - W_single|: {max(diffs.values()):.2e} ({rest:.2e} w/o o_proj)")
    # o_proj's input spans only num_kv_heads * head_dim = 32 of 64 dims: its statistics
    # are singular and dampening-dominated, so float32 summation order shows at ~1e-3
    # there (one process fed the same 8 samples in reverse order differs by 2.6e-3)
    for name, diff in diffs.items():
        assert diff < (1e-2 if name.endswith("o_proj") else 1e-4), (name, diff)
