"""Memory plans made before training: model states by ZeRO stage, activations, DIVA extras."""

from diva_lightning.planning.memory import MemoryPlan, RunSpec, plan_memory
from diva_lightning.planning.shapes import ModelShape, from_adapter, published_shape

__all__ = ["MemoryPlan", "ModelShape", "RunSpec", "from_adapter", "plan_memory", "published_shape"]
