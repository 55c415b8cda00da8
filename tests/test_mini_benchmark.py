"""DIVA-mini: the patch tokenizer, the held-out set, and the whole pipeline in smoke mode."""

import json
from dataclasses import asdict, replace

import pytest
import torch

from benchmarks.mini.backbone import build_base
from benchmarks.mini.config import ARMS, MiniConfig, quick, smoke
from benchmarks.mini.data import PROMPT, TRAIN_SEED, eval_set, render
from benchmarks.mini.report import paired
from benchmarks.mini.run import finished_runs, main, run
from benchmarks.mini.tokenizer import PatchTokenizer
from diva_lightning.backbones.flows import IGNORE_INDEX
from diva_lightning.data.shapes import ShapesWorld


@pytest.fixture(scope="module")
def images():
    return render(ShapesWorld(seed=TRAIN_SEED), range(64))


def test_tokenizer_is_lossless_with_enough_codes(images):
    tokenizer = PatchTokenizer(codebook_size=1024)
    stats = tokenizer.fit(images, iterations=5)
    assert stats["distinct_blocks"] <= 1024
    codes = tokenizer.tokenize_images(images)
    assert codes.shape == (64, 64)
    torch.testing.assert_close(tokenizer.decode_images(codes), images)


def test_small_codebook_is_lossy_and_k_means_helps(images):
    tokenizer = PatchTokenizer(codebook_size=8)
    tokenizer.fit(images, iterations=0)
    seeded = (tokenizer.decode_images(tokenizer.tokenize_images(images)) - images).pow(2).mean()
    tokenizer.fit(images, iterations=10)
    fitted = (tokenizer.decode_images(tokenizer.tokenize_images(images)) - images).pow(2).mean()
    assert 0 < fitted < seeded


def test_tokenizer_save_load_and_errors(images, tmp_path):
    tokenizer = PatchTokenizer(codebook_size=32)
    tokenizer.fit(images, iterations=2)
    tokenizer.save(tmp_path / "tok.pt")
    again = PatchTokenizer.load(tmp_path / "tok.pt")
    assert torch.equal(again.tokenize_images(images), tokenizer.tokenize_images(images))
    with pytest.raises(ValueError, match="pixels must be"):
        tokenizer.tokenize_images(images[:, :, :16])
    with pytest.raises(ValueError, match="codes must be"):
        tokenizer.decode_images(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple"):
        PatchTokenizer(image_size=30, patch=4)


def test_held_out_captions_never_occur_in_training():
    cfg = replace(MiniConfig(), train_samples=2000, eval_samples=200)
    tokenizer = PatchTokenizer(codebook_size=16)
    data = eval_set(cfg, tokenizer)
    world = ShapesWorld(seed=TRAIN_SEED)
    seen = {world.describe(world.objects(i)) for i in range(cfg.train_samples)}
    assert len(data) == 200 and not seen & set(data.captions)
    assert data.codes.shape == (200, 64)
    fewer = eval_set(replace(cfg, eval_samples=50), tokenizer)  # quick mode: a prefix
    assert fewer.captions == data.captions[:50]


def test_show_o_text_slots_hold_the_prompt_and_the_longest_caption():
    cfg = replace(MiniConfig(), hidden_size=16, num_layers=1)
    adapter = build_base(cfg)
    assert adapter.codebook_size == cfg.codebook_size and adapter.image_grid == (8, 8)
    world = ShapesWorld()
    longest = world.describe(
        [world.place("triangle", "yellow", r, c) for r, c in ((0, 0), (1, 2), (2, 2))]
    )  # three objects at two-word cells: the most words a caption has
    codes = torch.zeros(1, 64, dtype=torch.long)
    flow_u = adapter.build_understanding([PROMPT], [longest], codes=codes)
    caption_tokens = len(adapter.tokenizer(longest, add_special_tokens=False).input_ids)
    assert int((flow_u.labels != IGNORE_INDEX).sum()) == caption_tokens + 1  # + </s>, not cut
    flow_g = adapter.build_generation([longest], codes, torch.ones_like(codes, dtype=torch.bool))
    assert int((flow_g.labels != IGNORE_INDEX).sum()) == 64
    with pytest.raises(ValueError, match="power-of-two"):
        build_base(replace(cfg, codebook_size=500))


def test_quick_mode_is_smaller_but_evaluates_on_the_same_held_out_set():
    full = MiniConfig()
    assert quick().base_key() != full.base_key()  # half-size batches: a base of its own
    assert quick().post_steps < full.post_steps and len(quick().seeds) == 1
    assert quick().eval_samples < full.eval_samples and quick().gen_steps == full.gen_steps
    assert replace(full, pretrain_steps=10).base_key() != full.base_key()
    assert replace(full, post_steps=10, seeds=(5,)).base_key() == full.base_key()


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path):
    cfg = quick()
    path = tmp_path / "results.json"
    stored = json.loads(json.dumps(asdict(cfg)))  # tuples become lists, as in results.json
    runs = [{"arm": "Base+SFT", "seed": 0, "metrics": {}}]

    def reused(config: dict) -> dict:
        path.write_text(json.dumps({"config": config, "runs": runs}))
        return finished_runs(path, cfg)

    assert set(reused(stored)) == {("Base+SFT", 0)}
    assert set(reused({**stored, "seeds": [7], "retired_setting": {}})) == {("Base+SFT", 0)}
    assert reused({**stored, "post_steps": cfg.post_steps + 1}) == {}
    older = {k: v for k, v in stored.items() if k != "tau"}  # a setting added since that run
    assert reused(older) == {}


def test_paired_comparison_known_answer():
    runs = [
        {"arm": arm, "seed": s, "metrics": {"m": value}}
        for arm, values in (("A", [0.5, 0.6, 0.7]), ("B", [0.4, 0.4, 0.4]))
        for s, value in enumerate(values)
    ]
    result = paired(runs, "A", "B", ["m"])["m"]
    assert result["mean"] == pytest.approx(0.2) and result["std"] == pytest.approx(0.1)
    assert result["t"] == pytest.approx(0.2 / (0.1 / 3**0.5))
    assert result["outside_seed_noise"] is (result["t"] > 4.303)


def test_smoke_pipeline_end_to_end(tmp_path):
    cfg = smoke()
    results = run(cfg, tmp_path)
    out = tmp_path / "smoke"
    table = (out / "table.md").read_text()
    for arm in cfg.arms:
        assert f"| {arm} |" in table
    assert "Base+DIVA vs Base+SFT" in table and "Gradients on the trainable blocks" in table
    gradients = json.loads((out / "gradients.json").read_text())
    assert gradients["native_norm"] > 0 and gradients["alignment_norm"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in saved["runs"]} == set(cfg.arms)
    trained = [r for r in saved["runs"] if ARMS[r["arm"]]["kind"] != "base"]
    assert all(len(r["curves"]["val/loss_und"]) == cfg.post_steps // cfg.val_every for r in trained)
    assert saved["ceiling"]["ground_truth"]["object"] == 1.0
    for name in ("curves.png", "metrics.png", "samples.png"):
        assert (out / name).stat().st_size > 1000
    assert "pretrain" in results["wall_s"] and results["reused"] == 0
    more = replace(cfg, arms=(*cfg.arms, "w/o L_uni"))
    again = run(more, tmp_path)  # base cached, finished runs reused: only the new arm trains
    assert "pretrain" not in again["wall_s"]
    assert again["reused"] == len(cfg.arms)
    assert {r["arm"] for r in again["runs"]} == set(more.arms)
    table = (out / "table.md").read_text()
    assert f"({len(cfg.arms)} of {len(more.arms)} runs reused)" in table
    assert "Every arm vs Base+SFT" in table and "| w/o L_uni | 1 |" in table
    (out / "table.md").unlink()
    (out / "curves.png").unlink()
    main(["--mode", "smoke", "--out", str(tmp_path), "--report-only"])  # no training
    assert (out / "table.md").read_text() == table and (out / "curves.png").exists()
