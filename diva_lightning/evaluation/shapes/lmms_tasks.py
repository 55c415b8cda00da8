"""Two lmms-eval tasks on shapes-world scenes, written to a local folder (no hub, no network).

* ``diva_shapes_pope`` (``generate_until``): POPE-style existence questions ("is there a red
  circle?"), one "yes" and one adversarial "no" per scene (``probes.pope_questions``); the
  answer's first word is compared with the truth (``acc``).
* ``diva_shapes_mc`` (``multiple_choice``): the true caption among one-attribute distractors
  (``captions.distractors``), ranked by likelihood after the understanding prompt (``acc``).

    write_lmms_tasks("tasks/shapes", scenes=64)
    python -m lmms_eval --model diva --model_args pretrained=DIR,backbone=showo \\
        --tasks diva_shapes_pope,diva_shapes_mc --include_path tasks/shapes --output_path out/

The folder holds ``images/*.png``, one JSONL per task, the task YAMLs and the ``utils.py`` their
``!function`` entries load (it opens images relative to its own folder).
"""

from __future__ import annotations

import json
from pathlib import Path

from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.evaluation.shapes.captions import DISTRACTOR_KINDS, distractors
from diva_lightning.evaluation.shapes.probes import pope_questions

MC_PROMPT = "Please describe this image in detail."

UTILS = '''"""Loaders and scoring of the diva_shapes_* tasks (written by diva_lightning)."""
import os

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(HERE, doc["image"])).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def first_word(text):
    words = (text or "").strip().lower().replace(".", " ").replace(",", " ").split()
    return words[0] if words else ""


def pope_results(doc, results):
    return {"acc": float(first_word(results[0]) == doc["answer"])}
'''

POPE_YAML = """task: diva_shapes_pope
dataset_path: json
dataset_kwargs:
  data_files:
    test: pope.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs: {max_new_tokens: 4, until: ["\\n"], do_sample: false}
process_results: !function utils.pope_results
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata: {version: 0.0}
"""

MC_YAML = """task: diva_shapes_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata: {version: 0.0}
"""


def shapes_task_rows(world: ShapesWorld, scenes: int) -> tuple[list[dict], list[dict]]:
    """(pope rows, mc rows) of scenes ``0..scenes-1``; images are ``images/<i>.png``."""
    pope, mc = [], []
    for i in range(scenes):
        objects, image = world.objects(i), f"images/{i:05d}.png"
        for question, answer in pope_questions(objects, world, seed=i):
            pope.append({"id": len(pope), "image": image, "question": question, "answer": answer})
        options = distractors(objects, world, seed=i)
        choices = [world.describe(objects)] + [options[k] for k in DISTRACTOR_KINDS]
        label = i % len(choices)  # the true caption's place rotates
        choices.insert(label, choices.pop(0))
        mc.append({"id": i, "image": image, "question": MC_PROMPT, "choices": choices,
                   "label": label})  # fmt: skip
    return pope, mc


def write_lmms_tasks(folder: str | Path, scenes: int = 64, world: ShapesWorld | None = None,
                     overwrite: bool = False) -> Path:  # fmt: skip
    """Write both tasks for ``scenes`` scenes of ``world`` (default: ``ShapesWorld(seed=2)``)."""
    folder, world = Path(folder), world or ShapesWorld(seed=2)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty: give another folder or overwrite=True")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(scenes):
        world.render(world.objects(i)).save(folder / "images" / f"{i:05d}.png")
    pope, mc = shapes_task_rows(world, scenes)
    for name, rows in (("pope.jsonl", pope), ("mc.jsonl", mc)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "utils.py").write_text(UTILS)
    (folder / "diva_shapes_pope.yaml").write_text(POPE_YAML)
    (folder / "diva_shapes_mc.yaml").write_text(MC_YAML)
    return folder
