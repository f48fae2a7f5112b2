"""
Parallel composition (Log-OP) of stage exits: score = sum_s w_s * log_softmax(logits_s).

A product of experts over any subset of exits, all read from ONE cached pass up to the deepest chosen stage.
Greedy takes the argmax of the score; sampling draws from softmax(score / temperature) (after top-k/top-p).
With weights 1 the product sharpens where the exits agree and widens the top-1 margin.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import math

import torch
from transformers import GenerationConfig

from .config import CognicaPoEConfig
from .model import GPT
from .sampling import SamplingParams, decode, is_real


def log_op(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Weighted sum of log-probabilities of several exits (each (..., V)), in fp32."""
    return sum(w * torch.log_softmax(l.float(), dim=-1) for w, l in zip(weights, logits))


def composition_weights(n_stages: int, stage_weights: list[float] | None) -> list[float]:
    """One finite, non-negative weight per chosen exit (1.0 each by default), at least one of them positive."""
    if stage_weights is None:
        return [1.0] * n_stages
    weights = list(stage_weights)
    if len(weights) != n_stages:
        raise ValueError(f"stage_weights has {len(weights)} entries but stages has {n_stages}")
    if not all(is_real(w) and math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"stage_weights must be finite numbers >= 0, at least one of them > 0, got {weights}")
    return [float(w) for w in weights]


def check_composition(config: CognicaPoEConfig, stages: list[int], stage_weights: list[float] | None
                      ) -> tuple[list[int], list[float]]:
    """The stages as ints and their weights, checked against the model's config (the MLX backend's ModelArgs, too)."""
    stages = list(stages)
    if not stages:
        raise ValueError("stages must name at least one stage")
    for s in stages:
        config.stage_boundary(s)  # raises for a bad index
    return [int(s) for s in stages], composition_weights(len(stages), stage_weights)


@torch.no_grad()
def generate_parallel_composition(gpt: GPT, input_ids: torch.Tensor, stages: list[int],
                                  stage_weights: list[float] | None = None,
                                  attention_mask: torch.Tensor | None = None,
                                  generation_config: GenerationConfig | None = None, **sampling) -> torch.Tensor:
    """
    Prompt + generated ids (B, T + n) decoded from the Log-OP of the chosen stage exits; logits processors apply
    to the composed score. sampling: the SamplingParams fields, as generate_stage.
    """
    params = SamplingParams.from_kwargs(generation_config, **sampling)
    stages, weights = check_composition(gpt.config, stages, stage_weights)
    boundaries = [gpt.config.stage_boundary(s) for s in stages]

    def next_scores(cache, ids, mask):
        hidden = gpt.hidden_at_exits(ids, boundaries, cache, mask, logits_to_keep=1)
        return log_op([gpt.exit_logits(hidden[b], b)[:, -1] for b in boundaries], weights)

    return decode(gpt, input_ids, attention_mask, params, next_scores)
