"""``GradientBalance``: what each loss term does to the trainable parameters, during training.

Every ``every_n_steps`` optimizer steps, on that step's batch (the last micro-batch when
accumulating), after the step's backward and before its optimizer update (so with exactly the
weights and loss weights that step used), the callback runs the stage's loss once more and takes the gradient of each weighted term (``loss_terms``: understanding,
generation, each alignment direction, L_uni; stage 1's injected terms) with respect to the
trainable backbone parameters (stage 1: its encoders and readouts), by separate autograd passes
on those steps only (``gradients.py``). It logs their norms, pairwise cosines and each term's
part of the clipped update to TensorBoard (``balance/...``), warns once when a DIVA term's
gradient exceeds ``warn_ratio`` times the native one, prints a summary at the end of fit and
writes it to ``<log_dir>/gradient_balance.json``.

Cost: one extra forward and one backward per term on measured steps, and one gradient copy per
term of the measured parameters while measuring. The random state is forked, so the training
run itself is the same with or without the callback. Not available under ZeRO-3, which
partitions the parameters (the callback warns and stays off).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diva_lightning.stages.gradients import gradient_stats, term_gradients


def cosine(stats: dict[str, float], a: str, b: str) -> float:
    """``cos(a, b)`` from ``gradient_stats`` output, whichever order the pair was stored in."""
    return stats.get(f"cos/{a}__{b}", stats.get(f"cos/{b}__{a}", float("nan")))


class GradientBalance(Callback):
    """Per-term gradient norms, cosines and clipped shares (see module docstring).

    Args:
        every_n_steps: measure at optimizer steps 0, n, 2n, ...
        warn_ratio: warn once when a non-native term (or group) has a gradient norm above
            ``warn_ratio`` times the native group's.
    """

    def __init__(self, every_n_steps: int = 50, warn_ratio: float = 3.0):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps, self.warn_ratio = every_n_steps, warn_ratio
        self.history: list[dict[str, float]] = []
        self._last_step, self._warned, self._enabled = -1, False, True
        self._native: set[str] = set()
        self._pending = None

    @staticmethod
    def measure(pl_module, batch, clip: float | None = None) -> dict[str, float]:
        """Per-term gradient statistics of ``pl_module`` on ``batch`` (no state is changed)."""
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            terms = pl_module.loss_terms(batch)
            grads = term_gradients(terms, pl_module.balance_parameters())
        return gradient_stats(grads, pl_module.term_groups, clip)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        self._enabled = True
        if not hasattr(pl_module, "loss_terms"):
            raise TypeError(f"GradientBalance needs a stage with loss_terms, got {type(pl_module)}")
        self._native = {"native", "total", *pl_module.term_groups.get("native", ())}
        if any(hasattr(p, "ds_tensor") for p in pl_module.balance_parameters()):
            rank_zero_warn("GradientBalance is off under ZeRO-3 (parameters are partitioned)")
            self._enabled = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if self._enabled and trainer.global_step % self.every_n_steps == 0:
            self._pending = batch  # measured once the step's backward is done

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        step, batch, self._pending = trainer.global_step, self._pending, None
        if batch is None or step == self._last_step:
            return
        self._last_step = step
        stats = self.measure(pl_module, batch, trainer.gradient_clip_val)
        self.history.append({"step": step, **stats})
        for name, value in stats.items():
            pl_module.log(f"balance/{name}", value, batch_size=1)
        self._check(stats, step)

    def _check(self, stats: dict[str, float], step: int) -> None:
        native = stats.get("norm/native", 0.0)
        if self._warned or native == 0:
            return
        for key, value in stats.items():
            name = key.removeprefix("norm/")
            if (
                key.startswith("norm/")
                and name not in self._native
                and value > self.warn_ratio * native
            ):
                self._warned = True
                rank_zero_warn(
                    f"step {step}: the gradient of {name!r} on the trainable parameters is "
                    f"{value / native:.1f}x the native one (warn_ratio {self.warn_ratio}); "
                    "the native losses get a small part of each clipped update"
                )
                return

    def summary(self) -> dict[str, float]:
        """Mean of every statistic over the measured steps."""
        if not self.history:
            return {}
        keys = [k for k in self.history[0] if k != "step"]
        mean = {k: sum(row[k] for row in self.history) / len(self.history) for k in keys}
        return {"measured_steps": len(self.history), **mean}

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        summary = self.summary()
        if not summary or not trainer.is_global_zero:
            return
        rank_zero_info(format_summary(summary))
        out = Path(trainer.log_dir or trainer.default_root_dir) / "gradient_balance.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "history": self.history}, indent=1))

    def state_dict(self) -> dict:
        return {"history": self.history, "warned": self._warned}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history, self._warned = state_dict["history"], state_dict["warned"]


def format_summary(summary: dict[str, float]) -> str:
    """A plain-text table: per term and group, mean norm, clipped norm, share, cos with native."""
    names = [k.removeprefix("norm/") for k in summary if k.startswith("norm/")]
    lines = [
        f"gradient balance over {summary['measured_steps']} measured steps: total gradient norm "
        f"{summary['norm/total']:.4f}, mean clip scale {summary['clip_scale']:.3f}",
        f"{'term':<12}{'norm':>10}{'after clip':>12}{'share':>8}{'cos(native)':>13}",
    ]

    def cell(value: float | None, width: int, fmt: str) -> str:
        return f"{'-' if value is None or value != value else format(value, fmt):>{width}}"

    for name in (n for n in names if n != "total"):
        cos = None if name == "native" else cosine(summary, name, "native")
        lines.append(
            f"{name:<12}{cell(summary[f'norm/{name}'], 10, '.4f')}"
            f"{cell(summary.get(f'clipped_norm/{name}'), 12, '.4f')}"
            f"{cell(summary.get(f'share/{name}'), 8, '.3f')}{cell(cos, 13, '.3f')}"
        )
    return "\n".join(lines)
