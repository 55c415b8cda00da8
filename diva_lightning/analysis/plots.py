"""Figure-2-style plots of the divergence curves (a: gradient conflict, b: geometry, c: frequency)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _shade(ax, result: dict) -> None:
    start, end = result["suggested_range"]
    ax.axvspan(start - 0.5, end + 0.5, color="tab:green", alpha=0.12, label="suggested I_mid")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)


def plot_divergence(result: dict, out_dir: str | Path) -> list[Path]:
    """Write ``fig2a_gradient_conflict.png``, ``fig2b_geometry.png``, ``fig2c_frequency.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = result["layers"]
    paths = []

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(layers, result["grad_cosine"], "o-", color="tab:red")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_ylabel("cos(grad L_Und, grad L_Gen)")
    ax.set_title("(a) gradient conflict per layer")
    _shade(ax, result)
    ax.legend(loc="best", fontsize=8)
    paths.append(out_dir / "fig2a_gradient_conflict.png")

    fig_b, ax1 = plt.subplots(figsize=(5, 3.2))
    ax1.plot(layers, result["residual"], "o-", color="tab:blue", label="R_res(G|U)")
    ax1.set_ylabel("reconstruction residual", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(layers, result["rank_increment"], "s--", color="tab:orange", label="dER")
    ax2.set_ylabel("effective-rank increment", color="tab:orange")
    ax1.set_title("(b) divergence of the two flows")
    _shade(ax1, result)
    paths.append(out_dir / "fig2b_geometry.png")

    fig_c, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(layers, result["high_freq_u"], "o-", label="understanding")
    ax.plot(layers, result["high_freq_g"], "s-", label="generation")
    ax.set_ylabel("high-frequency energy share")
    ax.set_title("(c) frequency analysis")
    _shade(ax, result)
    ax.legend(loc="best", fontsize=8)
    paths.append(out_dir / "fig2c_frequency.png")

    for figure, path in zip((fig, fig_b, fig_c), paths, strict=True):
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)
    return paths


def summary_text(result: dict) -> str:
    """A short human summary of the curves and the suggested range."""
    start, end = result["suggested_range"]
    cos = result["grad_cosine"]
    worst = min(range(len(cos)), key=cos.__getitem__)
    return "\n".join(
        [
            f"samples analysed: {result['samples']}, layers: {len(result['layers'])}",
            f"gradient cosine (L_Und vs L_Gen): min {min(cos):+.3f} at layer {worst + 1}, "
            f"max {max(cos):+.3f}",
            f"reconstruction residual R_res(G|U): {min(result['residual']):.3f}..{max(result['residual']):.3f}",
            f"effective-rank increment: {min(result['rank_increment']):+.2f}..{max(result['rank_increment']):+.2f}",
            f"high-frequency share U/G at the last layer: {result['high_freq_u'][-1]:.3f} / "
            f"{result['high_freq_g'][-1]:.3f}",
            f"suggested middle layers: {start}..{end} (rule: {result['rule']})",
        ]
    )
