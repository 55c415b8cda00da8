"""Both flows of a batch in one forward: the understanding and generation rows stacked.

The two flows of DIVA see the same samples through the same backbone; run separately they are
two forwards of ``B`` rows each. Stacked, they are one forward of ``2B`` rows, padded on the
right to the longer flow's length: right padding leaves every real token's position and
attention unchanged (a causal model attends to nothing after a token, and the padding mask
hides the padding), so each row's states equal its own forward's (test: to float tolerance).
Only adapters whose flows are plain token ids through the default causal forward can do this
(``BackboneAdapter.supports_fused_flows``: Emu3, Chameleon, Liquid; Show-o's omni-attention
masks and Janus's vision inputs differ per flow). Which is faster is measured, not assumed
(``make bench-stages``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor
from torch.nn import functional as F

from diva_lightning.backbones.flows import (
    IGNORE_INDEX,
    FlowBatch,
    FlowOutput,
    LayerCapture,
    supervised_cross_entropy,
)
from diva_lightning.backbones.replay import BlockCalls


def stack_flows(flow_u: FlowBatch, flow_g: FlowBatch, pad_id: int) -> FlowBatch:
    """Rows of U then G, right-padded to the longer length ``T`` -> FlowBatch of ``2B`` rows."""
    width = max(flow_u.input_ids.shape[1], flow_g.input_ids.shape[1])

    def pad(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)  # (B, T)

    return FlowBatch(
        attention_mask=torch.cat([pad(f.attention_mask, 0) for f in (flow_u, flow_g)]),
        labels=torch.cat([pad(f.labels, IGNORE_INDEX) for f in (flow_u, flow_g)]),
        image_positions=torch.cat([flow_u.image_positions, flow_g.image_positions]),
        input_ids=torch.cat([pad(f.input_ids, pad_id) for f in (flow_u, flow_g)]),
    )


def forward_fused(
    adapter,
    flow_u: FlowBatch,
    flow_g: FlowBatch,
    layers: Sequence[int],
    pool: bool = True,
    pool_mask: Tensor | None = None,
    record: tuple[int, int] | None = None,
) -> tuple[FlowOutput, FlowOutput, tuple | None]:
    """Both flows in one forward -> (U output, G output, recorded calls or None).

    ``pool_mask`` (B, N) restricts the generation flow's pooling as in ``forward_flow``; the
    understanding rows pool over all image slots. ``record=(start, end)`` also returns the
    stacked forward's ``(BlockCalls, image positions (2B, N), pool mask (2B, N) or None)`` for
    the EMA teacher's replay, whose rows split like the outputs.
    """
    if not adapter.supports_fused_flows:
        raise ValueError(f"{type(adapter).__name__} cannot fuse its flows (supports_fused_flows)")
    adapter.check_layers(layers)
    adapter.check_positions(flow_u, "U")
    adapter.check_positions(flow_g, "G")
    rows = flow_u.input_ids.shape[0]
    both = stack_flows(flow_u, flow_g, adapter.tokenizer.pad_token_id or 0)
    mask = None
    if pool_mask is not None:  # (2B, N): U rows pool over every image slot
        mask = torch.cat([torch.ones_like(pool_mask), pool_mask])
    capture = LayerCapture(adapter.decoder_layers, layers, both.image_positions, pool, mask)
    calls = BlockCalls(adapter.decoder_layers, *record) if record else None
    with capture, calls if calls is not None else nullcontext():
        hidden = adapter._lm_hidden(both)  # (2B, T, D)
    states = capture.stacked() if layers else hidden.new_zeros(0)
    outputs = []
    for flow, part, logits_of in (
        (flow_u, slice(0, rows), adapter._understanding_logits),
        (flow_g, slice(rows, 2 * rows), adapter._generation_logits),
    ):
        logits, targets = logits_of(hidden[part, : flow.input_ids.shape[1]], flow)
        kept = states[part] if layers else states
        outputs.append(FlowOutput(kept, logits, targets, supervised_cross_entropy(logits, targets)))
    recorded = (calls, both.image_positions, mask) if calls is not None else None
    return outputs[0], outputs[1], recorded
