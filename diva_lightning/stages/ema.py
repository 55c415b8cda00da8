"""EMA of the trained weights with a decay ramp (paper Table 7/8: 0.99 -> 0.999), DeepSpeed-aware.

Lightning's own ``EMAWeightAveraging`` loses its weights under DeepSpeed ZeRO-2 checkpoints and
crashes under ZeRO-3 (partitioned parameters have shape ``(0,)``). This callback averages what
each rank actually holds: the full parameter when parameters are replicated (single device,
DDP, ZeRO-1/2), or the rank's own partition (``param.ds_tensor``) under ZeRO-3. Its state goes
into the checkpoint's callback state; under ZeRO-3 the per-rank partitions are gathered so the
rank-0 client state holds every rank's shard, and each rank takes its own back on resume.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from diva_lightning.objectives.regularizers import LinearRamp


def _storage(param: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or the parameter itself."""
    return getattr(param, "ds_tensor", param).data


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class EMA(Callback):
    """Exponential moving average of the trainable parameters.

    Args:
        decay_start: decay at the first optimizer step (paper: 0.99).
        decay_end: decay after ``ramp_steps`` (paper: 0.999).
        ramp_steps: optimizer steps of the linear decay ramp.
        apply_at_end: copy the EMA weights into the model when fit ends (so ``export`` and the
            final checkpoint carry them).
    """

    def __init__(
        self,
        decay_start: float = 0.99,
        decay_end: float = 0.999,
        ramp_steps: int = 1000,
        apply_at_end: bool = True,
    ):
        if not 0 <= decay_start <= 1 or not 0 <= decay_end <= 1:
            raise ValueError(f"EMA decays must lie in [0, 1], got {decay_start}, {decay_end}")
        self.decay = LinearRamp(decay_start, decay_end, ramp_steps)
        self.apply_at_end = apply_at_end
        self.shadow: dict[str, torch.Tensor] = {}
        self.updates = 0
        self._last_step = -1
        self._loaded: dict | None = None
        self._sharded = False

    def _tracked(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tracked = self._tracked(pl_module)
        self.shadow = {n: _storage(p).detach().float().clone() for n, p in tracked.items()}
        self._sharded = any(hasattr(p, "ds_tensor") for p in tracked.values())
        if self._loaded is not None:
            self._restore(self._loaded, trainer.global_rank)
            self._loaded = None
        self._last_step = trainer.global_step

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        decay = self.decay(self.updates)
        tracked = self._tracked(pl_module)
        names = [n for n in self.shadow if n in tracked]
        current = [_storage(tracked[n]).float() for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - decay)
        self.updates += 1
        pl_module.log("train/ema_decay", decay)

    @torch.no_grad()
    def copy_to(self, pl_module: L.LightningModule) -> None:
        """Overwrite the trainable parameters with their EMA."""
        tracked = self._tracked(pl_module)
        for name, value in self.shadow.items():
            if name in tracked:
                target = _storage(tracked[name])
                target.copy_(value.to(target.dtype))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.apply_at_end and self.shadow:
            self.copy_to(pl_module)

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        shards = {k: v.cpu() for k, v in self.shadow.items()}
        if self._sharded and _distributed():  # ZeRO-3: every rank holds a different partition
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, shards)
            return {"updates": self.updates, "per_rank": gathered}
        return {"updates": self.updates, "per_rank": [shards]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.updates = state_dict["updates"]
        self._loaded = state_dict  # applied in on_fit_start, once parameters exist

    def _restore(self, state: dict, rank: int) -> None:
        per_rank = state["per_rank"]
        shards = per_rank[rank] if rank < len(per_rank) else per_rank[0]
        for name, value in shards.items():
            if name in self.shadow and self.shadow[name].shape == value.shape:
                self.shadow[name].copy_(value)
            elif name in self.shadow:
                raise ValueError(
                    f"EMA state for {name} has shape {tuple(value.shape)}, expected "
                    f"{tuple(self.shadow[name].shape)}: resume with the same strategy and world size"
                )
