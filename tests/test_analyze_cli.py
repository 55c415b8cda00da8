"""``diva-cli analyze`` end to end on the tiny backbone and the synthetic world."""

import json

from diva_lightning.cli import main


def test_analyze_writes_curves_plots_and_summary(tmp_path):
    main(["analyze", "--out", str(tmp_path), "--samples", "16", "--batch_size", "8"])
    result = json.loads((tmp_path / "divergence.json").read_text())
    assert result["samples"] == 16 and result["layers"] == list(range(1, 9))
    for curve in ("grad_cosine", "residual", "rank_increment", "high_freq_u", "high_freq_g"):
        assert len(result[curve]) == 8
    assert all(-1 <= c <= 1 for c in result["grad_cosine"])
    assert all(0 <= r <= 1 for r in result["residual"])
    start, end = result["suggested_range"]
    assert 2 <= start <= end <= 7
    for name in ("fig2a_gradient_conflict", "fig2b_geometry", "fig2c_frequency"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    assert "suggested middle layers" in (tmp_path / "summary.txt").read_text()


def test_analyze_reads_a_backbone_with_continuous_targets(tmp_path):
    """Nexus-Gen: the generation flow's loss is its regression; the curves are the same kind."""
    backbone = "diva_lightning.backbones.nexus_gen.NexusGenAdapter"
    main(["analyze", "--out", str(tmp_path), "--backbone", backbone, "--samples", "4",
          "--batch_size", "2"])  # fmt: skip
    result = json.loads((tmp_path / "divergence.json").read_text())
    assert result["samples"] == 4 and len(result["grad_cosine"]) == 8
    assert all(-1 <= c <= 1 for c in result["grad_cosine"])
