"""
Per-stage curves of a run, from its metrics.jsonl: validation BPB of every exit, and the train loss of every
stage, against the step. The figure is a matplotlib Figure saved straight to a PNG (no pyplot, no display, and the
caller's backend is left as it is), written atomically; matplotlib is optional (the `plots` extra): without it a
run skips its plot with a warning rather than failing at the end.
"""

import json
import warnings

from ..atomic import atomic_file
from ..extras import require


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
        require("matplotlib", "plots", "plotting a run's curves")
    except ModuleNotFoundError as e:
        warnings.warn(f"{e}; {out_png} is not drawn", UserWarning, stacklevel=2)
        return None
    from matplotlib.figure import Figure

    train, evals = read_metrics(metrics_path)
    fig = Figure(figsize=(11, 4))
    ax_bpb, ax_loss = fig.subplots(1, 2)
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
    with atomic_file(out_png, "wb") as f:  # a failed write keeps the previous curves
        fig.savefig(f, format="png", dpi=110)
    return out_png
