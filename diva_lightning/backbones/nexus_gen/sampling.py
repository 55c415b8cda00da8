"""Nexus-Gen's greedy generation loop ("prefilled autoregression"), step for step.

Stock ``generate`` has no prefill or ``vision_head`` logic, so the loop is written here, on the
language model with a KV cache, as their ``_sample`` runs it (batch 1, greedy):

1. Every step masks the ``<|vision_end|>`` logit first, then the optional ``forced`` ids
   (one per step, as a logits processor would impose them), then takes the argmax.
2. The step whose input is ``<|vision_start|>`` gives image embedding 0 (``vision_head`` of its
   hidden state); its token is overridden to ``<|image_pad|>``.
3. Image step ``j = 1..80`` feeds ``image_prefill_embeds[j - 1]`` at pad ``j - 1``'s 3-D position
   (``get_rope_index`` on the ids padded to the full image) and gives embedding ``j``.
4. One more step feeds row 80 at pad 80's position; its output is dropped and its token forced
   to ``<|vision_end|>``. Text follows.
5. Text positions are ``cache position + rope_deltas``, the deltas fixed at step 0 (so after
   a generated image they are not the training positions: their code does this).
Checked on the golden fixtures: ids exact, embeddings within 1e-5.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from diva_lightning.backbones.nexus_gen.layout import ChatTokens


def _rope(model, ids: list[int], pad: int, grids: list[list[int]]) -> tuple[Tensor, int]:
    tensor = torch.tensor([ids])
    types = (tensor == pad).int()
    grid = torch.tensor(grids) if grids else None
    pos, deltas = model.model.get_rope_index(
        tensor, types, grid, None, None, torch.ones_like(tensor)
    )
    return pos[:, 0], int(deltas.flatten()[0]) if grids else 0  # (3, L)


@torch.no_grad()
def greedy_generate(model, vision_head: Tensor, prefill: Tensor, prompt_ids: list[int],
                    tokens: ChatTokens, eos: set[int], max_new_tokens: int = 200,
                    forced: list[int] = (), prompt_grids: list[list[int]] = (),
                    prompt_embeds: Tensor | None = None,
                    image_grid: tuple[int, int, int] = (1, 18, 18)) -> dict:  # fmt: skip
    """-> {"sequence": ids, "image_embeds": (n, D), "positions": (S, 3), "kinds": (S,),
    "text_logits": {step: logits}}. ``prompt_embeds`` (P, D): the prompt's input embeddings
    when it holds images (tower output at their pads); else the token embeddings."""
    lm, head = model.model.language_model, model.lm_head
    embed = lm.get_input_embeddings()
    count = image_grid[0] * image_grid[1] * image_grid[2] // 4
    seq, grids = list(prompt_ids), [list(g) for g in prompt_grids]
    pos, deltas = _rope(model, seq, tokens.image_pad, grids)
    inputs = prompt_embeds if prompt_embeds is not None else embed(torch.tensor(seq))
    cache = DynamicCache()
    positions, kinds, images, text_logits = [], [], [], {}
    image_pos, j = None, None  # pads' positions (3, count) and the next image row
    for step in range(max_new_tokens):
        out = lm(inputs_embeds=inputs[None], position_ids=pos[:, None], past_key_values=cache,
                 use_cache=True)  # fmt: skip
        h = out.last_hidden_state[0, -1]  # (D,)
        positions.append(pos[:, -1].tolist())
        kinds.append(-1 if j is None or j == 0 and seq[-1] == tokens.vision_start else j - 1)
        logits = head(h).float()
        logits[tokens.vision_end] = float("-inf")
        raw = logits.clone()  # what a text step records: before any forcing
        if step < len(forced):
            keep = logits[forced[step]].clone()
            logits.fill_(float("-inf"))
            logits[forced[step]] = keep
        token = int(logits.argmax())
        if j is not None:  # image mode: the input was <|vision_start|> or a prefill row
            if j < count:
                images.append(h @ vision_head.T)
                token, j = tokens.image_pad, j + 1
            else:
                token, j = tokens.vision_end, None
        if token != tokens.image_pad:
            text_logits[step] = raw
        seq.append(token)
        if token in eos:
            break
        if token == tokens.vision_start:  # image mode from the next step
            image_pos, _ = _rope(
                model,
                seq + [tokens.image_pad] * count,
                tokens.image_pad,
                grids + [list(image_grid)],
            )
            image_pos, j = image_pos[:, len(seq) :], 0
            grids.append(list(image_grid))  # its pads count as an image from now on
        if j is not None and j > 0:
            inputs, pos = prefill[j - 1][None], image_pos[:, j - 1 : j]
        else:
            inputs = embed(torch.tensor([token]))
            pos = torch.full((3, 1), len(seq) - 1 + deltas)
    return {"sequence": seq, "image_embeds": torch.stack(images) if images else None,
            "positions": torch.tensor(positions), "kinds": torch.tensor(kinds),
            "text_logits": text_logits}  # fmt: skip
