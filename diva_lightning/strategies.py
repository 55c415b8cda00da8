"""``CPUDeepSpeedStrategy``: DeepSpeed ZeRO on CPU processes (gloo), for tests and CI.

Stock Lightning refuses DeepSpeed without CUDA. This subclass runs the same ZeRO-2/3 code path
on CPU processes so the DeepSpeed integration (sharded optimizer states, checkpoint save and
resume, the EMA callback, ``convert_zero_checkpoint_to_fp32_state_dict``) is exercised where no
GPU exists. On GPUs use Lightning's ``DeepSpeedStrategy`` (``strategy: deepspeed_stage_2`` or a
``config`` JSON from ``configs/deepspeed/``).
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed on CPU with the gloo backend (same arguments as ``DeepSpeedStrategy``)."""

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skip the CUDA-only check

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
