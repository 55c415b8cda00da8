"""Multi-process paths on CPU: cross-rank InfoNCE negatives (gloo), and DeepSpeed ZeRO-2/3 fits
through ``diva-cli`` with checkpoint save and resume (marker ``distributed``)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diva_lightning.objectives import directed_info_nce

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_loss(rank, world, port, query, target, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    b = query.shape[0] // world
    q = query[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = directed_info_nce(q, target[rank * b : (rank + 1) * b], tau=0.1, gather_negatives=True)
    loss.backward()
    out[rank] = torch.cat([loss.detach().view(1), q.grad.flatten()])
    dist.destroy_process_group()


def test_negatives_gathered_across_ranks_equal_one_big_batch():
    torch.manual_seed(0)
    query, target = torch.randn(8, 3, 16), torch.randn(8, 3, 16)
    out = mp.Manager().dict()
    mp.spawn(_rank_loss, args=(2, _free_port(), query, target, out), nprocs=2, join=True)
    full_q = query.clone().requires_grad_(True)
    full = directed_info_nce(full_q, target, tau=0.1)
    full.backward()
    per_rank = [out[r][0] for r in range(2)]
    torch.testing.assert_close(torch.stack(per_rank).mean(), full.detach())
    # each rank's query gradient equals (world size x) the big batch's for its rows
    grads = torch.cat([out[r][1:].view(4, 3, 16) for r in range(2)])
    torch.testing.assert_close(grads / 2, full_q.grad)


def _diva_cli(*args, timeout=600):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "diva_lightning.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_fit_save_and_resume_on_cpu(zero_stage, tmp_path):
    from diva_lightning.data.prepare import prepare

    prepare(str(tmp_path / "train"), synthetic=64, max_count=16, seed=0, quiet=True)
    strategy = tmp_path / "strategy.yaml"  # numbers stay numbers in YAML (not on the command line)
    strategy.write_text(
        "trainer:\n  strategy:\n    class_path: diva_lightning.strategies.CPUDeepSpeedStrategy\n"
        f"    init_args: {{stage: {zero_stage}, logging_batch_size_per_gpu: 4}}\n"
    )
    base = [
        "fit",
        "--config",
        "configs/tiny/trainer.yaml",
        "--config",
        "configs/tiny/data.yaml",
        "--config",
        "configs/tiny/sft.yaml",
        f"--data.init_args.train_shards={tmp_path / 'train'}",
        "--data.init_args.val_shards=null",
        "--data.init_args.num_workers=1",
        "--data.init_args.batch_size=4",
        "--trainer.devices=2",
        "--trainer.limit_val_batches=0",
        "--config",
        str(strategy),
        "--trainer.callbacks+=diva_lightning.stages.ema.EMA",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    first = _diva_cli(*base, "--trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "no DeepSpeed checkpoint directory written"
    resumed = _diva_cli(*base, "--trainer.max_steps=4", f"--ckpt_path={ckpts[0]}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed run went on from step 2 to step 4 and wrote its own ZeRO checkpoint there
    names = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert any("step=4" in n for n in names) and any("step=2" in n for n in names), names
