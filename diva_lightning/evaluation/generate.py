"""``diva-cli generate``: prompts in, images out, in the layouts GenEval and DPG-Bench score.

    diva-cli generate --pretrained EXPORTED --backbone showo \\
        --prompts geneval/prompts/evaluation_metadata.jsonl --out runs/geneval --n 4
    python geneval/evaluation/evaluate_images.py runs/geneval/images --outfile results.jsonl ...

    diva-cli generate --pretrained EXPORTED --backbone emu3 --prompts ELLA/dpg_bench/prompts \\
        --out runs/dpg --layout dpg --n 4 --cfg_scale 3
    python dpg_bench/compute_dpg_bench.py --image-root-path runs/dpg/images --resolution SIZE \\
        --pic-num 4

Prompts (``--format``, ``auto`` by default): GenEval's metadata JSONL (one JSON object with a
``prompt`` per line), DPG-Bench's folder of ``<id>.txt`` files, or a text file with one prompt a
line.

Outputs under ``OUT``: ``images/`` is what the benchmark's scorer reads, ``records/<id>.json``
the seed of every image and the settings, ``run.json`` the settings of the run:

* ``geneval``: ``images/<00000>/metadata.jsonl`` (the prompt's metadata line) and
  ``images/<00000>/samples/<0000>.png``;
* ``dpg``: ``images/<id>.png``, the ``n`` (at most 4) images tiled 2 x 2, as DPG-Bench crops them.

Image ``j`` of prompt ``i`` uses seed ``seed + i * n + j`` and its own generator, so it does not
depend on the batch size. A prompt whose record exists is done: an interrupted run resumes with
the next prompt (files are written under temporary names and renamed when complete).
Sampling is the generation flow's (``decoding.maskgit_generate``): MaskGIT for backbones with
bidirectional image attention (Show-o), one code at a time in raster order otherwise (Emu3,
Janus), with classifier-free guidance against an empty caption when ``cfg_scale`` != 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from diva_lightning.backbones import adapter_class
from diva_lightning.evaluation.decoding import maskgit_generate


@dataclass
class Prompt:
    id: str  # folder or file name of its images
    text: str
    metadata: dict | None = None  # GenEval's metadata line


def read_prompts(path: str | Path, format: str = "auto") -> list[Prompt]:
    """GenEval metadata JSONL, DPG-Bench prompt folder, or a text file -> prompts, in order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts: {path} does not exist")
    if format == "auto":
        format = "dpg" if path.is_dir() else "geneval" if path.suffix == ".jsonl" else "text"
    if format == "dpg":
        if not path.is_dir():
            raise ValueError(
                f"prompts: DPG-Bench prompts are a folder of <id>.txt files; {path} is a file"
            )
        files = sorted(
            path.glob("*.txt"), key=lambda p: (not p.stem.isdigit(), len(p.stem), p.stem)
        )
        prompts = [Prompt(p.stem, p.read_text(encoding="utf-8").strip()) for p in files]
    elif format == "geneval":
        prompts = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                metadata = json.loads(line)
                text = metadata["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a GenEval metadata line with a 'prompt' "
                                 f"({type(error).__name__}: {error})") from None  # fmt: skip
            prompts.append(Prompt(f"{len(prompts):05d}", str(text), metadata))
    elif format == "text":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [Prompt(f"{i:05d}", text) for i, text in enumerate(t for t in lines if t)]
    else:
        raise ValueError(f"prompts: format must be auto, geneval, dpg or text, got {format!r}")
    if not prompts:
        raise ValueError(f"prompts: no prompt in {path}")
    return prompts


def _png(image: torch.Tensor) -> Image.Image:
    """uint8 (S, S, 3) -> PIL."""
    return Image.fromarray(image.cpu().numpy())


def _save(image: Image.Image, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG")
    partial.rename(path)


def _write_prompt(out: Path, layout: str, prompt: Prompt, images: torch.Tensor) -> None:
    if layout == "geneval":
        folder = out / "images" / prompt.id
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        metadata = prompt.metadata or {"prompt": prompt.text}
        (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
        for j, image in enumerate(images):
            _save(_png(image), folder / "samples" / f"{j:04d}.png")
    else:  # dpg: a 2 x 2 grid of tiles, filled row by row
        size = images.shape[-2]
        grid = Image.new("RGB", (2 * size, 2 * size)) if len(images) > 1 else None
        for j, image in enumerate(images):
            if grid is None:
                grid = _png(image)
            else:
                grid.paste(_png(image), ((j % 2) * size, (j // 2) * size))
        (out / "images").mkdir(parents=True, exist_ok=True)
        _save(grid, out / "images" / f"{prompt.id}.png")


def generate(*, pretrained: Path, backbone: str, prompts: Path, out: Path, format: str = "auto",
             layout: str = "geneval", n: int = 4, seed: int = 0, cfg_scale: float = 1.0,
             steps: int = 16, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             batch_size: int = 8, device: str = "cpu") -> Path:  # fmt: skip
    """Generate ``n`` images per prompt with a (post-trained) backbone.

    Args:
        pretrained: a folder written by ``diva-cli export`` (an adapter's ``save_pretrained``).
        backbone: ``emu3``, ``janus``, ``chameleon``, ``showo``, ``liquid`` or an adapter's
            class path (``nexus-gen`` is refused: its images need its own decoder).
        prompts: GenEval metadata JSONL, DPG-Bench prompt folder, or a text file.
        out: output folder; a folder of another run (other settings) is refused.
        format: ``auto``, ``geneval``, ``dpg`` or ``text``.
        layout: ``geneval`` or ``dpg`` (see the module docstring).
        n: images per prompt (``dpg``: at most 4).
        seed: image ``j`` of prompt ``i`` uses ``seed + i * n + j``.
        cfg_scale: classifier-free guidance scale (1: none).
        steps: MaskGIT steps (bidirectional backbones; raster order takes one per code).
        temperature: sampling temperature (0: greedy, the same image ``n`` times).
        top_k: sample among the ``top_k`` most likely codes only (0: all).
        top_p: sample among the smallest set of codes whose probability reaches ``top_p``
            (nucleus sampling; 1: all).
        batch_size: images per forward pass.
        device: ``cpu``, ``cuda``, ``cuda:1`` ...
    """
    if layout not in ("geneval", "dpg"):
        raise ValueError(f"generate: layout must be geneval or dpg, got {layout!r}")
    if n < 1 or batch_size < 1 or (layout == "dpg" and n > 4):
        raise ValueError(f"generate: need n >= 1 (dpg: n <= 4, its 2 x 2 grid) and batch_size "
                         f">= 1, got n={n}, batch_size={batch_size}")  # fmt: skip
    items = read_prompts(prompts, format)
    cls = adapter_class(backbone)
    if cls.continuous_targets:
        raise ValueError(f"generate: {cls.__name__} generates image embeddings; its pixels need "
                         "the model's own separately trained decoder (Nexus-Gen: FLUX.1-dev), "
                         "not shipped here: see the adapter's generate_images")  # fmt: skip
    if not cls.can_decode_images():
        raise ValueError(f"generate: {cls.__name__} has no pixel decoder in this library, so it "
                         "cannot write images (generation needs the VQ decoder)")  # fmt: skip
    out = Path(out)
    settings = {"pretrained": str(pretrained), "backbone": backbone, "prompts": str(prompts),
                "layout": layout, "n": n, "seed": seed, "cfg_scale": cfg_scale, "steps": steps,
                "temperature": temperature, "top_k": top_k, "top_p": top_p}  # fmt: skip
    run_file = out / "run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != settings:
        raise FileExistsError(f"{out} holds a run with other settings ({run_file}): give "
                              "another --out, or the same settings to resume it")  # fmt: skip
    (out / "records").mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps(settings, indent=1))
    todo = [(i, p) for i, p in enumerate(items) if not (out / "records" / f"{p.id}.json").exists()]
    if len(todo) < len(items):
        print(f"generate: {len(items) - len(todo)} of {len(items)} prompts already done, resuming")
    adapter = cls.from_pretrained(pretrained).to(device).eval()
    jobs = [(i, p, j) for i, p in todo for j in range(n)]  # one image each
    images: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=len(todo), desc="generate", unit="prompt") as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            seeds = [seed + i * n + j for i, _, j in chunk]
            codes = maskgit_generate(
                adapter, [p.text for _, p, _ in chunk], steps=steps,
                order=adapter.generation_order, temperature=temperature, cfg_scale=cfg_scale,
                top_k=top_k, top_p=top_p,
                generator=[torch.Generator().manual_seed(s) for s in seeds],
            )  # fmt: skip
            pixels = adapter.to_uint8(adapter.decode_images(codes.to(device))).cpu()  # (B, S, S, 3)
            for (i, prompt, j), image in zip(chunk, pixels, strict=True):
                images.setdefault(prompt.id, []).append(image)
                if j == n - 1:  # the prompt's last image: write it whole, then its record
                    _write_prompt(out, layout, prompt, torch.stack(images.pop(prompt.id)))
                    record = {"prompt": prompt.text, "seeds": [seed + i * n + k for k in range(n)]}
                    partial = out / "records" / f"{prompt.id}.json.partial"
                    partial.write_text(json.dumps(record))
                    partial.rename(out / "records" / f"{prompt.id}.json")
                    bar.update(1)
    print(f"generate: {len(items)} prompts x {n} images in {out / 'images'}")
    return out
