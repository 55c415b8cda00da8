"""Multi-process paths on CPU: cross-rank InfoNCE negatives (gloo), and DeepSpeed ZeRO-2/3 fits
through ``diva-cli`` with checkpoint save and resume (marker ``distributed``)."""

import math
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
        f"    init_args: {{stage: {zero_stage}}}\n"  # the micro-batch comes from data.batch_size
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
    # #18 item 13: export reads the ZeRO checkpoint directory itself (consolidated on the fly)
    config = next(tmp_path.rglob("config.yaml"))
    exported = _diva_cli("export", "--run_config", str(config), "--checkpoint", str(ckpts[0]),
                         "--out", str(tmp_path / "exported"))  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    from diva_lightning.backbones.emu3 import Emu3Adapter

    Emu3Adapter.from_pretrained(tmp_path / "exported")
    resumed = _diva_cli(*base, "--trainer.max_steps=4", f"--ckpt_path={ckpts[0]}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed run went on from step 2 to step 4 and wrote its own ZeRO checkpoint there
    names = sorted(p.name for p in tmp_path.rglob("*.ckpt"))
    assert any("step=4" in n for n in names) and any("step=2" in n for n in names), names


def _scalars(root: Path, tag: str) -> dict[int, float]:
    """``tag`` by step from every TensorBoard event file under ``root``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in root.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.mark.distributed
@pytest.mark.timeout(1800)
def test_deepspeed_stage2_with_ema_targets_resumes_and_agrees_across_zero_stages(tmp_path):
    """Stage 2 with ``targets: ema`` on 2 CPU processes: under ZeRO-2 and ZeRO-3 a run resumed
    from its step-2 checkpoint reproduces steps 3-4 of the uninterrupted run; ZeRO-3 (swapped
    partitions) gives the curve of ZeRO-2 (swapped replicas), and it differs from online targets.
    """
    from diva_lightning.data.prepare import prepare
    from diva_lightning.objectives import FactorEncoders
    from diva_lightning.objectives.checkpoint import factor_config, save_factor_encoders

    prepare(str(tmp_path / "train"), synthetic=64, max_count=16, seed=0, quiet=True)
    torch.manual_seed(0)
    enc = FactorEncoders(64, shared_dim=16)
    encoders = save_factor_encoders(tmp_path / "enc", enc, factor_config(enc, [3, 4, 5, 6]))

    def args(run, zero_stage, targets="ema"):
        extra = tmp_path / f"{run}.yaml"
        extra.write_text(
            "trainer:\n  strategy:\n    class_path: diva_lightning.strategies.CPUDeepSpeedStrategy\n"
            f"    init_args: {{stage: {zero_stage}, logging_batch_size_per_gpu: 4}}\n"
            "  callbacks:\n"
            "    - class_path: diva_lightning.stages.ema.EMA\n"
            "      init_args: {decay_start: 0.5, decay_end: 0.9, ramp_steps: 2}\n"
            "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {tmp_path / run / 'ckpts'}, every_n_train_steps: 2, "
            "save_top_k: -1}\n"
        )
        return [
            "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
            "--config", "configs/tiny/stage2.yaml", "--config", str(extra),
            f"--model.init_args.stage1_encoders={encoders}", f"--model.init_args.targets={targets}",
            "--model.init_args.ramp_steps=1", "--model.init_args.warmup_steps=0",
            f"--data.init_args.train_shards={tmp_path / 'train'}", "--data.init_args.val_shards=null",
            "--data.init_args.num_workers=1", "--data.init_args.batch_size=4",
            "--trainer.devices=2", "--trainer.limit_val_batches=0", "--trainer.max_steps=4",
            "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path / run}",
            f"--trainer.logger.init_args.save_dir={tmp_path / run}",
        ]  # fmt: skip

    curves = {}
    for zero_stage in (2, 3):
        whole = _diva_cli(*args(f"z{zero_stage}", zero_stage))
        assert whole.returncode == 0, whole.stderr[-3000:]
        (ckpt,) = (tmp_path / f"z{zero_stage}" / "ckpts").glob("*step=2*")
        resumed = _diva_cli(*args(f"z{zero_stage}-resumed", zero_stage), f"--ckpt_path={ckpt}")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        full = _scalars(tmp_path / f"z{zero_stage}", "train/loss_u2g")
        rest = _scalars(tmp_path / f"z{zero_stage}-resumed", "train/loss_u2g")
        assert sorted(full) == [0, 1, 2, 3] and sorted(rest) == [2, 3], (full, rest)
        assert [rest[s] for s in (2, 3)] == pytest.approx([full[s] for s in (2, 3)], rel=1e-6)
        curves[zero_stage] = [full[s] for s in range(4)]
    assert curves[3] == pytest.approx(curves[2], rel=1e-5)
    online = _diva_cli(*args("online", 3, targets="online"))
    assert online.returncode == 0, online.stderr[-3000:]
    online_curve = _scalars(tmp_path / "online", "train/loss_u2g")
    assert abs(online_curve[3] - curves[3][3]) > 1e-5  # the teacher's targets lag the online ones


@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backbone", ["liquid", "nexus_gen"])
def test_zero3_with_every_parameter_partitioned_trains(backbone, tmp_path):
    """Under ZeRO-3 a real 7B model's LM head is partitioned (tiny ones stay whole below the
    persistence threshold): with the threshold at 0, the generation flow still reads what it
    needs of partitioned modules and two steps train. Liquid reads the code rows of the head
    outside its module's forward; Nexus-Gen its prefill rows, vision head and frozen tower
    (``configs/nexus_gen`` runs ZeRO-3). Sampling at step 2 (``SampleEvaluation``) runs the
    generation flow alone, with no understanding forward before it to gather the head: it
    crashed on an H200 (IndexError, empty head)."""
    from diva_lightning.data.prepare import prepare

    prepare(str(tmp_path / "train"), synthetic=32, max_count=16, seed=0, quiet=True)
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text(
        "trainer:\n  strategy:\n    class_path: diva_lightning.strategies.CPUDeepSpeedStrategy\n"
        "    init_args:\n      config:\n        train_micro_batch_size_per_gpu: 2\n"
        "        zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}\n"
    )
    run = _diva_cli(
        "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
        "--config", "configs/tiny/sft.yaml", "--config", f"configs/tiny/{backbone}.yaml",
        "--config", str(strategy), f"--data.init_args.train_shards={tmp_path / 'train'}",
        "--data.init_args.val_shards=null", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2", "--trainer.devices=2", "--trainer.limit_val_batches=0",
        "--trainer.max_steps=2", "--trainer.log_every_n_steps=1",
        "--trainer.callbacks+=diva_lightning.evaluation.SampleEvaluation",
        "--trainer.callbacks.every_n_steps=2", "--trainer.callbacks.num_samples=2",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("train/loss", "train/loss_gen"):
        losses = _scalars(tmp_path, name)
        assert sorted(losses) == [0, 1] and all(math.isfinite(v) for v in losses.values())
    assert 2 in _scalars(tmp_path, "eval/caption_score"), "no evaluation at step 2"


def _launch(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diva_lightning.cli", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))  # fmt: skip


@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_two_nodes_of_one_process_train_like_one_node_of_two(tmp_path):
    """``num_nodes`` with the same DeepSpeed strategy: 2 "nodes" x 1 process on localhost (each
    node a separate launch with its NODE_RANK, as SLURM or torchrun would start them) get the
    same losses, step by step, as 1 node x 2 processes."""
    from diva_lightning.data.prepare import prepare

    prepare(str(tmp_path / "train"), synthetic=32, max_count=8, seed=0, quiet=True)
    strategy = tmp_path / "strategy.yaml"
    strategy.write_text(
        "trainer:\n  strategy:\n    class_path: diva_lightning.strategies.CPUDeepSpeedStrategy\n"
        "    init_args: {stage: 2, logging_batch_size_per_gpu: 2}\n"
    )

    def args(out: Path, devices: int, nodes: int) -> list[str]:
        return [
            "fit", "--config", "configs/tiny/trainer.yaml", "--config", "configs/tiny/data.yaml",
            "--config", "configs/tiny/sft.yaml", "--config", str(strategy),
            f"--data.init_args.train_shards={tmp_path / 'train'}", "--data.init_args.val_shards=null",
            "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
            "--data.init_args.shuffle_buffer=0", f"--trainer.devices={devices}",
            f"--trainer.num_nodes={nodes}", "--trainer.limit_val_batches=0",
            "--trainer.max_steps=3", "--trainer.log_every_n_steps=1",
            f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
        ]  # fmt: skip

    one_node = _diva_cli(*args(tmp_path / "one", devices=2, nodes=1))
    assert one_node.returncode == 0, one_node.stderr[-3000:]
    port = str(_free_port())
    nodes = [
        _launch(
            args(tmp_path / "two", devices=1, nodes=2),
            {"NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            tmp_path / f"node{rank}.log",
        )  # fmt: skip
        for rank in range(2)
    ]
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=900) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    single, multi = (
        _scalars(tmp_path / "one", "train/loss"),
        _scalars(tmp_path / "two", "train/loss"),
    )
    assert sorted(single) == [0, 1, 2] and sorted(multi) == sorted(single)
    for step in single:
        assert multi[step] == pytest.approx(single[step], rel=1e-5, abs=1e-6), (step, single, multi)
