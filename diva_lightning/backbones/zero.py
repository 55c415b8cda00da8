"""Reading a parameter's rows outside its module's forward, also under DeepSpeed ZeRO-3.

ZeRO-3 keeps only each rank's partition of a parameter (``param.ds_tensor``) and gathers the
whole tensor around the forward of the module that owns it; in between, ``param`` is empty.
The adapters score the generation flow against the LM head's image rows alone
(``h @ W[ids].T``), so that it never computes full-vocabulary logits, and that read happens
outside the head's forward. In a training step DeepSpeed's prefetcher has the head gathered
(the understanding flow just ran it); a generation-only forward (sampling during training)
found it empty. ``deepspeed.zero.GatheredParameters`` is DeepSpeed's way to read a
partitioned parameter; it is used only when the parameter is not available, so a training
step's gather schedule is left alone.
"""

from __future__ import annotations

from torch import Tensor


def _unavailable(param: Tensor) -> bool:
    if not hasattr(param, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.NOT_AVAILABLE


def rows(param: Tensor, index) -> Tensor:
    """``param[index]``; gathered first when ZeRO-3 holds only a partition of a frozen ``param``
    (the copy is what backward keeps for the input's gradient)."""
    if not _unavailable(param):
        return param[index]
    if param.requires_grad:
        raise ValueError(
            f"a trainable parameter of shape {tuple(param.ds_shape)} is read outside its "
            "module's forward under ZeRO-3: its gradient would miss the partition; freeze it "
            "(the stages keep the LM head frozen) or use ZeRO-2"
        )
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param[index].clone()
