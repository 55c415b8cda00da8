"""Measured counterparts of the plan: the bytes autograd keeps for backward.

CPU tensors have no allocator statistics to read a peak from, so the activation figure is
checked against what autograd itself holds: every tensor a forward saves for backward, seen
through ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage and without the
parameters (which are model states, not activations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def saved_tensor_bytes(module: nn.Module, fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` -> (its result, bytes of the distinct non-parameter storages it saved)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, sum(seen.values())
