"""The pre-registered tuning grid of DIVA-mini v2 and its selection rule (``README.md``).

Every arm family gets four configurations, each run once (seed 0) and scored on the ``val``
split:

* SFT: LR in {1/10, 1/30} of the base's peak pre-training LR x epochs of ``post`` in {2, 4}
  (7% warm-up either way);
* DIVA with EMA targets, and DIVA with online targets: lambda (lambda_sha = lambda_uni) in
  {0.1, 0.6} x tau in {0.07, 0.2}, at the fixed proportions (LR 1/20, 3 epochs).

The score is the mean of caption attributes (``und_score``) and GenEval-style overall
(``gen_overall``). The highest score wins. A tie (equal to 3 decimals) goes to the smaller
lambda or LR, then the fewer steps.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.mini.config import MiniConfig, arm_folder

FAMILIES = {
    "SFT": "Base+SFT",
    "DIVA (EMA targets)": "Base+DIVA",
    "DIVA (online targets)": "Base+DIVA (online targets)",
}


def post_schedule(cfg: MiniConfig, epochs: int) -> dict:
    steps = epochs * cfg.post_samples // cfg.batch_size
    return {"post_steps": steps, "post_warmup": max(1, round(0.07 * steps))}


def grid_points(cfg: MiniConfig) -> list[tuple[str, str, str, dict]]:
    """[(point name, family, arm, MiniConfig overrides)], four per family (the first
    ``cfg.grid_per_family`` of them: smoke mode runs one)."""
    points = []
    for ratio in (10, 30):
        for epochs in (2, 4):
            overrides = {"post_lr": cfg.pretrain_lr / ratio, **post_schedule(cfg, epochs)}
            points.append((f"SFT lr1-{ratio} ep{epochs}", "SFT", "Base+SFT", overrides))
    for family in ("DIVA (EMA targets)", "DIVA (online targets)"):
        for lam in (0.1, 0.6):
            for tau in (0.07, 0.2):
                name = f"{family} lambda{lam} tau{tau}"
                overrides = {"lambda_sha": lam, "lambda_uni": lam, "tau": tau}
                points.append((name, family, FAMILIES[family], overrides))
    kept = {f: [p for p in points if p[1] == f][: cfg.grid_per_family] for f in FAMILIES}
    return [p for p in points if p in kept[p[1]]]


def selection_score(metrics: dict) -> float:
    return (metrics["und_score"] + metrics["gen_overall"]) / 2


def _tie_break(overrides: dict) -> tuple:
    return (overrides.get("lambda_sha", 0.0), overrides.get("post_lr", 0.0),
            overrides.get("post_steps", 0))  # fmt: skip


def select(grid_dir: Path, cfg: MiniConfig) -> dict:
    """Apply the rule to the grid's records -> ``selection.json`` (refuses an incomplete grid)."""
    chosen, missing = {}, []
    for family in FAMILIES:
        rows = []
        for name, fam, _, overrides in grid_points(cfg):
            if fam != family:
                continue
            record = grid_dir / arm_folder(name) / "seed0" / "record.json"
            if not record.exists():
                missing.append(str(record))
                continue
            metrics = json.loads(record.read_text())["metrics"]
            rows.append((round(selection_score(metrics), 3), name, overrides))
        if rows:
            best = max(rows, key=lambda r: (r[0], tuple(-x for x in _tie_break(r[2]))))
            chosen[family] = {"point": best[1], "overrides": best[2], "val_score": best[0],
                              "candidates": {n: s for s, n, _ in rows}}  # fmt: skip
    if missing:
        raise SystemExit("the grid is incomplete; missing:\n  " + "\n  ".join(missing))
    (grid_dir / "selection.json").write_text(json.dumps(chosen, indent=1))
    return chosen
