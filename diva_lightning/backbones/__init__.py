"""Backbone adapters: one abstract contract (``base.BackboneAdapter``), one subclass per UMM."""

from diva_lightning.backbones.base import (
    IGNORE_INDEX,
    BackboneAdapter,
    FlowBatch,
    FlowOutput,
    supervised_cross_entropy,
)

__all__ = [
    "IGNORE_INDEX",
    "BackboneAdapter",
    "FlowBatch",
    "FlowOutput",
    "supervised_cross_entropy",
]
