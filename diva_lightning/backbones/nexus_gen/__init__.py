"""Nexus-Gen: Qwen2.5-VL with a vision head that regresses image embeddings (continuous targets)."""

from diva_lightning.backbones.nexus_gen.adapter import NexusGenAdapter

__all__ = ["NexusGenAdapter"]
