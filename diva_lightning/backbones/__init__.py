"""Backbone adapters: one abstract contract (``base.BackboneAdapter``), one subclass per UMM."""

import importlib

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import (
    IGNORE_INDEX,
    FlowBatch,
    FlowOutput,
    supervised_cross_entropy,
)

__all__ = [
    "ADAPTERS",
    "IGNORE_INDEX",
    "BackboneAdapter",
    "FlowBatch",
    "FlowOutput",
    "adapter_class",
    "supervised_cross_entropy",
]

# Short names of the shipped adapters (evaluation tools take ``backbone=NAME`` or a class path).
ADAPTERS = {
    "emu3": "diva_lightning.backbones.emu3.Emu3Adapter",
    "janus": "diva_lightning.backbones.janus.JanusAdapter",
    "chameleon": "diva_lightning.backbones.chameleon.ChameleonAdapter",
    "showo": "diva_lightning.backbones.showo.ShowoAdapter",
    "liquid": "diva_lightning.backbones.liquid.LiquidAdapter",
    "nexus-gen": "diva_lightning.backbones.nexus_gen.NexusGenAdapter",
}


def adapter_class(name: str) -> type[BackboneAdapter]:
    """An adapter class by short name (``ADAPTERS``) or dotted class path."""
    path = ADAPTERS.get(name.lower(), name)
    module, _, attr = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, BackboneAdapter)):
        raise ValueError(
            f"backbone {name!r} is neither one of {sorted(ADAPTERS)} nor the class path of a "
            "BackboneAdapter subclass"
        )
    return cls
