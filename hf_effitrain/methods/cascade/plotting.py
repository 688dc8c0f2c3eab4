"""PNG plot of deferral curves: quality against deferral ratio (left) and against relative FLOPs (right)."""

from __future__ import annotations

import os
from pathlib import Path

from .curves import DeferralCurve


def plot_deferral_curves(curves: dict[str, DeferralCurve], path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw every curve of `curves` (name -> curve) side by side and save a PNG at `path`.

    The dashed line marks the large model's quality minus 1% of the first curve, the target for "FLOPs saved".

    Raises:
        ValueError: no curves, or curves of different metrics.
    """
    if not curves:
        raise ValueError("plot_deferral_curves needs at least one curve.")
    metrics = {c.metric for c in curves.values()}
    if len(metrics) != 1:
        raise ValueError(f"All curves of one plot must share a metric, got {sorted(metrics)}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metrics.pop()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        left.plot(curve.deferral_ratio, curve.quality, marker=".", label=f"{name} (area {curve.area:.4f})")
        right.plot(curve.relative_flops, curve.quality, marker=".", label=name)
    first = next(iter(curves.values()))
    for axis in (left, right):
        axis.axhline(first.target_quality(0.01), color="grey", linestyle="--", linewidth=0.8, label="large - 1%")
        axis.set_ylabel(metric.replace("_", " "))
        axis.grid(alpha=0.3)
    left.set_xlabel("share deferred to the large model")
    right.set_xlabel("FLOPs relative to the large model alone")
    left.legend(fontsize=8)
    fig.suptitle(title or f"cascade deferral curves ({first.level} level, {first.rule})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plot_deferral_curves"]
