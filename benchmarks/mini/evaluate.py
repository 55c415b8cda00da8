"""DIVA-mini metrics of one model on the held-out set (definitions: diva_lightning.evaluation).

* understanding: greedy captions parsed against the true objects (``und_*``), and multiple
  choice among the true caption and four one-attribute distractors ranked by likelihood
  (``mc_*``);
* generation (GenEval-style): MaskGIT text-to-image from the held-out captions, decoded by the
  tokenizer, objects found by the programmatic detector (``gen_*``).

World v2 adds (``diva_lightning.evaluation.shapes.probes``): multiple choice against binding
distractors (``mcb_*``: an attribute swapped between two objects; ``mcb_accuracy`` is the true
caption beating every binding distractor of its sample, over samples that have one), the
binding-blind bag score of the captions (``und_bag_*``), the POPE-style yes/no probe
(``pope_*``: the answer is whichever of "yes" and "no" is likelier after the question), and the
GenEval-style categories (``gen_<category>``, ``gen_overall``) on ``data.geneval``'s prompts.
"""

from __future__ import annotations

import torch

from benchmarks.mini.data import PROMPT, EvalSet
from benchmarks.mini.tokenizer import PatchTokenizer
from diva_lightning.backbones.base import BackboneAdapter
from diva_lightning.evaluation.decoding import (
    caption_log_likelihood,
    greedy_captions,
    maskgit_generate,
)
from diva_lightning.evaluation.shapes.captions import (
    DISTRACTOR_KINDS,
    binding_kinds,
    distractors,
    parse_caption,
)
from diva_lightning.evaluation.shapes.detector import ShapesDetector
from diva_lightning.evaluation.shapes.probes import (
    geneval_correct,
    geneval_scores,
    pope_questions,
    pope_scores,
)
from diva_lightning.evaluation.shapes.scores import (
    bag_scores,
    multiple_choice_scores,
    object_scores,
)


def caption_budget(world) -> int:
    """Greedy-decoding budget: the longest canonical caption (v1: 24 tokens, v2: 40) and </s>,
    with room to spare."""
    return 48 if hasattr(world, "sizes") else 32


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


def _choices(data: EvalSet) -> list[dict[str, str]]:
    """Per sample: one distractor per plain kind, and (world v2) per binding kind it allows."""
    v2 = data.geneval is not None
    return [
        distractors(
            o, data.world, seed=i, kinds=DISTRACTOR_KINDS + (binding_kinds(o) if v2 else ())
        )
        for i, o in enumerate(data.objects)
    ]


def understanding(adapter: BackboneAdapter, data: EvalSet, batch: int) -> tuple[dict, list[str]]:
    captions, true_ll = [], []
    budget = caption_budget(data.world)
    for part in _chunks(len(data), batch):
        codes, prompts = data.codes[part], [PROMPT] * (part.stop - part.start)
        captions += greedy_captions(adapter, prompts, codes=codes, max_tokens=budget)
        true_ll += caption_log_likelihood(
            adapter, prompts, data.captions[part], codes=codes
        ).tolist()
    flat = [(i, kind, text) for i, options in enumerate(_choices(data))
            for kind, text in options.items()]  # fmt: skip
    false_ll: list[dict[str, float]] = [{} for _ in range(len(data))]
    for part in _chunks(len(flat), batch):  # every (sample, distractor) pair, batched
        rows = [i for i, _, _ in flat[part]]
        ll = caption_log_likelihood(adapter, [PROMPT] * len(rows), [t for _, _, t in flat[part]],
                                    codes=data.codes[rows])  # fmt: skip
        for (i, kind, _), value in zip(flat[part], ll.tolist(), strict=True):
            false_ll[i][kind] = value
    parsed = [parse_caption(c, data.world) for c in captions]
    scores = {f"und_{k}": v for k, v in object_scores(parsed, data.objects).items()}
    plain = [{k: v for k, v in d.items() if not k.startswith("bind_")} for d in false_ll]
    scores.update(multiple_choice_scores(true_ll, plain))
    if data.geneval is not None:
        scores.update({f"und_{k}": v for k, v in bag_scores(parsed, data.objects).items()})
        bound = [(t, {k: v for k, v in d.items() if k.startswith("bind_")})
                 for t, d in zip(true_ll, false_ll, strict=True)]  # fmt: skip
        bound = [(t, d) for t, d in bound if d]
        binding = multiple_choice_scores([t for t, _ in bound], [d for _, d in bound])
        scores.update({k.replace("mc_", "mcb_", 1): v for k, v in binding.items()})
    return scores, captions


def pope(adapter: BackboneAdapter, data: EvalSet, batch: int) -> dict[str, float]:
    """POPE-style probe: one "yes" and one adversarial "no" question per sample."""
    questions = [pope_questions(o, data.world, seed=i) for i, o in enumerate(data.objects)]
    flat = [(q, a, i) for i, pair in enumerate(questions) for q, a in pair]
    predicted = []
    for part in _chunks(len(flat), batch):
        asked = [q for q, _, _ in flat[part]]
        codes = data.codes[[i for _, _, i in flat[part]]]
        yes = caption_log_likelihood(adapter, asked, ["yes"] * len(asked), codes=codes)
        no = caption_log_likelihood(adapter, asked, ["no"] * len(asked), codes=codes)
        predicted += [
            "yes" if y > n else "no" for y, n in zip(yes.tolist(), no.tolist(), strict=True)
        ]
    return pope_scores([a for _, a, _ in flat], predicted)


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


def geneval(
    adapter: BackboneAdapter, tokenizer: PatchTokenizer, data: EvalSet, batch: int, steps: int
) -> tuple[dict, torch.Tensor, list[bool]]:
    """GenEval-style categories on ``data.geneval`` -> (scores, images, per-prompt correct)."""
    prompts = [p for p, _, _ in data.geneval]
    codes = torch.cat([maskgit_generate(adapter, prompts[p], steps=steps)
                       for p in _chunks(len(prompts), batch)])  # fmt: skip
    pixels = tokenizer.decode_images(codes)
    found = detected_objects(ShapesDetector(data.world), pixels)
    truth, categories = [o for _, o, _ in data.geneval], [c for _, _, c in data.geneval]
    scores = geneval_scores(categories, found, truth)
    scores.update({f"gen_obj_{k}": v for k, v in object_scores(found, truth).items()})
    correct = [geneval_correct(c, f, t) for c, f, t in zip(categories, found, truth, strict=True)]
    return scores, pixels, correct


def evaluate(
    adapter: BackboneAdapter, tokenizer: PatchTokenizer, data: EvalSet, batch: int, gen_steps: int
) -> dict:
    """All metrics of ``adapter`` (put in eval mode) plus a few examples."""
    adapter.eval()
    und, captions = understanding(adapter, data, batch)
    examples = [{"true": data.captions[i], "generated": captions[i]} for i in range(4)]
    if data.geneval is None:
        gen, pixels = generation(adapter, tokenizer, data, batch, gen_steps)
        return {**und, **gen, "examples": examples, "_pixels": pixels[:16]}
    und.update(pope(adapter, data, batch))
    gen, pixels, correct = geneval(adapter, tokenizer, data, batch, gen_steps)
    per_prompt = {"caption_score": _caption_rows(captions, data), "geneval_correct": correct}
    return {**und, **gen, "examples": examples, "_pixels": pixels[:16], "per_prompt": per_prompt}


def _caption_rows(captions: list[str], data: EvalSet) -> list[float]:
    """Per-sample caption attribute score (for bootstrap intervals over prompts)."""
    return [
        object_scores([parse_caption(c, data.world)], [o])["score"]
        for c, o in zip(captions, data.objects, strict=True)
    ]


def tokenizer_ceiling(tokenizer: PatchTokenizer, data: EvalSet) -> dict:
    """Detector scores on ground-truth images and on their tokenizer reconstructions."""
    detector = ShapesDetector(data.world)
    truth = object_scores(detected_objects(detector, data.pixels), data.objects)
    recon = tokenizer.decode_images(data.codes)
    rebuilt = object_scores(detected_objects(detector, recon), data.objects)
    return {"ground_truth": truth, "reconstructed": rebuilt}
