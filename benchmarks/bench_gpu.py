"""GPU throughput of stage 2 against SFT on a Show-o-1.5B-shaped backbone: tokens/s, MFU, peak
memory, and one run held to 24 GB with the shipped ZeRO-2 settings.

    python benchmarks/bench_gpu.py                 # on a CUDA GPU: Show-o 256 px shape, bf16
    python benchmarks/bench_gpu.py --tiny          # the same code on CPU, tiny shape (tests)

* Backbone: Show-o's published dimensions (Phi-1.5: hidden 2048, 24 blocks, MLP 8192; vocab
  58,498; 256 image tokens at 256 px) with random weights, bf16, transformers' SDPA attention
  (Show-o's omni-attention mask is an additive mask: SDPA picks the memory-efficient kernel,
  which accepts one, where flash attention cannot).
* Arms: SFT and stage 2 (EMA targets, the teacher replay included), blocks 8..18 trained
  (11 blocks), per-GPU batch ``--batch`` (6). Arms alternate over ``--rounds``; each keeps its
  fastest round's median step.
* MFU = model FLOPs per step / step time / the GPU's dense bf16 peak (``--peak-tflops``;
  default from the device name: H100/H200 989, A100 312). Model FLOPs (``step_flops``), per
  flow token: ``2 N`` forward over all blocks, plus ``2 N_path`` for the input gradients of
  the blocks above the first trained one, plus ``2 N_train`` for the weight gradients of the
  trained blocks; attention adds ``4 T D`` per block forward (``QK^T``, ``AV``) and twice that
  in backward on the gradient path; the (frozen) LM head adds ``2 V D`` per supervised slot
  forward and as much for its input gradient. Stage 2's encoders, critic and teacher replay are work the model
  does not count: they lower its MFU, which is the point of comparing the arms.
* ``--capped``: stage 2 once more through Lightning's ``DeepSpeedStrategy`` with the shipped
  ``configs/deepspeed/zero{2,3}.json`` (``--zero``), an ``EMA`` callback, on this one process,
  the CUDA allocator capped at 24 GiB (``torch.cuda.set_per_process_memory_fraction``). At
  world size 1 each ZeRO partition is the whole optimizer state, so this is not the 8-GPU
  plan: it checks ``diva-cli plan``'s model (``plan_memory``) against a real allocator, the
  measured peak beside the prediction and the plan's verdict (fits with 10% kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import OnlineAsEMA, random_encoders, synthetic_batch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SHAPES = {
    "showo-1.5b": {"preset": "showo-256", "trained": (8, 18), "batch": 6},
    "tiny": {"preset": "tiny", "trained": (3, 6), "batch": 4},
}


def build(shape: str, arm: str, device: str, dtype: str):
    import torch

    from diva_lightning.backbones.showo import ShowoAdapter
    from diva_lightning.stages import SFT, Stage2

    spec = SHAPES[shape]
    torch.manual_seed(0)
    backbone = ShowoAdapter(preset=spec["preset"], torch_dtype=dtype)
    trained = spec["trained"]
    if arm == "sft":
        module = SFT(backbone, middle_layers=trained, trainable_layers=trained)
    else:
        encoders = random_encoders(backbone.hidden_size, trained, shared_dim=256)
        module = Stage2(backbone, stage1_encoders=encoders, middle_layers=trained,
                        ramp_steps=0, targets="ema")  # fmt: skip
        module.ema = OnlineAsEMA()
    module.configure_trainable()
    backbone.train()
    return module.to(device), spec


def batch_of(module, size: int, device: str):
    return synthetic_batch(module.backbone, size, mask_ratio=0.5)


def flows_of(module, batch) -> list:
    backbone = module.backbone
    return [
        backbone.build_understanding(batch.prompts, batch.captions, codes=batch.codes),
        backbone.build_generation(batch.captions, batch.codes, batch.gen_mask),
    ]


def step_flops(module, batch, padded: bool = False) -> dict[str, float]:
    """Model FLOPs of one training step by part (module docstring), from the flows' lengths:
    real tokens, or every padded position (``padded``: what the matmuls compute)."""
    backbone, flows = module.backbone, flows_of(module, batch)
    blocks, d = backbone.num_layers, backbone.hidden_size
    block = sum(p.numel() for p in backbone.decoder_layers[0].parameters())
    start, end = module.trainable_range
    path, trained = blocks - start, end - start + 1  # input grads above the first trained block
    parts = {"blocks": 0.0, "attention": 0.0, "head": 0.0}
    for flow, vocab in zip(flows, (backbone.text_vocab_size, backbone.codebook_size), strict=True):
        mask = flow.attention_mask
        tokens = float(mask.numel() if padded else mask.sum())
        parts["blocks"] += tokens * 2 * block * (blocks + path + trained)
        parts["attention"] += tokens * 4 * mask.shape[1] * d * (blocks + 2 * path)
        parts["head"] += float((flow.labels != -100).sum()) * 2 * vocab * d * 2  # fwd + input grad
    return parts


def time_arm(module, batch, steps: int, warmup: int, device: str) -> dict:
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        start = time.perf_counter()
        sum(module.loss_terms(batch).values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"step_s": statistics.median(times), "peak_gib": peak}


def planned_gib(module, batch, zero: int, ema: bool = False) -> float:
    """What ``diva-cli plan`` predicts per GPU for this run (world size 1): the built backbone's
    own shape, the batch's token counts and mask ratio, the module's trained blocks."""
    from dataclasses import replace

    from diva_lightning.planning.memory import GIB, RunSpec, plan_memory
    from diva_lightning.planning.shapes import from_adapter

    backbone, flows = module.backbone, flows_of(module, batch)
    text = max(f.attention_mask.shape[1] for f in flows) - backbone.tokens_per_image
    shape = replace(from_adapter(backbone), text_tokens=text)
    spec = RunSpec(
        stage="stage2", micro_batch=len(batch.keys), middle_layers=module.trainable_range,
        trainable_layers=module.trainable_range, zero_stage=zero,
        mask_ratio=float(batch.gen_mask.float().mean()), ema=ema,
    )  # fmt: skip
    return plan_memory(shape, spec).total / GIB


def capped_zero_run(shape: str, steps: int, zero: int) -> dict:
    """Stage 2 through Lightning + DeepSpeed ZeRO-``zero`` (shipped JSON), CUDA capped at 24 GiB:
    measured peak beside the plan's prediction."""
    import gc

    import lightning as L
    import torch
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from torch.utils.data import DataLoader

    from diva_lightning.stages.ema import EMA

    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * 2**30 / total))
    torch.cuda.reset_peak_memory_stats()
    module, spec = build(shape, "ema", "cpu", "bfloat16")
    batch = batch_of(module, spec["batch"], "cuda")
    planned = planned_gib(module, batch, zero, ema=True)
    config = json.loads(Path(f"configs/deepspeed/zero{zero}.json").read_text())
    config["train_micro_batch_size_per_gpu"] = spec["batch"]  # as diva-cli fills it in
    trainer = L.Trainer(
        accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
        strategy=DeepSpeedStrategy(config=config), callbacks=[EMA(ramp_steps=steps)],
        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
    )  # fmt: skip
    try:
        trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
        ok, error = True, None
    except torch.cuda.OutOfMemoryError as exn:
        ok, error = False, str(exn).split(". GPU 0")[0]
    peak = torch.cuda.max_memory_allocated() / 2**30
    del trainer, module
    return {"zero": zero, "fits_24gib": ok, "plan_fits": planned <= 0.9 * 24, "peak_gib": peak,
            "planned_gib": planned,
            "plan_over_measured": planned / peak if peak else None, "error": error}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shape on CPU (tests)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="per GPU (default: 6)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--capped", action="store_true", help="also the 24 GiB ZeRO runs")
    parser.add_argument("--zero", type=int, nargs="+", default=[2, 3], choices=(2, 3))
    parser.add_argument("--out", default="runs/bench/gpu.json")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = "tiny" if args.tiny else "showo-1.5b"
    dtype = "float32" if device == "cpu" else "bfloat16"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows: dict = {}
    built = {arm: build(shape, arm, device, dtype) for arm in ("sft", "stage2")}
    for round_ in range(args.rounds):
        for arm in ("sft", "stage2") if round_ % 2 == 0 else ("stage2", "sft"):
            module, spec = built[arm]
            batch = batch_of(module, args.batch or spec["batch"], device)
            result = time_arm(module, batch, args.steps, args.warmup, device)
            if arm not in rows or result["step_s"] < rows[arm]["step_s"]:
                flops = sum(step_flops(module, batch).values())
                tokens = sum(float(f.attention_mask.sum()) for f in flows_of(module, batch))
                rows[arm] = {**result, "flops": flops, "tokens_per_s": tokens / result["step_s"],
                             "mfu": flops / result["step_s"] / (peak * 1e12) if peak else None}  # fmt: skip
    report = {"device": name, "shape": shape, "dtype": dtype, "peak_tflops": peak, "arms": rows}
    if args.capped and device == "cuda":
        report["capped"] = [capped_zero_run(shape, steps=3, zero=z) for z in args.zero]
    else:  # the plan's prediction alone (CPU, tests): the same function as on the GPU
        module, spec = built["stage2"]
        report["planned_gib"] = {z: planned_gib(module, batch_of(module, spec["batch"], device), z)
                                 for z in args.zero}  # fmt: skip
    lines = [f"{name}, {shape}, {dtype}: median step of the best of {args.rounds} rounds"]
    for arm, r in rows.items():
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak given)"
        mem = f"{r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "n/a on CPU"
        lines.append(f"{arm:<8} {1000 * r['step_s']:9.1f} ms/step {r['tokens_per_s']:10.0f} "
                     f"tokens/s  MFU {mfu}  peak {mem}")  # fmt: skip
    sft, stage2 = rows["sft"], rows["stage2"]
    lines.append(f"stage 2 / SFT: step x{stage2['step_s'] / sft['step_s']:.2f}")
    for run in report.get("capped", []):
        lines.append(f"ZeRO-{run['zero']} capped at 24 GiB: fits {run['fits_24gib']} (plan: "
                     f"{run['plan_fits']}), peak "
                     f"{run['peak_gib']:.2f} GiB, plan {run['planned_gib']:.2f} GiB "
                     f"(plan / measured {run['plan_over_measured']:.2f}) {run['error'] or ''}")  # fmt: skip
    report["text"] = "\n".join(lines)
    print(report["text"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
