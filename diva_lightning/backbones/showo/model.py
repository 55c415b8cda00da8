"""The Show-o network: transformers' Phi causal LM with Show-o's extended vocabulary.

Show-o (Xie et al. 2024, "Show-o: One Single Transformer to Unify Multimodal Understanding and
Generation") is Phi-1.5 whose vocabulary is extended with the special tokens, the MAGVIT-v2 codes
and one mask token (official ``models/modeling_showo.py``, commit 45a5a2d). The official model is
transformers' Phi with two settings forced by Show-o, both available in ``transformers.PhiConfig``:

* ``qk_layernorm=True`` (LayerNorm over ``head_dim`` of q and k before the partial rotary);
* ``vocab_size`` resized to ``llm_vocab_size + 10 + codebook_size + 1``, untied, ``lm_head`` with bias.

Everything else (parallel decoder blocks, partial rotary on the first ``head_dim * 0.5`` dims,
positions ``0 .. L-1``, final LayerNorm, additive float 4D masks passed through unchanged) is the
stock ``PhiForCausalLM``, so it is reused as is. Parameter names are ``showo.model.*`` /
``showo.lm_head.*`` like the official ``Showo.state_dict()``.

Unified id space: ``[0, llm_vocab_size)`` text, then ``[PAD]`` and 9 special tokens, then the
codes at ``image_token_offset = llm_vocab_size + 10``, and ``mask_token_id = vocab_size - 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn
from transformers import PhiConfig, PhiForCausalLM

from diva_lightning.backbones.zero import rows

NUM_NEW_SPECIAL_TOKENS = 10  # [PAD] + 9 task/boundary tokens


@dataclass
class ShowoConfig:
    """Show-o constructor arguments (official names; ``mask_token_id`` is derived)."""

    vocab_size: int
    llm_vocab_size: int
    codebook_size: int
    num_vq_tokens: int
    w_clip_vit: bool = False

    def __post_init__(self):
        expected = self.image_token_offset + self.codebook_size + 1
        if self.vocab_size != expected:
            raise ValueError(
                f"Show-o vocab_size must be llm_vocab_size + {NUM_NEW_SPECIAL_TOKENS} + "
                f"codebook_size + 1 = {expected}, got {self.vocab_size}"
            )
        if self.w_clip_vit:
            raise NotImplementedError(
                "Show-o with CLIP-ViT understanding features is not supported"
            )

    @property
    def image_token_offset(self) -> int:
        return self.llm_vocab_size + NUM_NEW_SPECIAL_TOKENS

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "mask_token_id": self.mask_token_id}


def build_phi_config(phi: dict | PhiConfig, vocab_size: int) -> PhiConfig:
    """The LLM config as Show-o builds it: qk LayerNorm on, vocabulary resized, untied, no pad row."""
    config = PhiConfig.from_dict(phi if isinstance(phi, dict) else phi.to_dict())
    config.qk_layernorm = True
    config.vocab_size = vocab_size
    config.tie_word_embeddings = False
    config.pad_token_id = None  # Phi-1.5 has none; an embedding padding_idx would freeze a row
    config.use_cache = False
    config._attn_implementation = "sdpa"
    return config


class ShowoModel(nn.Module):
    """``showo``: the Phi causal LM over the unified vocabulary. Forward returns Phi's output."""

    def __init__(self, phi_config: dict | PhiConfig, config: ShowoConfig):
        super().__init__()
        self.config = config
        self.showo = PhiForCausalLM(build_phi_config(phi_config, config.vocab_size))

    @property
    def layers(self) -> nn.ModuleList:
        return self.showo.model.layers

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
        """input_ids (B, L), attention_mask additive float (B, 1, L, L) -> Phi's output
        (``.logits`` (B, L, V); ``.hidden_states`` with ``output_hidden_states=True``)."""
        return self.showo(input_ids=input_ids, attention_mask=self._mask(attention_mask), **kwargs)

    def hidden(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Final-normed hidden states (B, L, D) (the input of ``lm_head``)."""
        out = self.showo.model(input_ids=input_ids, attention_mask=self._mask(attention_mask))
        return out.last_hidden_state

    def _mask(self, mask: Tensor | None) -> Tensor | None:
        if mask is None or mask.dim() != 4:
            return mask
        return mask.to(self.showo.model.embed_tokens.weight.dtype)  # (B, 1, L, L), as Show-o does

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> logits over the whole unified vocabulary (..., V)."""
        return self.showo.lm_head(hidden)

    def image_logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> logits over the codebook only, code ``k`` in column ``k`` (..., K).

        Equal to ``lm_logits(hidden)[..., offset:offset + K]`` without the full-vocabulary matmul.
        """
        start = self.config.image_token_offset
        stop = start + self.config.codebook_size
        head = self.showo.lm_head
        return nn.functional.linear(hidden, rows(head.weight, slice(start, stop)),
                                    rows(head.bias, slice(start, stop)))  # fmt: skip

    def activation_checkpointing_enable(self, **kwargs) -> None:
        self.showo.activation_checkpointing_enable(**kwargs)

    def activation_checkpointing_disable(self) -> None:
        self.showo.activation_checkpointing_disable()
