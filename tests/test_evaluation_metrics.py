"""Issue #19 item 3: the shapes-world scores as torchmetrics metrics: the same numbers as the
list functions, and the same value in one process as over 2 gloo processes on a split batch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.data.shapes_v2 import ShapesWorldV2
from diva_lightning.evaluation.shapes.captions import parse_caption
from diva_lightning.evaluation.shapes.detector import ShapesDetector
from diva_lightning.evaluation.shapes.metrics import (
    MultipleChoiceAccuracy,
    ObjectScores,
    detected_objects,
)
from diva_lightning.evaluation.shapes.scores import multiple_choice_scores, object_scores


def noisy_predictions(world, n: int, seed: int = 0):
    """(predicted, truth): captions with some words changed and some objects dropped, parsed."""
    rng = random.Random(seed)
    truth = [world.objects(i) for i in range(n)]
    predicted = []
    for objects in truth:
        words = world.describe(objects).split(" ")
        for i, word in enumerate(words):
            if word in world.colours and rng.random() < 0.3:
                words[i] = rng.choice(world.colours)
        guess = parse_caption(" ".join(words), world)
        predicted.append(guess[: rng.randint(0, len(guess))] if rng.random() < 0.3 else guess)
    return predicted, truth


def likelihoods(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, generator=g)
    return true, true[:, None] + torch.randn(n, 4, generator=g) - 0.8


@pytest.mark.parametrize("world", [ShapesWorld(seed=3), ShapesWorldV2(seed=3)], ids=["v1", "v2"])
def test_object_scores_equal_the_list_function(world):
    predicted, truth = noisy_predictions(world, 60)
    metric = ObjectScores()
    for start in range(0, 60, 16):  # several updates add up
        metric.update(predicted[start : start + 16], truth[start : start + 16])
    got = {k: float(v) for k, v in metric.compute().items()}
    want = object_scores(predicted, truth)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0.2 < want["colour"] < 0.95 and ("size" in got) == isinstance(world, ShapesWorldV2)


def test_multiple_choice_equals_the_list_function_and_ties_lose():
    true, wrong = likelihoods(50)
    metric = MultipleChoiceAccuracy()
    metric.update(true, wrong)
    rows = [{str(k): float(s) for k, s in enumerate(r)} for r in wrong]
    want = multiple_choice_scores(true.tolist(), rows)["mc_accuracy"]
    assert float(metric.compute()) == pytest.approx(want) and 0.1 < want < 0.9
    tie = MultipleChoiceAccuracy()
    tie.update(torch.zeros(2), torch.zeros(2, 3))
    assert float(tie.compute()) == 0.0
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        tie.update(torch.zeros(2), torch.zeros(3, 2))


def test_detected_objects_of_true_images_score_perfectly():
    world = ShapesWorld(seed=5)
    truth = [world.objects(i) for i in range(6)]
    pixels = torch.stack([torch.tensor(np.asarray(world.render(o))) for o in truth])  # (B, H, W, 3)
    pixels = pixels.permute(0, 3, 1, 2) / 255.0  # (B, 3, H, W)
    metric = ObjectScores()
    metric.update(detected_objects(ShapesDetector(world), pixels), truth)
    assert float(metric.compute()["exact"]) == 1.0


def _worker(rank: int, init: str, world_size: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    predicted, truth = noisy_predictions(ShapesWorldV2(seed=3), 40)
    true, wrong = likelihoods(40)
    objects, choice = ObjectScores(), MultipleChoiceAccuracy()
    half = slice(0, 17) if rank == 0 else slice(17, 40)  # uneven shares
    objects.update(predicted[half], truth[half])
    choice.update(true[half], wrong[half])
    result = {k: float(v) for k, v in objects.compute().items()}
    result["mc_accuracy"] = float(choice.compute())
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def test_two_gloo_processes_on_a_split_batch_give_the_single_process_value(tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", 2, str(out)), nprocs=2, join=True)
    predicted, truth = noisy_predictions(ShapesWorldV2(seed=3), 40)
    true, wrong = likelihoods(40)
    single, choice = ObjectScores(), MultipleChoiceAccuracy()
    single.update(predicted, truth)
    choice.update(true, wrong)
    want = {k: float(v) for k, v in single.compute().items()}
    want["mc_accuracy"] = float(choice.compute())
    got = torch.load(out)
    assert got == pytest.approx(want, abs=1e-6)
    part = ObjectScores()  # a rank alone would give another value: the sync is what makes it equal
    part.update(predicted[:17], truth[:17])
    assert float(part.compute()["score"]) != pytest.approx(want["score"], abs=1e-4)
