"""Issue #19 item 2: ``diva-cli generate`` writes GenEval's layout as GenEval's reader reads it
(and DPG-Bench's grid), resumes without redoing prompts, and a seed gives the same images."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diva_lightning.backbones.chameleon import ChameleonAdapter
from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.liquid import LiquidAdapter
from diva_lightning.backbones.showo import ShowoAdapter
from diva_lightning.cli import main
from diva_lightning.evaluation import generate as generate_module
from diva_lightning.evaluation.generate import generate, read_prompts

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
    {"tag": "counting", "include": [{"class": "cup", "count": 2}], "prompt": "a photo of two cups"},
]  # fmt: skip


def read_like_geneval(imagedir: Path) -> list[tuple[dict, str]]:
    """GenEval's ``evaluation/evaluate_images.py`` reading loop (its walk, its filters)."""
    found = []
    for subfolder in os.listdir(imagedir):
        folderpath = os.path.join(imagedir, subfolder)
        if not os.path.isdir(folderpath) or not subfolder.isdigit():
            continue
        with open(os.path.join(folderpath, "metadata.jsonl")) as fp:
            metadata = json.load(fp)
        for imagename in os.listdir(os.path.join(folderpath, "samples")):
            imagepath = os.path.join(folderpath, "samples", imagename)
            if not os.path.isfile(imagepath) or not re.match(r"\d+\.png", imagename):
                continue
            found.append((metadata, imagepath))
    return found


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, cls in (("emu3", Emu3Adapter), ("showo", ShowoAdapter), ("liquid", LiquidAdapter)):
        cls.tiny().save_pretrained(root / name)
    prompts = root / "evaluation_metadata.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in GENEVAL_LINES))
    return root, prompts


@pytest.mark.parametrize("backbone", ["emu3", "showo", "liquid"])
def test_geneval_layout_reads_back_as_geneval_reads_it(backbone, models, tmp_path):
    root, prompts = models
    main(["generate", f"--pretrained={root / backbone}", f"--backbone={backbone}",
          f"--prompts={prompts}", f"--out={tmp_path / 'out'}", "--n=2", "--steps=2",
          "--batch_size=3"])  # fmt: skip
    found = read_like_geneval(tmp_path / "out" / "images")
    assert sorted(m["prompt"] for m, _ in found) == sorted(2 * [g["prompt"] for g in GENEVAL_LINES])
    assert all(m == GENEVAL_LINES[int(Path(p).parts[-3])] for m, p in found)
    size = (root / backbone) and Image.open(found[0][1]).size
    assert size[0] == size[1] > 1
    record = json.loads((tmp_path / "out" / "records" / "00002.json").read_text())
    assert record["seeds"] == [4, 5]  # seed + i * n + j


def test_a_seed_gives_the_same_images_whatever_the_batch(models, tmp_path):
    root, prompts = models
    common = dict(pretrained=root / "emu3", backbone="emu3", prompts=prompts, n=2, steps=2)
    generate(out=tmp_path / "a", batch_size=1, **common)
    generate(out=tmp_path / "b", batch_size=4, **common)
    generate(out=tmp_path / "c", batch_size=4, seed=7, **common)

    def pixels(run, j=0):
        return np.asarray(
            Image.open(tmp_path / run / "images" / "00001" / "samples" / f"{j:04d}.png")
        )

    assert np.array_equal(pixels("a"), pixels("b"))
    assert not np.array_equal(pixels("a"), pixels("c"))
    assert not np.array_equal(pixels("a", 0), pixels("a", 1))  # sampled, not greedy


def test_an_interrupted_run_resumes_without_redoing_prompts(models, tmp_path, monkeypatch):
    root, prompts = models
    calls = []
    real = generate_module.maskgit_generate

    def failing_after_two(adapter, captions, **kwargs):
        calls.append(list(captions))
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(adapter, captions, **kwargs)

    args = dict(pretrained=root / "emu3", backbone="emu3", prompts=prompts, out=tmp_path / "o",
                n=2, steps=2, batch_size=2)  # fmt: skip
    monkeypatch.setattr(generate_module, "maskgit_generate", failing_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(**args)
    assert sorted(p.name for p in (tmp_path / "o" / "records").iterdir()) == ["00000.json",
                                                                              "00001.json"]  # fmt: skip
    calls.clear()
    monkeypatch.setattr(generate_module, "maskgit_generate",
                        lambda adapter, captions, **kw: calls.append(list(captions)) or real(adapter, captions, **kw))  # fmt: skip
    generate(**args)
    assert calls == [[GENEVAL_LINES[2]["prompt"]] * 2]  # only the prompt not done
    assert len(read_like_geneval(tmp_path / "o" / "images")) == 6
    with pytest.raises(FileExistsError, match="other settings"):
        generate(**{**args, "cfg_scale": 3.0})


def test_dpg_layout_tiles_four_images_per_prompt_id(models, tmp_path):
    root, _ = models
    folder = tmp_path / "prompts"
    folder.mkdir()
    for name, text in (("1", "a cat on a mat."), ("256", "two dogs."), ("b", "a tree.")):
        (folder / f"{name}.txt").write_text(text + "\n")
    assert [p.id for p in read_prompts(folder)] == ["1", "256", "b"]
    generate(pretrained=root / "showo", backbone="showo", prompts=folder, out=tmp_path / "d",
             layout="dpg", n=4, steps=2, cfg_scale=2.0)  # fmt: skip
    size = ShowoAdapter.from_pretrained(root / "showo").image_size
    for name in ("1", "256", "b"):
        grid = Image.open(tmp_path / "d" / "images" / f"{name}.png")
        assert grid.size == (2 * size, 2 * size)
    with pytest.raises(ValueError, match="n <= 4"):
        generate(pretrained=root / "showo", backbone="showo", prompts=folder, out=tmp_path / "e",
                 layout="dpg", n=5)  # fmt: skip


def test_bad_prompts_and_backbones_are_refused_before_loading(models, tmp_path):
    root, _ = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"tag": "no prompt"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_prompts(bad)
    text = tmp_path / "prompts.txt"
    text.write_text("a red car\n\n a blue bus \n")
    assert [(p.id, p.text) for p in read_prompts(text)] == [
        ("00000", "a red car"),
        ("00001", "a blue bus"),
    ]
    assert not ChameleonAdapter.can_decode_images() and Emu3Adapter.can_decode_images()
    with pytest.raises(ValueError, match="no pixel decoder"):
        generate(pretrained=tmp_path, backbone="chameleon", prompts=text, out=tmp_path / "o")
    with pytest.raises(ValueError, match="image embeddings.*FLUX.1-dev"):
        generate(pretrained=tmp_path, backbone="nexus-gen", prompts=text, out=tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
