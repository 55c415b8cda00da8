"""Decoding through the adapter contract, checked against the stock transformers forward and a
rigged model whose answers are known."""

import pytest
import torch
import torch.nn.functional as F

from diva_lightning.backbones.emu3 import Emu3Adapter
from diva_lightning.backbones.flows import IGNORE_INDEX, FlowOutput
from diva_lightning.data.shapes import ShapesWorld
from diva_lightning.evaluation.decoding import (
    caption_log_likelihood,
    greedy_captions,
    maskgit_generate,
)

PROMPT = "Please describe this image in detail."


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    model = Emu3Adapter.tiny()
    model.eval()
    return model


@pytest.fixture(scope="module")
def captions():
    world = ShapesWorld(seed=4)
    return [world.sample(i)[1] for i in range(3)]


def test_caption_log_likelihood_matches_stock_forward(adapter, captions):
    codes = torch.randint(0, adapter.codebook_size, (3, adapter.tokens_per_image))
    got = caption_log_likelihood(adapter, [PROMPT] * 3, captions, codes=codes)
    batch = adapter.build_understanding([PROMPT] * 3, captions, codes=codes)
    with torch.no_grad():
        logits = adapter.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits
    labels = batch.labels[:, 1:]
    token_lp = -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
    )  # (B, T - 1)
    expected = (token_lp * (labels != IGNORE_INDEX)).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got < 0).all()


def test_greedy_captions_equal_an_argmax_loop_over_raw_ids(captions):
    torch.manual_seed(1)
    adapter = Emu3Adapter.tiny()
    adapter.eval()
    vocab = adapter.tokenizer.get_vocab()
    words = [vocab[w] for w in ("a", "red", "circle", "at", "the", "top", "left", "center")]
    with torch.no_grad():  # only a few words can win the argmax: text that round-trips exactly
        keep = adapter.model.lm_head.weight[words].clone()
        adapter.model.lm_head.weight.zero_()
        adapter.model.lm_head.weight[words] = keep * 20
    codes = torch.randint(0, adapter.codebook_size, (2, adapter.tokens_per_image))
    got = greedy_captions(adapter, [PROMPT] * 2, codes=codes, max_tokens=5)
    for i in range(2):
        batch = adapter.build_understanding([PROMPT], [""], codes=codes[i : i + 1])
        ids = batch.input_ids[:, :-1]  # the context, without the empty caption's </s>
        for _ in range(5):
            with torch.no_grad():
                logits = adapter.model(input_ids=ids).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        expected = adapter.tokenizer.decode(ids[0, batch.input_ids.shape[1] - 1 :])
        assert got[i] == expected and len(got[i].split()) == 5


def test_finished_captions_leave_the_batch_without_changing_the_others():
    torch.manual_seed(4)  # a seed whose random head ends captions at different steps
    adapter = Emu3Adapter.tiny()
    adapter.eval()
    vocab = adapter.tokenizer.get_vocab()
    words = [vocab[w] for w in ("a", "red", "blue", "circle", "square", "at", "the", "</s>")]
    with torch.no_grad():  # a few words and </s> compete, so captions end at different steps
        keep = adapter.model.lm_head.weight[words].clone()
        adapter.model.lm_head.weight.zero_()
        adapter.model.lm_head.weight[words] = keep * 20
    codes = torch.randint(0, adapter.codebook_size, (6, adapter.tokens_per_image))
    together = greedy_captions(adapter, [PROMPT] * 6, codes=codes, max_tokens=8)
    alone = [
        greedy_captions(adapter, [PROMPT], codes=codes[i : i + 1], max_tokens=8)[0]
        for i in range(6)
    ]
    assert together == alone
    lengths = {len(c.split()) for c in together}
    assert len(lengths) > 1 and min(lengths) < 8  # some finished early, others went on


def test_one_step_generation_is_the_argmax_of_a_fully_masked_forward(adapter, captions):
    codes = maskgit_generate(adapter, captions, steps=1)
    n = adapter.tokens_per_image
    batch = adapter.build_generation(
        captions, torch.zeros(3, n, dtype=torch.long), torch.ones(3, n, dtype=torch.bool)
    )
    with torch.no_grad():
        expected = adapter.forward_flow(batch, "G").logits.argmax(-1)
    assert torch.equal(codes, expected)


class RiggedGeneration:
    """forward_flow stand-in: the code wanted at grid cell c is (3c + 1) % K, with confidence
    rising with c; records how many cells were masked at each call."""

    def __init__(self, adapter):
        self.adapter, self.masked_per_call = adapter, []

    def __call__(self, batch, flow, layers=(), pool=True):
        k = self.adapter.codebook_size
        masked = torch.gather(batch.labels, 1, batch.image_positions) != IGNORE_INDEX  # (B, N)
        self.masked_per_call.append(int(masked[0].sum()))
        width = int(masked.sum(1).max())
        logits = torch.zeros(len(masked), width, k)
        for i, row in enumerate(masked):
            for slot, cell in enumerate(row.nonzero().flatten().tolist()):
                logits[i, slot, (3 * cell + 1) % k] = 5.0 + 0.01 * cell
        return FlowOutput(torch.zeros(0), logits, torch.zeros(len(masked), width), torch.zeros(()))


@pytest.mark.parametrize("order", ["confidence", "raster"])
def test_generated_codes_land_in_their_grid_cells(adapter, captions, monkeypatch, order):
    rigged = RiggedGeneration(adapter)
    monkeypatch.setattr(adapter, "forward_flow", rigged)
    codes = maskgit_generate(adapter, captions, steps=4, order=order)
    n = adapter.tokens_per_image
    wanted = (3 * torch.arange(n) + 1) % adapter.codebook_size
    assert torch.equal(codes, wanted.expand(3, n))
    if order == "confidence":  # cosine schedule: floor(64 cos(pi/2 s/4)) still masked
        assert rigged.masked_per_call == [64, 59, 45, 24]
    else:
        assert rigged.masked_per_call == list(range(n, 0, -1))


def test_generation_is_deterministic_and_complete(adapter, captions):
    first = maskgit_generate(adapter, captions, steps=3)
    assert torch.equal(first, maskgit_generate(adapter, captions, steps=3))
    assert first.shape == (3, adapter.tokens_per_image)
    assert int(first.min()) >= 0 and int(first.max()) < adapter.codebook_size
    sampled = maskgit_generate(
        adapter, captions, steps=3, temperature=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.shape == first.shape
    with pytest.raises(ValueError, match="order"):
        maskgit_generate(adapter, captions, order="spiral")


def test_top_k_and_top_p_restrict_what_is_sampled(adapter, captions):
    def run(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return maskgit_generate(adapter, captions, steps=3, generator=generator, **kwargs)

    greedy = run()
    wild = run(temperature=5.0)  # almost uniform over the codebook
    assert not torch.equal(wild, greedy)
    assert torch.equal(run(temperature=5.0, top_k=1), greedy)  # only the most likely is left
    assert torch.equal(run(temperature=5.0, top_p=1e-6), greedy)  # the smallest nucleus
    few = run(temperature=5.0, top_k=3)
    assert not torch.equal(few, greedy) and few.unique().numel() < wild.unique().numel()
    with pytest.raises(ValueError, match="top_p"):
        run(temperature=1.0, top_p=0.0)
