"""Decoding through the adapter contract: captions, caption likelihoods, image generation.

Only ``build_understanding`` / ``build_generation`` / ``forward_flow`` are used, so every
backbone adapter gets these for free:

* ``caption_log_likelihood``: sum of the caption's token log-probabilities (the caption's
  ``</s>`` included) under the understanding flow: the multiple-choice score.
* ``greedy_captions``: greedy decoding. The understanding flow scores the slot after the
  caption (its end-of-text slot), so the logits of a sample's last supervised slot are the
  next-token distribution after the partial caption. Partial captions go back through the
  tokenizer as text (exact for the tiny word-level tokenizer; real BPE tokenizers round-trip
  ``decode`` -> encode on ordinary text). No KV cache: one full forward per token.
* ``maskgit_generate``: text-to-image through the generation (inpainting) flow, starting from a
  fully masked grid (MaskGIT, Chang et al. 2022): each step predicts every masked code, keeps the
  most confident ones and leaves ``floor(N cos(pi/2 * (s+1)/steps))`` masked (cosine schedule);
  ``order="raster"`` fills the grid left to right, one code per step (autoregressive order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.backbones.flows import IGNORE_INDEX


def _device(adapter: BackboneAdapter) -> torch.device:
    return next(adapter.parameters()).device


def _token_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (B, S, V), targets (B, S) -> log p(target) (B, S), 0 at padding."""
    valid = targets != IGNORE_INDEX
    log_probs = logits.float().log_softmax(-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * valid


@torch.no_grad()
def continuation_scores(
    adapter: BackboneAdapter,
    prompts: Sequence[str],
    captions: Sequence[str],
    codes: Tensor | None = None,
    pixels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """log p(caption | image, prompt) (B,), and whether greedy decoding would have produced the
    caption token by token (B,) bool: lmms-eval's ``loglikelihood`` pair."""
    batch = adapter.build_understanding(prompts, captions, codes=codes, pixels=pixels)
    out = adapter.forward_flow(batch.to(_device(adapter)), "U")
    valid = out.targets != IGNORE_INDEX  # (B, S)
    greedy = ((out.logits.argmax(-1) == out.targets) | ~valid).all(1)
    return _token_log_probs(out.logits, out.targets).sum(1), greedy


@torch.no_grad()
def caption_log_likelihood(
    adapter: BackboneAdapter,
    prompts: Sequence[str],
    captions: Sequence[str],
    codes: Tensor | None = None,
    pixels: Tensor | None = None,
) -> Tensor:
    """log p(caption | image, prompt) per sample, (B,)."""
    return continuation_scores(adapter, prompts, captions, codes=codes, pixels=pixels)[0]


@torch.no_grad()
def greedy_captions(
    adapter: BackboneAdapter,
    prompts: Sequence[str],
    codes: Tensor | None = None,
    pixels: Tensor | None = None,
    max_tokens: int = 48,
    stop_early: bool = True,
) -> list[str]:
    """Greedy captions of B images; stops at the tokenizer's end-of-text token. Finished
    captions leave the batch, so later steps only run the unfinished ones. ``stop_early=False``
    runs all ``max_tokens`` steps on the whole batch (ranks of a sharded model must run the
    same forward passes); the captions are the same."""
    tokenizer, device = adapter.tokenizer, _device(adapter)
    eos = tokenizer.eos_token_id
    tokens: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # samples still decoding
    finished: set[int] = set()
    for _ in range(max_tokens):
        if not stop_early:
            active = list(range(len(prompts)))
        pick = torch.tensor(active)
        batch = adapter.build_understanding(
            [prompts[i] for i in active],
            [tokenizer.decode(tokens[i]) for i in active],
            codes=None if codes is None else codes[pick],
            pixels=None if pixels is None else pixels[pick],
        )
        out = adapter.forward_flow(batch.to(device), "U")
        last = (out.targets != IGNORE_INDEX).sum(1) - 1  # (A,) the slot after the caption
        next_ids = out.logits[torch.arange(len(last)), last].argmax(-1).tolist()
        for i, token in zip(active, next_ids, strict=True):
            if token != eos and i not in finished:
                tokens[i].append(token)
            elif token == eos:
                finished.add(i)
        active = [i for i in active if i not in finished]
        if not active and stop_early:
            break
    return [tokenizer.decode(t) for t in tokens]


def _keep_masked(step: int, steps: int, n: int) -> int:
    """Codes still masked after ``step`` (0-based) of ``steps`` (cosine schedule)."""
    return int(math.floor(n * math.cos(math.pi / 2 * (step + 1) / steps)))


@torch.no_grad()
def maskgit_generate(
    adapter: BackboneAdapter,
    captions: Sequence[str],
    steps: int = 8,
    order: str = "confidence",
    temperature: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cfg_scale: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Image codes (B, N) for ``captions``; greedy when ``temperature`` is 0.

    ``top_k`` (0: off) / ``top_p`` (1: off): sampling keeps only the ``top_k`` most likely codes
    / the smallest set whose probability reaches ``top_p`` (transformers' logits warpers).

    ``generator``: one for the batch, or one per caption (then an image depends only on its own
    seed, not on the batch it is in). ``cfg_scale`` != 1: classifier-free guidance,
    ``uncond + cfg_scale * (cond - uncond)``, the unconditional logits from the same flow with
    an empty caption."""
    if order not in ("confidence", "raster"):
        raise ValueError(f"order must be 'confidence' or 'raster', got {order!r}")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {top_k} and {top_p}")
    warpers = [TopKLogitsWarper(top_k)] if top_k > 0 else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    n, device = adapter.tokens_per_image, _device(adapter)
    steps = n if order == "raster" else steps
    codes = torch.zeros(len(captions), n, dtype=torch.long)
    masked = torch.ones(len(captions), n, dtype=torch.bool)
    generators = generator if isinstance(generator, Sequence) else [generator] * len(captions)
    for step in range(steps):
        batch = adapter.build_generation(captions, codes, masked)
        logits = adapter.forward_flow(batch.to(device), "G").logits.float().cpu()  # (B, S, K)
        if cfg_scale != 1.0:
            blank = adapter.build_generation([""] * len(captions), codes, masked)
            uncond = adapter.forward_flow(blank.to(device), "G").logits.float().cpu()
            logits = uncond + cfg_scale * (logits - uncond)
        for i in range(len(captions)):
            generator = generators[i]
            where = masked[i].nonzero().flatten()  # grid index of each slot, row-major
            probs = logits[i, : len(where)].softmax(-1)  # (M, K)
            if temperature > 0:
                scores = logits[i, : len(where)] / temperature  # (M, K)
                for warper in warpers:
                    scores = warper(None, scores)
                scaled = scores.softmax(-1)
                picked = torch.multinomial(scaled, 1, generator=generator).squeeze(-1)
            else:
                picked = probs.argmax(-1)
            confidence = probs.gather(-1, picked.unsqueeze(-1)).squeeze(-1)  # (M,)
            keep = n - step - 1 if order == "raster" else _keep_masked(step, steps, n)
            reveal = max(1, len(where) - keep)
            chosen = (
                torch.arange(reveal)
                if order == "raster"
                else confidence.argsort(descending=True)[:reveal]
            )
            codes[i, where[chosen]] = picked[chosen]
            masked[i, where[chosen]] = False
        if not masked.any():
            break
    return codes
