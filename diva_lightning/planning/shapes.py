"""The dimensions a memory plan needs, read from an adapter or from a released model's card.

``ModelShape`` holds the transformer's widths and depth, its vocabularies and its flows' token
counts. Two sources:

* ``ModelShape.from_adapter``: a built adapter (the tiny configs, or any model in memory).
* ``published_shape``: a released checkpoint's dimensions (the ``config.json`` values of the
  model card; ``PUBLISHED``), for planning without its weights.

Parameter counts never come from a hand formula: ``block_parameters`` builds one decoder block
of the adapter's own class on the ``meta`` device with the target widths and counts it, so a
bias, a qk-norm or a head width that a formula would miss is counted as the model has it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn

# Released checkpoints, from their model cards' config.json. ``extra_params``: the frozen image
# tokenizer / vision towers (approximate: they are never trained, so they only cost their bf16
# copy; Nexus-Gen: the 0.67B tower, vision_head and the 81 prefill rows). ``codebook``: the width
# of the generation flow's logits (Nexus-Gen: the regressed embeddings). ``image_tokens`` at the resolution the paper trains: Show-o 256 px -> 16 x 16; Liquid
# 512 px -> 32 x 32; Emu3 512 px -> 64 x 64 codes plus one end-of-row token per row.
PUBLISHED: dict[str, dict] = {
    "showo-256": dict(
        hidden=2048, layers=24, intermediate=8192, heads=32, kv_heads=32, head_dim=64,
        vocab=58498, text_vocab=58498, codebook=8192, tied=False,
        image_tokens=256, text_tokens=128, extra_params=int(0.2e9),
    ),
    "showo-512": dict(
        hidden=2048, layers=24, intermediate=8192, heads=32, kv_heads=32, head_dim=64,
        vocab=58498, text_vocab=58498, codebook=8192, tied=False,
        image_tokens=1024, text_tokens=128, extra_params=int(0.2e9),
    ),
    "liquid": dict(  # Liquid-7B: Gemma-7B with 8192 VQ codes appended to its 256,000 tokens
        hidden=3072, layers=28, intermediate=24576, heads=16, kv_heads=16, head_dim=256,
        vocab=264192, text_vocab=264192, codebook=8192, tied=True,
        image_tokens=1024, text_tokens=128, extra_params=int(0.07e9),
    ),
    "emu3": dict(  # Emu3-Chat-hf: Llama-style 8B, 151,643 text + 32,768 vision tokens
        hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
        vocab=184622, text_vocab=184622, codebook=32768, tied=False,
        image_tokens=64 * 64 + 64, text_tokens=128, extra_params=int(0.27e9),
    ),
    "nexus-gen": dict(  # Qwen2.5-VL-7B-Instruct + vision_head (3584 -> 3584): 81 regressed embeddings
        hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, head_dim=128,
        vocab=152064, text_vocab=152064, codebook=3584, tied=False,
        image_tokens=81, text_tokens=128, extra_params=int(0.69e9),
    ),
}  # fmt: skip
# which published shape an adapter class plans with, when its config names no preset
DEFAULT_SHAPE = {"ShowoAdapter": "showo-256", "LiquidAdapter": "liquid", "Emu3Adapter": "emu3",
                 "NexusGenAdapter": "nexus-gen"}  # fmt: skip

# The config keys each dimension has in transformers configs.
CONFIG_KEYS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "intermediate": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "vocab": "vocab_size",
}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a backbone. Token counts are per flow and sample."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int  # rows of the input embedding (text + image tokens)
    text_vocab: int  # width of the understanding flow's logits
    codebook: int  # width of the generation flow's logits
    tied: bool  # LM head shares the embedding
    image_tokens: int
    text_tokens: int  # caption budget plus the prompt template
    extra_params: int = 0  # image tokenizer / vision towers (frozen)
    hidden_act: str = "silu"
    qk_norm: bool = False
    block_params: int = 0  # one decoder block, counted by building it
    layer_class: type | None = field(default=None, compare=False, repr=False)

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def plain_mlp(self) -> bool:
        """Phi-style ``fc1 -> act -> fc2`` (Show-o) rather than a gated MLP."""
        return self.layer_class is not None and "Phi" in self.layer_class.__name__

    def embedding_params(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden + (self.vocab if self.plain_mlp else 0)
        return self.vocab * self.hidden + head

    def total_params(self) -> int:
        return self.layers * self.block_params + self.embedding_params() + self.extra_params

    def tokens(self, flow: str) -> int:
        """Sequence length of one sample of flow ``U`` or ``G`` (image plus text)."""
        return self.image_tokens + self.text_tokens


def _layer_config(adapter: nn.Module):
    layer = adapter.decoder_layers[0]
    return layer, layer.self_attn.config


def _tied(adapter: nn.Module, config) -> bool:
    """Whether the LM head is the input embedding (read from the modules when they say)."""
    model = adapter.model
    if hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings"):
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and embedding is not None:
            return head.weight is embedding.weight
    return bool(getattr(config, "tie_word_embeddings", False))


def block_parameters(layer_class: type, config, **dims) -> int:
    """Parameters of one ``layer_class`` block at ``dims`` (``CONFIG_KEYS`` names), built on
    the meta device: no memory, exact count."""
    config = copy.deepcopy(config)
    for key, value in dims.items():
        setattr(config, CONFIG_KEYS[key], value)
    with torch.device("meta"):
        block = layer_class(config, layer_idx=0)
    return sum(p.numel() for p in block.parameters())


def from_adapter(adapter: nn.Module, name: str | None = None) -> ModelShape:
    """The shape of a built adapter, its parameters counted from its modules."""
    layer, config = _layer_config(adapter)
    heads = config.num_attention_heads
    shape = ModelShape(
        name=name or type(adapter).__name__,
        hidden=adapter.hidden_size,
        layers=adapter.num_layers,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or adapter.hidden_size // heads,
        vocab=config.vocab_size,
        text_vocab=adapter.text_vocab_size,
        codebook=adapter.generation_width,
        tied=_tied(adapter, config),
        image_tokens=adapter.tokens_per_image,
        text_tokens=adapter.caption_token_limit or 64,
        hidden_act=config.hidden_act,
        qk_norm=any("q_norm" in n or "q_layernorm" in n for n, _ in layer.named_parameters()),
        block_params=sum(p.numel() for p in layer.parameters()),
        layer_class=type(layer),
    )
    total = sum({p.data_ptr(): p.numel() for p in adapter.parameters()}.values())
    return replace(shape, extra_params=max(total - shape.total_params(), 0))


def published_shape(adapter_class: type, name: str | None = None, **overrides) -> ModelShape:
    """A released checkpoint's shape (``PUBLISHED``), its block counted with the adapter's own
    layer class. The class's tiny model supplies the layer class and its config (built on CPU in
    a second); ``overrides`` replace any dimension (``image_tokens=...``)."""
    name = name or DEFAULT_SHAPE.get(adapter_class.__name__)
    if name not in PUBLISHED:
        raise ValueError(
            f"no published shape {name!r} for {adapter_class.__name__}; known: "
            f"{sorted(PUBLISHED)} (or plan a model you can build: ModelShape.from_adapter)"
        )
    dims = {**PUBLISHED[name], **overrides}
    tiny = adapter_class.tiny()
    layer, config = _layer_config(tiny)
    block = block_parameters(type(layer), config, **{k: dims[k] for k in CONFIG_KEYS})
    return replace(from_adapter(tiny), name=name, block_params=block, **dims)
