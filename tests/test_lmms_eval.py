"""Issue #19 item 1: the ``diva`` lmms-eval model, run by lmms-eval's own evaluator on local
shapes-world tasks against a tiny exported model: its accuracies equal the project's own
computation on the same samples, the CLI finds the model through the entry point, and
``mode=generate`` returns images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

lmms_eval = pytest.importorskip("lmms_eval", reason="the eval extra is not installed")

from diva_lightning.backbones.emu3 import Emu3Adapter  # noqa: E402
from diva_lightning.data.decode import image_pixels  # noqa: E402
from diva_lightning.evaluation.decoding import caption_log_likelihood, greedy_captions  # noqa: E402
from diva_lightning.evaluation.shapes.lmms_tasks import write_lmms_tasks  # noqa: E402

TASKS = ["diva_shapes_pope", "diva_shapes_mc"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    torch.manual_seed(0)
    adapter = Emu3Adapter.tiny().eval()
    adapter.save_pretrained(root / "model")
    write_lmms_tasks(root / "tasks", scenes=6)
    return root, Emu3Adapter.from_pretrained(root / "model").eval()


def rows(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def codes_of(adapter, folder: Path, docs: list[dict]) -> torch.Tensor:
    pixels = torch.stack([
        image_pixels(Image.open(folder / d["image"]), adapter.image_size).float() / 255.0
        for d in docs
    ])  # fmt: skip
    return adapter.tokenize_images(pixels)


def own_accuracies(adapter, folder: Path) -> dict[str, float]:
    """The project's own computation: greedy answers and likelihood ranking, no lmms-eval."""
    pope = rows(folder, "pope.jsonl")
    answers = greedy_captions(adapter, [d["question"] for d in pope], max_tokens=4,
                              codes=codes_of(adapter, folder, pope))  # fmt: skip
    first = [(a.strip().lower().replace(".", " ").split() or [""])[0] for a in answers]
    mc = rows(folder, "mc.jsonl")
    hits, choice_scores = [], []
    for doc, codes in zip(mc, codes_of(adapter, folder, mc), strict=True):
        k = len(doc["choices"])
        scores = caption_log_likelihood(adapter, [doc["question"]] * k, doc["choices"],
                                        codes=codes.expand(k, -1))  # fmt: skip
        hits.append(float(int(scores.argmax()) == doc["label"]))
        choice_scores.append(scores.tolist())
    return {
        "diva_shapes_pope": sum(f == d["answer"] for f, d in zip(first, pope, strict=True))
        / len(pope),
        "diva_shapes_mc": sum(hits) / len(hits),
        "answers": answers,
        "choice_scores": choice_scores,
    }


def test_lmms_evaluator_reports_the_projects_own_accuracies(setup, tmp_path, monkeypatch):
    from lmms_eval import evaluator
    from lmms_eval.api import task as lmms_task
    from lmms_eval.tasks import TaskManager

    from diva_lightning.evaluation.lmms_model import DivaLMM

    root, adapter = setup
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "cache"))
    lmms_task._resolve_hf_datasets_cache_dir.cache_clear()
    model = DivaLMM(pretrained=str(root / "model"), backbone="emu3", batch_size="3")
    out = evaluator.simple_evaluate(model=model, tasks=TASKS, log_samples=True,
                                    task_manager=TaskManager(include_path=str(root / "tasks")))  # fmt: skip
    own = own_accuracies(adapter, root / "tasks")
    for task in TASKS:
        assert out["results"][task]["acc,none"] == pytest.approx(own[task], abs=1e-9), task
    # per document, the answers lmms-eval recorded are the project's greedy answers
    logged = sorted(out["samples"]["diva_shapes_pope"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in logged] == [a.strip() for a in own["answers"]]
    # and per choice, the loss lmms-eval ranked is minus the project's log-likelihood
    logged = sorted(out["samples"]["diva_shapes_mc"], key=lambda s: s["doc_id"])
    losses = [[float(r[0]) for r in s["filtered_resps"]] for s in logged]
    want = [[-x for x in doc] for doc in own["choice_scores"]]
    assert losses == [pytest.approx(w, rel=1e-5) for w in want]


def test_python_m_lmms_eval_finds_the_diva_model_by_its_entry_point(setup, tmp_path):
    root, adapter = setup
    env = {**os.environ, "LMMS_EVAL_DATASETS_CACHE": str(tmp_path / "cache"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "lmms_eval", "--model", "diva",
         "--model_args", f"pretrained={root / 'model'},backbone=emu3",
         "--tasks", "diva_shapes_mc", "--include_path", str(root / "tasks"),
         "--output_path", str(tmp_path / "out"), "--batch_size", "2"],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = list((tmp_path / "out").rglob("*_results.json"))  # lmms-eval exits 0 on errors
    acc = json.loads(results.read_text())["results"]["diva_shapes_mc"]["acc,none"]
    assert acc == pytest.approx(own_accuracies(adapter, root / "tasks")["diva_shapes_mc"])


def test_generate_mode_returns_images_for_a_generation_request(setup, tmp_path):
    from lmms_eval.api.instance import Instance

    from diva_lightning.evaluation.lmms_model import DivaLMM

    root, _ = setup
    model = DivaLMM(pretrained=str(root / "model"), backbone="emu3", mode="generate",
                    output_dir=str(tmp_path / "images"), generation_steps=2)  # fmt: skip
    requests = [
        Instance("generate_until", (caption, {}, None, i, "t2i", "test"), idx=0,
                 metadata={"task": "t2i", "doc_id": i, "repeats": 1})
        for i, caption in enumerate(["a red circle at the center.", "a blue square at the top."])
    ]  # fmt: skip
    answers = [json.loads(a) for a in model.generate_until(requests)]
    for answer in answers:
        (path,) = answer["images"]
        image = Image.open(path)
        assert image.size == (model.adapter.image_size,) * 2 and image.mode == "RGB"
    assert len({a["images"][0] for a in answers}) == 2


def test_wrong_model_args_are_refused_before_loading(setup):
    from diva_lightning.evaluation.lmms_model import DivaLMM

    root, _ = setup
    with pytest.raises(ValueError, match="mode"):
        DivaLMM(pretrained=str(root / "model"), mode="draw")
    with pytest.raises(ValueError, match="unknown model_args"):
        DivaLMM(pretrained=str(root / "model"), temprature=1.0)
    with pytest.raises(ValueError, match="neither one of"):
        DivaLMM(pretrained=str(root / "model"), backbone="lumina-mgpt")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        DivaLMM(pretrained=str(root / "missing"))


@pytest.mark.parametrize("backbone", ["emu3", "janus", "chameleon", "showo", "liquid", "nexus-gen"])
def test_every_adapter_answers_both_request_kinds(backbone, tmp_path):
    """Understanding and likelihood requests on each adapter, from its saved folder (Janus
    reads pixels, the others codes)."""
    from lmms_eval.api.instance import Instance

    from diva_lightning.backbones import adapter_class
    from diva_lightning.evaluation.lmms_model import DivaLMM

    torch.manual_seed(0)
    adapter_class(backbone).tiny().save_pretrained(tmp_path / "model")
    model = DivaLMM(pretrained=str(tmp_path / "model"), backbone=backbone, batch_size="2",
                    max_new_tokens=3)  # fmt: skip
    image = Image.fromarray((np.random.default_rng(0).random((40, 30, 3)) * 255).astype("uint8"))
    model.task_dict = {"t": {"test": [{"image": image}] * 3}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    meta = lambda i: {"task": "t", "doc_id": i, "repeats": 1}  # noqa: E731
    asks = [Instance("generate_until", ("is there a red circle?", {"until": ["."]}, visual, i,
                                        "t", "test"), idx=0, metadata=meta(i)) for i in range(3)]  # fmt: skip
    answers = model.generate_until(asks)
    assert len(answers) == 3 and all(isinstance(a, str) and "." not in a for a in answers)
    scores = model.loglikelihood([
        Instance("loglikelihood", ("is there a red circle?", c, visual, 0, "t", "test"), idx=k,
                 metadata=meta(0)) for k, c in enumerate([" yes", " no"])
    ])  # fmt: skip
    losses = [r.text[0] for r in scores]
    assert all(loss > 0 and np.isfinite(loss) for loss in losses) and losses[0] != losses[1]
