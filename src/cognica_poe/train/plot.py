"""
Per-stage curves of a run, from its metrics.jsonl: validation BPB of every exit, and the train loss of every
stage, against the step. Uses matplotlib's Agg backend (files only, no display needed); matplotlib is optional
(the `plots` extra): without it a run skips its plot with a warning rather than failing at the end.
"""

import json
import warnings

from ..extras import require


def pyplot(purpose: str):
    """matplotlib.pyplot on the Agg backend, or ModuleNotFoundError naming the `plots` extra."""
    matplotlib = require("matplotlib", "plots", purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plots", purpose)


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a metrics.jsonl."""
    train, evals = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                (evals if r["type"] == "eval" else train).append(r)
    return train, evals


def plot_metrics(metrics_path: str, out_png: str, title: str | None = None) -> str | None:
    """Draw per-stage val BPB (left) and per-stage train loss (right) to out_png; returns out_png (None, with a
    warning, when matplotlib is not installed)."""
    try:
        plt = pyplot("plotting a run's curves")
    except ModuleNotFoundError as e:
        warnings.warn(f"{e}; {out_png} is not drawn", UserWarning, stacklevel=2)
        return None
    train, evals = read_metrics(metrics_path)
    fig, (ax_bpb, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    if evals:
        steps = [r["step"] for r in evals]
        for k in range(len(evals[0]["bpb"])):
            ax_bpb.plot(steps, [r["bpb"][k] for r in evals], marker="o", ms=3, label=f"exit {k}")
    ax_bpb.set(xlabel="step", ylabel="validation bits per byte", title="val BPB per stage exit")
    if train:
        steps = [r["step"] for r in train]
        for k in range(len(train[0]["losses"])):
            ax_loss.plot(steps, [r["losses"][k] for r in train], lw=0.8, label=f"stage {k}")
    ax_loss.set(xlabel="step", ylabel="train loss (nats)", title="train loss per stage")
    for ax in (ax_bpb, ax_loss):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
