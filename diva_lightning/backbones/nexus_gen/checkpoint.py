"""Nexus-Gen's checkpoint keys -> transformers 5.x ``Qwen2_5_VLForConditionalGeneration``.

Nexus-Gen pins transformers 4.49, whose Qwen2.5-VL keeps the vision tower at ``visual.*`` and
the language model at ``model.*``; 5.x nests both under ``model`` (``model.visual.*``,
``model.language_model.*``); ``lm_head.*`` is unchanged. Their two additions have no
counterpart in the stock class and stay with the adapter: ``vision_head`` (a bias-free
Linear, hidden -> hidden, that regresses the next image embedding) and
``image_prefill_embeds`` (81 rows, the inputs at the generated image's positions).
transformers' own ``from_pretrained`` applies the same renaming to such a folder; this module
is used to load their state dict by hand, to say which keys went where, and to refuse a
checkpoint that does not fit with the key named (checked on the golden fixtures).
"""

from __future__ import annotations

from torch import Tensor

EXTRA = ("vision_head.weight", "image_prefill_embeds.weight")


def to_transformers5(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Their keys (4.49 layout) -> (the stock model's state dict, ``{vision_head.weight,
    image_prefill_embeds.weight}``). Keys already in the 5.x layout pass unchanged."""
    model, extra = {}, {}
    for key, value in state_dict.items():
        if key in EXTRA:
            extra[key] = value
        elif key.startswith(("model.visual.", "model.language_model.")):
            model[key] = value
        elif key.startswith("visual."):
            model["model." + key] = value
        elif key.startswith("model."):
            model["model.language_model." + key.removeprefix("model.")] = value
        else:
            model[key] = value
    return model, extra


def load_into(model, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Load their state dict into a stock ``Qwen2_5_VLForConditionalGeneration`` (strict) ->
    the extra tensors. A missing or unexpected key is a ``ValueError`` naming it."""
    mapped, extra = to_transformers5(state_dict)
    result = model.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("inv_freq")]
    if missing or result.unexpected_keys or set(extra) != set(EXTRA):
        raise ValueError(
            f"not a Nexus-Gen checkpoint for this config: missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}, Nexus-Gen tensors found {sorted(extra)} "
            f"(expected {list(EXTRA)})"
        )
    return extra
