"""Liquid (and any causal LM whose vocabulary is extended with VQ codes): adapter, VQGAN, preprocessing."""

from diva_lightning.backbones.liquid.adapter import PRESETS, LiquidAdapter

__all__ = ["PRESETS", "LiquidAdapter"]
