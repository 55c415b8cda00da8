"""DIVA-mini v2 (issue #17): pre-training questions, the plateau rule, the pre-registered grid and
its selection, and the whole protocol in smoke mode."""

import json
from collections import Counter

import pytest

import benchmarks.mini.protocol as protocol
from benchmarks.mini.backbone import build_base, load_base
from benchmarks.mini.base import plateau
from benchmarks.mini.config import v2, v2_quick, v2_smoke
from benchmarks.mini.grid import FAMILIES, grid_points, select
from benchmarks.mini.qa import qa_pairs
from benchmarks.mini.report_v2 import effective_setting, load_grid, settings_table, timing_table
from diva_lightning.data.shapes_v2 import ShapesWorldV2
from diva_lightning.evaluation.shapes.captions import parse_caption


def test_pre_training_questions_are_balanced_seeded_and_true():
    world = ShapesWorldV2()
    samples = [world.sample(i) for i in range(200)]
    captions, keys = [s[1] for s in samples], [f"{i:06d}" for i in range(200)]
    pairs = qa_pairs(captions, keys, world, step=3)
    assert pairs == qa_pairs(captions, keys, world, step=3)
    assert pairs != qa_pairs(captions, keys, world, step=4)
    answers = Counter(a for _, a in pairs)
    assert 70 < answers["yes"] < 130 and answers["yes"] + answers["no"] == 200
    for (question, answer), (_, caption, _) in zip(pairs, samples, strict=True):
        phrases = {f"{o['size']} {o['colour']} {o['shape']}" for o in parse_caption(caption, world)}
        asked = question.removeprefix("is there ").removesuffix("?").split(" ", 1)[1]
        assert (asked in phrases) == (answer == "yes"), (question, caption)
    assert qa_pairs(["no objects here."], ["x"], world, 0) == [None]


def test_plateau_rule_known_answers():
    falling = [(s, 10.0 - s / 1000) for s in range(0, 1001, 100)]  # 9.2 -> 9.0 in the last 20%
    verdict = plateau(falling)
    assert verdict["relative_gain"] == pytest.approx(0.2 / 9.2)
    assert not verdict["plateaued"]
    flat = [(s, 5.0 if s < 800 else 4.99) for s in range(0, 1001, 100)]
    assert plateau(flat)["plateaued"]
    with pytest.raises(ValueError, match="at least two"):
        plateau([(10, 1.0)])


def test_grid_is_the_pre_registered_one_with_equal_budgets():
    cfg = v2()
    points = grid_points(cfg)
    assert Counter(family for _, family, _, _ in points) == {f: 4 for f in FAMILIES}
    assert Counter(f for _, f, _, _ in grid_points(v2_smoke())) == {f: 1 for f in FAMILIES}
    sft = [o for _, f, _, o in points if f == "SFT"]
    assert {o["post_lr"] for o in sft} == {cfg.pretrain_lr / 10, cfg.pretrain_lr / 30}
    assert {o["post_steps"] for o in sft} == {2 * 64, 4 * 64}  # 2048 scenes / 32 per batch
    diva = [o for _, f, _, o in points if f != "SFT"]
    assert {(o["lambda_sha"], o["tau"]) for o in diva} == {(0.1, 0.07), (0.1, 0.2), (0.6, 0.07),
                                                          (0.6, 0.2)}  # fmt: skip
    assert all(o["lambda_sha"] == o["lambda_uni"] for o in diva)
    assert cfg.post_lr == pytest.approx(cfg.pretrain_lr / 20)
    assert cfg.post_warmup == round(0.07 * cfg.post_steps) and cfg.post_steps == 3 * 64
    assert v2_quick().base_key() != cfg.base_key() != v2_smoke().base_key()


def _fake_grid(tmp_path, scores):
    cfg = v2_quick()
    for (name, _, arm, _), score in zip(grid_points(cfg), scores, strict=True):
        folder = tmp_path / protocol.arm_folder(name) / "seed0"
        folder.mkdir(parents=True)
        metrics = {"und_score": score, "gen_overall": score}
        (folder / "record.json").write_text(json.dumps({"arm": arm, "metrics": metrics}))
    return cfg


def test_selection_takes_the_best_val_score_and_breaks_ties_toward_smaller_settings(tmp_path):
    # SFT: lr1-10 ep2, lr1-10 ep4, lr1-30 ep2, lr1-30 ep4; DIVA: (0.1,.07) (0.1,.2) (0.6,.07) ...
    scores = [0.5, 0.6, 0.6, 0.4] + [0.3, 0.7, 0.7, 0.2] + [0.1, 0.1, 0.1, 0.1]
    cfg = _fake_grid(tmp_path, scores)
    chosen = select(tmp_path, cfg)
    assert chosen["SFT"]["point"] == "SFT lr1-30 ep2"  # tie with lr 1/10 ep4: smaller LR wins
    assert chosen["DIVA (EMA targets)"]["point"] == "DIVA (EMA targets) lambda0.1 tau0.2"
    assert chosen["DIVA (online targets)"]["overrides"]["lambda_sha"] == 0.1  # all tied
    assert json.loads((tmp_path / "selection.json").read_text()) == chosen


def test_selection_refuses_an_incomplete_grid_and_final_refuses_without_one(tmp_path):
    cfg = _fake_grid(tmp_path, [0.5] * 12)
    (tmp_path / protocol.arm_folder("SFT lr1-10 ep2") / "seed0" / "record.json").unlink()
    with pytest.raises(SystemExit, match="incomplete"):
        select(tmp_path, cfg)
    with pytest.raises(SystemExit, match="selection.json"):
        protocol.main(["final", "--mode", "v2-smoke", "--out", str(tmp_path / "none")])


def test_smoke_protocol_end_to_end_reads_the_eval_split_only_in_final(tmp_path, monkeypatch):
    splits = []
    real = protocol.eval_set
    monkeypatch.setattr(
        protocol, "eval_set", lambda c, t, split: splits.append(split) or real(c, t, split)
    )  # noqa: E501
    out = ["--mode", "v2-smoke", "--out", str(tmp_path)]
    protocol.main(["grid", *out])
    assert set(splits) == {"val"}
    protocol.main(["select", *out])
    protocol.main(["final", *out, "--arms", "Base", "Base+SFT", "Base+DIVA"])
    assert splits[-1] == "eval" and splits.count("eval") == 1
    root = tmp_path / "v2-smoke"
    record = json.loads((root / "final" / "Base_DIVA" / "seed0" / "record.json").read_text())
    chosen = json.loads((root / "grid" / "selection.json").read_text())
    assert record["overrides"] == chosen["DIVA (EMA targets)"]["overrides"]
    saved = load_base(v2_smoke(), root / "final" / "Base_DIVA" / "seed0" / "model")  # EMA weights
    assert saved.num_layers == v2_smoke().num_layers
    assert record["balance"]["summary"]["measured_steps"] > 0
    for key in ("und_score", "mcb_accuracy", "pope_accuracy", "gen_overall", "gen_counting"):
        assert 0.0 <= record["metrics"][key] <= 1.0
    protocol.main(["report", *out])
    table = (root / "report" / "table.md").read_text()
    assert "GenEval-style categories, arm - SFT, paired" in table and "Gradient balance" in table
    assert "| Base+DIVA |" in table and "bootstrap" in table and "plateau rule" in table
    assert "cos(und, gen) |" in table
    for plot in ("base.png", "curves.png", "metrics.png", "paired.png", "samples.png"):
        assert (root / "report" / plot).stat().st_size > 1000
    model, scores = root / "final" / "Base_DIVA" / "seed0" / "model", tmp_path / "scores.json"
    protocol.main(["evaluate", *out, "--model", str(model), "--split", "eval", "--output",
                   str(scores)])  # fmt: skip
    again = json.loads(scores.read_text())  # the kept weights score as the run did
    assert again == {k: v for k, v in record["metrics"].items() if isinstance(v, float)}
    with pytest.raises(SystemExit):  # never over an existing file, and before any compute
        protocol.main(["evaluate", *out, "--model", str(model), "--output", str(scores)])
    with pytest.raises(SystemExit):
        protocol.main(["evaluate", *out, "--model", str(tmp_path / "missing")])
    before = (root / "final" / "Base_DIVA" / "seed0" / "record.json").stat().st_mtime
    protocol.main(["final", *out, "--arms", "Base+DIVA"])  # resumable: nothing runs again
    assert (root / "final" / "Base_DIVA" / "seed0" / "record.json").stat().st_mtime == before


def test_caption_decoding_budget_holds_the_longest_caption_of_each_world():
    """Greedy decoding stops at ``caption_budget`` tokens: a cap below the longest true caption
    (v2: 4 objects, 40 tokens) truncates the caption and scores the last objects as missing."""
    from benchmarks.mini.evaluate import caption_budget
    from diva_lightning.data.shapes import ShapesWorld

    tokenizer = build_base(v2_smoke()).tokenizer
    for world in (ShapesWorld(seed=0), ShapesWorldV2()):
        longest = max(len(tokenizer(world.describe(world.objects(i)))["input_ids"])
                      for i in range(2000))  # fmt: skip
        assert longest + 1 <= caption_budget(world)  # + </s>


def test_report_labels_an_ablation_with_its_own_change_over_the_selected_setting():
    cfg = v2()
    selected = {"lambda_sha": 0.1, "lambda_uni": 0.1, "tau": 0.2}  # what the log line prints
    record = {"arm": "lambda_uni 0.4", "overrides": selected}
    assert effective_setting(record, cfg) == {
        "λ_sha": 0.1,
        "λ_uni": 0.4,
        "τ": 0.2,
        "targets": "ema",
    }
    no_sg = effective_setting({"arm": "w/o stop-grad", "overrides": selected}, cfg)
    assert no_sg["targets"] == "online" and no_sg["stop_gradient"] is False
    sft = {"arm": "Base+SFT", "overrides": {"post_lr": 5e-5, "post_steps": 256}}
    assert settings_table([sft], cfg).endswith("| Base+SFT | lr 5e-05, steps 256 |")
    runs = [{"arm": "A", "train_s": t, "total_s": t + 60} for t in (200, 210, 900)]
    timing = timing_table(runs)
    assert "| A | 3.3 3.5 15.0! | 4.3 4.5 16.0! |" in timing
    assert "3 runs: 25 min recorded, 14 min at each arm's median." in timing


def test_report_reads_the_grid_from_its_kept_summary_when_the_records_are_gone(tmp_path):
    summary = [{"point": "SFT_lr1-30_ep4", "arm": "Base+SFT", "overrides": {"post_lr": 5e-5},
                "und_score": 0.75, "gen_overall": 0.77, "train_s": 230.0}]  # fmt: skip
    (tmp_path / "grid_val.json").write_text(json.dumps(summary))
    rows = load_grid(tmp_path)
    assert rows == [{"arm": "SFT_lr1-30_ep4", "metrics": {"und_score": 0.75, "gen_overall": 0.77}}]
    record = {"arm": "Base+SFT", "folder": str(tmp_path / "SFT_x" / "seed0"), "metrics": {}}
    (tmp_path / "SFT_x" / "seed0").mkdir(parents=True)
    (tmp_path / "SFT_x" / "seed0" / "record.json").write_text(json.dumps(record))
    assert [r["arm"] for r in load_grid(tmp_path)] == ["SFT_x"]  # records win over the summary
