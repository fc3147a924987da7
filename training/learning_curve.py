"""Did the run learn? The end-of-run verdict and the reward plot.

The verdict compares the last quarter of GRPO steps with the first: the rise of the mean
total reward, its standard error (Welch: the two quarters' variances over their sizes) and a
percentile-bootstrap 95% interval (steps resampled within each quarter, seeded). Steps are
treated as independent draws around each quarter's mean; a policy drifting within a quarter
makes the error an underestimate, so the line says how many errors the rise is, not a p-value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

CLEAR_RISE_SE = 3.0  # a rise of at least this many standard errors is called learning


@dataclass
class RiseVerdict:
    steps: int
    quarter: int            # steps in each compared quarter
    first_mean: float
    last_mean: float
    rise: float             # last - first
    se: float               # nan with fewer than 2 steps per quarter
    ci_low: float           # percentile-bootstrap 95% interval of the rise
    ci_high: float

    @property
    def z(self) -> float:
        return self.rise / self.se if self.se > 0 else math.nan

    @property
    def learned(self) -> bool:
        return math.isfinite(self.z) and self.z >= CLEAR_RISE_SE

    def line(self) -> str:
        if not math.isfinite(self.se):
            return (f"verdict: too few steps to judge ({self.steps}; at least 8 give two per quarter); total reward "
                    f"{self.first_mean:.3f} -> {self.last_mean:.3f}")
        word = ("learned" if self.learned else "no clear rise" if self.z < 2 else "weak rise")
        return (f"verdict: {word}: total reward {self.first_mean:.3f} (first {self.quarter} steps) -> "
                f"{self.last_mean:.3f} (last {self.quarter}), rise {self.rise:+.3f} = {self.z:.1f} standard errors "
                f"(se {self.se:.3f}), 95% bootstrap interval [{self.ci_low:+.3f}, {self.ci_high:+.3f}]")

    def to_dict(self) -> Dict[str, float]:
        return {**asdict(self), "z": self.z, "learned": self.learned, "line": self.line()}


def rise_verdict(values: Sequence[float], resamples: int = 4000, seed: int = 0) -> RiseVerdict:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        raise ValueError("no steps to judge")
    q = max(1, len(v) // 4)
    first, last = v[:q], v[-q:]
    rise = float(last.mean() - first.mean())
    if q < 2:
        return RiseVerdict(len(v), q, float(first.mean()), float(last.mean()), rise, math.nan, math.nan, math.nan)
    se = math.sqrt(first.var(ddof=1) / q + last.var(ddof=1) / q)
    rng = np.random.default_rng(seed)
    boots = (rng.choice(last, (resamples, q)).mean(1) - rng.choice(first, (resamples, q)).mean(1))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return RiseVerdict(len(v), q, float(first.mean()), float(last.mean()), rise, se, float(lo), float(hi))


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` steps (shorter at the start), same length as values."""
    v = np.asarray(values, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_curves(curves: Mapping[str, Sequence[float]], verdict: RiseVerdict, path: str | Path) -> Path:
    """One panel per curve (total first): per-step values and their moving average; the
    compared quarters shaded on the total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(curves)
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.9 * len(names) + 0.6), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        v = np.asarray(curves[name], dtype=np.float64)
        steps = np.arange(1, len(v) + 1)
        window = max(3, len(v) // 8)
        ax.plot(steps, v, ".", color="0.6", markersize=4, label="per step")
        ax.plot(steps, moving_average(v, window), "-", color="C0", label=f"moving average ({window})")
        ax.set_ylabel(name, fontsize=9)
        ax.grid(alpha=0.3)
        if name == names[0] and len(v) >= 2:
            q = verdict.quarter
            ax.axvspan(0.5, q + 0.5, color="C1", alpha=0.12)
            ax.axvspan(len(v) - q + 0.5, len(v) + 0.5, color="C2", alpha=0.12)
            ax.legend(fontsize=8, loc="lower right")
    axes[-1, 0].set_xlabel("GRPO step")
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(verdict.line().replace("verdict: ", "", 1).split(", 95%")[0], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def learning_report(total: Sequence[float], components: Mapping[str, List[float]], out_dir: str | Path) -> Dict:
    """The verdict on the total reward and the plot (`learning_curve.png` in out_dir)."""
    verdict = rise_verdict(total)
    png = plot_curves({"total reward": total, **{f"{k} reward": v for k, v in components.items()}}, verdict,
                      Path(out_dir) / "learning_curve.png")
    return {**verdict.to_dict(), "plot": str(png)}


def report_learning(total: Sequence[float], components: Mapping[str, List[float]], out_dir: str | Path,
                    tracker) -> Optional[Dict[str, Any]]:
    """The end of a training run: `learning_report`, the plot logged to MLflow and the verdict
    printed. None when no step ran; a failure is logged and returned, not raised (the run's
    work is saved by then and must not be lost to a plot)."""
    if not total:
        return None
    try:
        report = learning_report(total, components, out_dir)
    except Exception as exc:
        logging.getLogger(__name__).warning("could not write the learning report: %s: %s", type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}
    tracker.artifact(report["plot"])
    print(report["line"])
    return report
