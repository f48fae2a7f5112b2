"""
The PoE losses: every stage exit is trained as a predictor with its own cross-entropy through the one shared
lm_head, and the total is sum_k loss_k / K^(1 - poe_alpha).

Three modes. "flat" = the PoE of the model: the residual stream entering each stage is detached, so no gradient
crosses a stage boundary except through x0 (embedding + smear, NOT detached: wte, smear and lm_head learn from
every stage). "hier" = the same losses in one graph without any detach (deep supervision); "none" = the standard
forward's single loss (the backprop baseline).

Why flat PoE is trained stage by stage: since nothing flows back across a boundary, stage k's backward can run
right after its forward, freeing its activations before stage k+1 runs (activation memory about 1/K of
backprop's). x0 enters every stage as one leaf tensor whose .grad accumulates the stages' contributions; one
final x0.backward(x0_leaf.grad) sends it into wte/smear. The gradients equal those of one graph holding all
stages with the same detaches (tests/test_train.py).

The last stage's loss is the served forward: CE(softcap(lm_head(norm(h_last - backout_lambda *
x_backout.detach())))), so backout_lambda learns from the last stage only. Intermediate exits have no backout.
"""

import torch
import torch.nn.functional as F

from ..model import GPT


class NonFiniteLossError(ValueError):
    """A loss, gradient or weight became NaN or inf; the run stopped before stepping on it or saving it. A
    ValueError, so the CLI prints it as one line (a diverged run is a property of its settings and data)."""


def poe_loss_scale(n_stages: int, alpha: float) -> float:
    """Total = sum_k loss_k / K^(1 - alpha): alpha 0 -> mean, 1 -> sum."""
    return 1.0 / n_stages ** (1.0 - alpha)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def _exit_loss(gpt: GPT, h: torch.Tensor, last: int, x_backout: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    if gpt.applies_backout(last):
        h = h - gpt.backout_lambda.to(h.dtype) * x_backout
    return _ce(gpt.exit_logits(h), targets)


def joint_stage_losses(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, detach: bool) -> list[torch.Tensor]:
    """
    Every stage's loss from one graph. detach=True: flat PoE (stream detached entering stages 1.., x_backout
    detached in the last loss, x0 attached); detach=False: hier (plain deep supervision).
    """
    x0, step = gpt.prepare(idx)
    x, x_backout, losses = x0, None, []
    for k, layers in enumerate(gpt.config.stage_layers()):
        last = layers[-1]
        if detach and k > 0:
            x = x.detach()
        for i in layers:
            x = gpt.run_layer(i, x, x0, idx, step)
            if i == gpt.config.backout_layer:
                x_backout = x.detach() if detach else x
        losses.append(_exit_loss(gpt, x, last, x_backout, targets))
    return losses


def flat_stage_range_backward(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, scale: float, stages: range,
                              x: torch.Tensor | None = None, x_backout: torch.Tensor | None = None
                              ) -> tuple[list[float], torch.Tensor, torch.Tensor | None]:
    """
    Flat PoE over `stages` (consecutive) only, one stage at a time: forward stage k, backward (scale * loss_k) at
    once (freeing its activations), pass h_k.detach() on. x: the detached stream entering stages[0] (None: stages
    start at 0 and x is x0); x_backout: the detached backout stream if its layer ran before stages[0]. x0 is
    recomputed here from idx as a leaf shared by these stages; its gradient goes into wte/smear at the end (so a
    pipeline rank that owns some stages sends only streams on, never a gradient back). Returns the stages' losses
    and the detached streams leaving the last of them (x, x_backout), for the next stages.
    """
    x0, step = gpt.prepare(idx)  # (B, T, C), graph through wte and smear kept
    x0_leaf = x0.detach().requires_grad_()
    x = x0_leaf if x is None else x
    all_layers, losses = gpt.config.stage_layers(), []
    for k in stages:
        layers = all_layers[k]
        for i in layers:
            x = gpt.run_layer(i, x, x0_leaf, idx, step)
            if i == gpt.config.backout_layer:
                x_backout = x.detach()
        loss = _exit_loss(gpt, x, layers[-1], x_backout, targets)
        (loss * scale).backward()  # frees this stage's graph
        losses.append(loss.detach())
        x = x.detach()
    if x0_leaf.grad is not None:
        x0.backward(x0_leaf.grad)
    return [float(v) for v in losses], x, x_backout


def flat_stagewise_backward(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, scale: float) -> list[float]:
    """
    Flat PoE over every stage (flat_stage_range_backward): returns the per-stage losses. Gradients equal
    joint_stage_losses(detach=True) summed times scale.
    """
    return flat_stage_range_backward(gpt, idx, targets, scale, range(gpt.config.poe_n_stages))[0]


def backward_step(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, mode: str, alpha: float,
                  grad_scale: float = 1.0) -> list[float]:
    """Forward + backward of one micro-batch in `mode`; returns the unscaled per-stage (or single) losses."""
    if mode == "flat":
        return flat_stagewise_backward(gpt, idx, targets, grad_scale * poe_loss_scale(gpt.config.poe_n_stages, alpha))
    if mode == "hier":
        losses = joint_stage_losses(gpt, idx, targets, detach=False)
        (sum(losses) * poe_loss_scale(len(losses), alpha) * grad_scale).backward()
        return [float(v.detach()) for v in losses]
    if mode == "none":
        loss = gpt(idx, targets)
        (loss * grad_scale).backward()
        return [float(loss.detach())]
    raise ValueError(f"poe_mode must be flat, hier or none, got {mode!r}")

