"""EMA of the trained weights with a decay ramp (paper Table 7/8: 0.99 -> 0.999), DeepSpeed-aware.

Lightning's own ``EMAWeightAveraging`` loses its weights under DeepSpeed ZeRO-2 checkpoints and
crashes under ZeRO-3 (partitioned parameters have shape ``(0,)``). This callback averages what
each rank actually holds: the full parameter when parameters are replicated (single device,
DDP, ZeRO-1/2), or the rank's own partition (``param.ds_tensor``) under ZeRO-3. Its state goes
into the checkpoint's callback state; under ZeRO-3 the per-rank partitions are gathered so the
rank-0 client state holds every rank's shard, and each rank takes its own back on resume. A
state loaded before ``on_fit_start`` is applied there; under DeepSpeed, Lightning restores
callback states after ``on_fit_start`` (``restore_checkpoint_after_setup``), so it is applied
on load.

The same average gives stage 2 its EMA-teacher targets (paper App. B.2: EMA "to provide stable
targets for bidirectional alignment"): ``swapped_in`` puts the averaged weights into chosen
parameters for the duration of a no-grad forward and puts the online ones back, without a second
copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

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
        self._rank = 0
        self._chosen: dict[tuple, list[str]] = {}
        self._params: dict[tuple, list[torch.Tensor]] = {}

    def _tracked(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    @property
    def ready(self) -> bool:
        """True once ``track`` has taken the first copy of the weights."""
        return bool(self.shadow)

    def track(self, pl_module: L.LightningModule) -> None:
        """Start averaging the module's trainable parameters from their current values."""
        tracked = self._tracked(pl_module)
        self.shadow = {n: _storage(p).detach().float().clone() for n, p in tracked.items()}
        self._sharded = any(hasattr(p, "ds_tensor") for p in tracked.values())
        self._chosen.clear()
        self._params.clear()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.track(pl_module)
        self._rank = trainer.global_rank
        if self._loaded is not None:
            self._restore(self._loaded, self._rank)
            self._loaded = None
        self._last_step = trainer.global_step

    @torch.no_grad()
    def update(self, pl_module: L.LightningModule) -> float:
        """One EMA update after an optimizer step; returns the decay used."""
        decay = self.decay(self.updates)
        tracked = self._tracked(pl_module)
        names = [n for n in self.shadow if n in tracked]
        current = [_storage(tracked[n]).float() for n in names]
        torch._foreach_lerp_([self.shadow[n] for n in names], current, 1.0 - decay)
        self.updates += 1
        return decay

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = trainer.global_step
        pl_module.log("train/ema_decay", self.update(pl_module))

    @contextmanager
    def swapped_in(self, pl_module: L.LightningModule, names: Iterable[str]) -> Iterator[None]:
        """Within the block, the parameters ``names`` hold their EMA weights; the online ones are
        put back on exit. Parameters are re-pointed, not copied (a dtype cast is the only copy).

        Meant for a no-grad forward between the online forward and its backward: the backward
        then sees the online weights again. Under ZeRO-3 the partitions are swapped, and any
        parameter gathered at the time (persistent, or kept for reuse) is refreshed from them.
        """
        key = tuple(names)
        if key not in self._chosen:  # resolved once per set of names
            params = dict(pl_module.named_parameters())
            self._chosen[key] = [n for n in key if n in self.shadow and n in params]
            self._params[key] = [params[n] for n in self._chosen[key]]
        chosen = list(
            zip(self._params[key], [self.shadow[n] for n in self._chosen[key]], strict=True)
        )
        holders = [getattr(p, "ds_tensor", p) for p, _ in chosen]
        online = [h.data for h in holders]
        with torch.no_grad():
            for holder, (_, shadow) in zip(holders, chosen, strict=True):
                holder.data = shadow.to(holder.dtype)
            if self._sharded:
                _refresh_gathered([p for p, _ in chosen])
            try:
                yield
            finally:
                for holder, data in zip(holders, online, strict=True):
                    holder.data = data
                if self._sharded:
                    _refresh_gathered([p for p, _ in chosen])

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
        if self.shadow:  # already tracking (DeepSpeed restores after on_fit_start): apply now
            self._restore(state_dict, self._rank)
        else:
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


def _refresh_gathered(params: list[torch.Tensor]) -> None:
    """ZeRO-3: rebuild the full data of every gathered parameter from its (swapped) partitions.

    A parameter is gathered on some rank when it is persistent or kept for reuse; the list is
    agreed across ranks so that every rank joins the same all-gathers.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    zero = [p for p in params if hasattr(p, "ds_tensor")]
    flags = torch.tensor(
        [p.ds_status == ZeroParamStatus.AVAILABLE for p in zero], dtype=torch.uint8
    )
    if _distributed():
        device = zero[0].ds_tensor.device if zero else flags.device
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    for param, flag in zip(zero, flags.tolist(), strict=True):
        if not flag:
            continue
        part = param.ds_tensor.data  # (partition,)
        group = getattr(param, "ds_process_group", None)
        chunks = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(chunks, part, group=group)
        if param.ds_status == ZeroParamStatus.AVAILABLE:
            full = torch.cat(chunks)[: param.ds_numel].view(param.ds_shape)
            param.data.copy_(full)
