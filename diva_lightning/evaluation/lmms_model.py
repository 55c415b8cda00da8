"""An lmms-eval model for every backbone adapter: ``--model diva``.

    python -m lmms_eval --model diva \\
        --model_args pretrained=EXPORTED_DIR,backbone=showo,mode=understanding \\
        --tasks pope,mme,mmmu_val --batch_size 8 --output_path results/

lmms-eval (0.7.x) finds the model through the entry point ``diva`` of the group
``lmms_eval.models`` (``pyproject.toml``), which loads ``manifests``: no fork of lmms-eval. The
model is lmms-eval's "simple" kind, so multiple-choice and log-likelihood tasks run too.

``model_args``:

* ``pretrained``: a folder written by ``diva-cli export`` (or any adapter's ``save_pretrained``);
* ``backbone``: ``emu3``, ``janus``, ``chameleon``, ``showo``, ``liquid``, ``nexus-gen`` or an adapter's class path;
* ``mode``: as lmms-eval's unified models (its Bagel model): ``understanding`` answers with text;
  ``generate`` turns each request's text into an image through the generation flow, saves it
  under ``output_dir`` and answers ``{"text": "", "images": [path]}`` as Bagel does;
* ``device``, ``batch_size``, ``max_new_tokens`` (default of requests without one),
  ``generation_steps``, ``temperature``, ``seed``, ``output_dir``.

Understanding uses the backbone's own understanding layout (``build_understanding``): the task's
context is the prompt, the answer is decoded greedily after it. ``loglikelihood`` answers
lmms-eval's convention: the value is the continuation's negative log-likelihood (lmms-eval's
multiple choice takes the smallest), with whether greedy decoding reproduces the continuation.
The likelihood includes the adapter's end-of-text token after the continuation, the same score as
``decoding.caption_log_likelihood``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from diva_lightning.backbones import adapter_class
from diva_lightning.data.decode import image_pixels
from diva_lightning.evaluation.decoding import (
    continuation_scores,
    greedy_captions,
    maskgit_generate,
)

MODES = ("understanding", "generate")


def manifests():
    """The entry point lmms-eval reads (group ``lmms_eval.models``): the ``diva`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="diva", simple_class_path=f"{__name__}.DivaLMM")]


class DivaLMM(lmms):
    """A post-trained (or any) backbone adapter behind lmms-eval's model interface."""

    is_simple = True

    def __init__(self, pretrained: str, backbone: str = "emu3", mode: str = "understanding",
                 device: str = "cpu", batch_size: int | str = 1, max_new_tokens: int = 32,
                 generation_steps: int = 16, temperature: float = 0.0, seed: int = 0,
                 output_dir: str = "lmms_images", **unknown) -> None:  # fmt: skip
        super().__init__()
        if unknown:
            raise ValueError(f"diva model: unknown model_args {sorted(unknown)}")
        if mode not in MODES:
            raise ValueError(f"diva model: mode must be one of {MODES}, got {mode!r}")
        if not Path(pretrained).is_dir():
            raise FileNotFoundError(f"diva model: pretrained={pretrained} is not a folder")
        self.adapter = adapter_class(backbone).from_pretrained(pretrained).to(device).eval()
        self.mode, self._device = mode, torch.device(device)
        self.batch_size_per_gpu = int(batch_size)  # lmms-eval passes it as a string
        self.max_new_tokens, self.generation_steps = int(max_new_tokens), int(generation_steps)
        self.temperature, self.seed = float(temperature), int(seed)
        self.output_dir = Path(output_dir)

    # ---- inputs --------------------------------------------------------------------------------
    def _image(self, request: Instance) -> torch.Tensor:
        """The request's first image -> pixels (3, S, S) in [0, 1], preprocessed as in training."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        if not visuals:
            raise ValueError(f"diva model: {task} document {doc_id} has no image")
        size, preprocess = self.adapter.image_size, self.adapter.image_preprocess
        return image_pixels(visuals[0], size, preprocess).float() / 255.0

    def _understanding_inputs(self, requests: list[Instance]) -> dict:
        pixels = torch.stack([self._image(r) for r in requests]).to(self._device)  # (B, 3, S, S)
        inputs = {"codes": self.adapter.tokenize_images(pixels)}
        if self.adapter.needs_pixels_for_understanding:
            inputs["pixels"] = pixels
        return inputs

    def _batches(self, requests: list[Instance], desc: str):
        bar = tqdm(total=len(requests), desc=desc, disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            yield chunk
            bar.update(len(chunk))
        bar.close()

    # ---- lmms-eval's interface -----------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        out = []
        for chunk in self._batches(requests, "diva loglikelihood"):
            contexts, continuations = [], []
            for r in chunk:
                context, continuation, _, doc_id, task, split = r.args
                if callable(continuation):  # output_type loglikelihood hands doc_to_target
                    continuation = continuation(self.task_dict[task][split][doc_id])
                contexts.append(context)
                continuations.append(str(continuation))
            log_p, greedy = continuation_scores(self.adapter, contexts, continuations,
                                                **self._understanding_inputs(chunk))  # fmt: skip
            # wrapped: lmms-eval 0.7.3 turns a bare (float, bool) response into a string
            out += [
                GenerationResult(text=(-float(lp), bool(g)))
                for lp, g in zip(log_p, greedy, strict=True)
            ]
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        if self.mode == "generate":
            return self._generate_images(requests)
        out = []
        for chunk in self._batches(requests, "diva understanding"):
            kwargs = [r.args[1] or {} for r in chunk]
            budget = max(int(k.get("max_new_tokens", self.max_new_tokens)) for k in kwargs)
            answers = greedy_captions(self.adapter, [r.args[0] for r in chunk],
                                      max_tokens=budget, **self._understanding_inputs(chunk))  # fmt: skip
            out += [_cut(a, k.get("until")) for a, k in zip(answers, kwargs, strict=True)]
        return out

    def _generate_images(self, requests: list[Instance]) -> list[str]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for chunk in self._batches(requests, "diva generate"):
            generator = torch.Generator().manual_seed(self.seed + len(out))
            codes = maskgit_generate(self.adapter, [r.args[0] for r in chunk],
                                     steps=self.generation_steps, order=self.adapter.generation_order,
                                     temperature=self.temperature, generator=generator)  # fmt: skip
            images = self.adapter.decode_images(codes.to(self._device)).cpu()  # (B, 3, S, S)
            for r, image in zip(chunk, images, strict=True):
                _, _, _, doc_id, task, _ = r.args
                path = self.output_dir / f"{task}_{doc_id}.png"
                _save_png(image, path)
                out.append(json.dumps({"text": "", "images": [str(path)]}))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("diva model: multi-round generation is not supported")


def _cut(text: str, until) -> str:
    """The answer up to the first of lmms-eval's stop strings."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def _save_png(image: torch.Tensor, path: Path) -> None:
    """(3, S, S) in [0, 1] -> PNG, written to a temporary name and renamed when complete."""
    from PIL import Image

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    partial = path.with_suffix(".png.partial")
    Image.fromarray(array).save(partial, format="PNG")
    partial.rename(path)
