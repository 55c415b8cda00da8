"""Yes/no existence questions for DIVA-mini v2: taught in base pre-training, probed POPE-style.

A POPE-style probe asks "is there a small red circle?" and reads the model's "yes" or "no". A
captioning-only base was never asked a question, so its answer would say nothing about what it
sees. The base therefore learns to answer during pre-training: every pre-training sample also
gets one question about its own scene, with the prompt being the question and the target being
"yes" or "no". The questions are built from the sample's caption, parsed back into objects. Half
of them, by a seeded coin, ask about an object that is there. The other half ask about an
adversarial absent object (``pope_questions``: it shares two of three attributes with an object
that is there).

Post-training, whichever the arm, does not see these questions. The probe then measures how
much of this grounded knowledge each arm keeps or gains.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence

from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.evaluation.shapes.captions import parse_caption
from diva_lightning.evaluation.shapes.probes import pope_questions

ANSWERS = ("yes", "no")


def qa_pairs(
    captions: Sequence[str], keys: Sequence[str], world: ShapesWorld, step: int
) -> list[tuple[str, str]]:
    """One (question, answer) per sample, seeded by its key and ``step``. The result is
    positionally aligned with ``captions``; a caption that parses to no object gets ``None``."""
    pairs = []
    for caption, key in zip(captions, keys, strict=True):
        objects = [o for o in parse_caption(caption, world) if None not in o.values()]
        if not objects:
            pairs.append(None)
            continue
        seed = zlib.crc32(f"{key}/{step}".encode())
        pairs.append(pope_questions(objects, world, seed)[random.Random(seed).randrange(2)])
    return pairs
