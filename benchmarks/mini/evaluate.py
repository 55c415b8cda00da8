"""DIVA-mini metrics of one model on the held-out set (definitions: diva_lightning.evaluation).

* understanding: greedy captions parsed against the true objects (``und_*``), and multiple
  choice among the true caption and four one-attribute distractors ranked by likelihood
  (``mc_*``);
* generation (GenEval-style): MaskGIT text-to-image from the held-out captions, decoded by the
  tokenizer, objects found by the programmatic detector (``gen_*``).
"""

from __future__ import annotations

import torch

from benchmarks.mini.data import PROMPT, EvalSet
from benchmarks.mini.tokenizer import PatchTokenizer
from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.evaluation.captions import distractors, parse_caption
from diva_lightning.evaluation.decoding import (
    caption_log_likelihood,
    greedy_captions,
    maskgit_generate,
)
from diva_lightning.evaluation.detector import ShapesDetector
from diva_lightning.evaluation.scores import multiple_choice_scores, object_scores

MAX_CAPTION_TOKENS = 32  # the longest caption of the world is 24 tokens (+ </s>)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def detected_objects(detector: ShapesDetector, pixels: torch.Tensor) -> list[list[dict]]:
    """(B, 3, S, S) in [0, 1] -> the detector's objects per image."""
    grid = detector.world.grid
    return [
        [d.as_object(grid) for d in detector.detect(image.permute(1, 2, 0).numpy())]
        for image in pixels
    ]


def understanding(adapter: BackboneAdapter, data: EvalSet, batch: int) -> tuple[dict, list[str]]:
    captions, true_ll, false_ll = [], [], []
    choices = [distractors(o, data.world, seed=i) for i, o in enumerate(data.objects)]
    for part in _chunks(len(data), batch):
        codes, prompts = data.codes[part], [PROMPT] * (part.stop - part.start)
        captions += greedy_captions(adapter, prompts, codes=codes, max_tokens=MAX_CAPTION_TOKENS)
        true_ll += caption_log_likelihood(
            adapter, prompts, data.captions[part], codes=codes
        ).tolist()
        kinds = {k: [c[k] for c in choices[part]] for k in choices[0]}
        scored = {
            k: caption_log_likelihood(adapter, prompts, v, codes=codes) for k, v in kinds.items()
        }
        false_ll += [{k: float(v[i]) for k, v in scored.items()} for i in range(len(prompts))]
    parsed = [parse_caption(c, data.world) for c in captions]
    scores = {f"und_{k}": v for k, v in object_scores(parsed, data.objects).items()}
    scores.update(multiple_choice_scores(true_ll, false_ll))
    return scores, captions


def generation(
    adapter: BackboneAdapter, tokenizer: PatchTokenizer, data: EvalSet, batch: int, steps: int
) -> tuple[dict, torch.Tensor]:
    codes = torch.cat(
        [
            maskgit_generate(adapter, data.captions[p], steps=steps)
            for p in _chunks(len(data), batch)
        ]
    )
    pixels = tokenizer.decode_images(codes)
    found = detected_objects(ShapesDetector(data.world), pixels)
    return {f"gen_{k}": v for k, v in object_scores(found, data.objects).items()}, pixels


def evaluate(
    adapter: BackboneAdapter, tokenizer: PatchTokenizer, data: EvalSet, batch: int, gen_steps: int
) -> dict:
    """All metrics of ``adapter`` (put in eval mode) plus a few examples."""
    adapter.eval()
    und, captions = understanding(adapter, data, batch)
    gen, pixels = generation(adapter, tokenizer, data, batch, gen_steps)
    examples = [{"true": data.captions[i], "generated": captions[i]} for i in range(4)]
    return {**und, **gen, "examples": examples, "_pixels": pixels[:16]}


def tokenizer_ceiling(tokenizer: PatchTokenizer, data: EvalSet) -> dict:
    """Detector scores on ground-truth images and on their tokenizer reconstructions."""
    detector = ShapesDetector(data.world)
    truth = object_scores(detected_objects(detector, data.pixels), data.objects)
    recon = tokenizer.decode_images(data.codes)
    rebuilt = object_scores(detected_objects(detector, recon), data.objects)
    return {"ground_truth": truth, "reconstructed": rebuilt}
