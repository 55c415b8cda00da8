"""Lightning stages: ``Stage1`` (encoder warm-up), ``Stage2`` (DIVA fine-tuning), ``SFT`` baseline."""

from diva_lightning.stages.base import DualFlowModule
from diva_lightning.stages.sft import SFT
from diva_lightning.stages.stage1 import Stage1
from diva_lightning.stages.stage2 import Stage2

__all__ = ["SFT", "DualFlowModule", "Stage1", "Stage2"]
