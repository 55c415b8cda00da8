"""Run a range of decoder blocks again, exactly as the last forward called them.

The EMA teacher of stage 2 (paper App. B.2, BYOL-style targets) is the online backbone with the
EMA weights of the trainable blocks in their place. Blocks below the first trainable block are
the same in teacher and student, and nothing above the last middle layer feeds the targets, so
the teacher only needs blocks ``start..end`` run on the hidden state that entered block
``start`` in the student's forward. ``BlockCalls`` records, with forward pre-hooks, the
arguments each of those blocks received (attention mask, rotary tables, positions, ...) and
replays them: no embedding, vision tower, upper block or logit head runs again, and no adapter
needs its own code for it. Written here rather than taken from transformers, which has no API to
run a slice of its decoder stack.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from diva_lightning.backbones.flows import block_output, pool_image_states

CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")  # names across transformers


class BlockCalls:
    """Record the calls of blocks ``start..end`` (1-based, inclusive) during one forward.

    Use as a context manager around the forward; afterwards ``replay`` runs those blocks again,
    under whatever weights they hold then, from the recorded input of block ``start``.
    """

    def __init__(self, blocks: nn.ModuleList, start: int, end: int):
        if not 1 <= start <= end <= len(blocks):
            raise ValueError(f"block range {start}..{end} is outside 1..{len(blocks)}")
        self.blocks, self.start, self.end = blocks, start, end
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self._handles: list = []

    def _hook(self, layer: int):
        def fn(_module, args, kwargs):
            # a KV cache (eval-mode forwards may pass one) would grow on replay: leave it out
            kwargs = {k: None if k in CACHE_KWARGS else v for k, v in kwargs.items()}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self.calls[layer] = (args, kwargs)

        return fn

    def __enter__(self) -> BlockCalls:
        self.calls.clear()
        for layer in range(self.start, self.end + 1):
            block = self.blocks[layer - 1]
            hook = block.register_forward_pre_hook(self._hook(layer), with_kwargs=True)
            self._handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def input(self) -> Tensor:
        """The hidden state (B, T, D) that entered block ``start``, detached."""
        if self.start not in self.calls:
            raise RuntimeError(f"block {self.start} was not called by the recorded forward")
        args, kwargs = self.calls[self.start]
        return (args[0] if args else kwargs["hidden_states"]).detach()

    def replay(
        self,
        layers: Sequence[int],
        positions: Tensor,
        pool_mask: Tensor | None = None,
    ) -> dict[int, Tensor]:
        """Run blocks ``start..end`` from the recorded input -> pooled image states per layer.

        ``layers`` (within ``start..end``) are the blocks whose outputs are kept, pooled over the
        image slots ``positions`` (B, N) like ``LayerCapture`` -> {layer: (B, D)}. The caller
        chooses grad mode and weights; blocks above ``end`` never run.
        """
        hidden = self.input()  # (B, T, D)
        pooled = {}
        for layer in range(self.start, self.end + 1):
            args, kwargs = self.calls[layer]
            if args:
                out = self.blocks[layer - 1](hidden, *args[1:], **kwargs)
            else:
                out = self.blocks[layer - 1](**{**kwargs, "hidden_states": hidden})
            hidden = block_output(out)  # (B, T, D)
            if layer in layers:
                pooled[layer] = pool_image_states(hidden, positions, True, pool_mask)
        return pooled
