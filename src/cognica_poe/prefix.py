"""
Stage prefix pruning: generate with stages 0..s only and the exit of stage s.

Because every stage was trained against the shared head on its own, the prefix is a complete smaller model:
its predictions are exactly those the same layers make inside the full model (the prefix of
`forward_all_stages`). Only the layers of stages 0..s run and only they hold KV; deeper layers are never touched.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import torch
from transformers import GenerationConfig

from .model import GPT
from .sampling import SamplingParams, decode


@torch.no_grad()
def generate_stage(gpt: GPT, input_ids: torch.Tensor, stage: int, attention_mask: torch.Tensor | None = None,
                   generation_config: GenerationConfig | None = None, **sampling) -> torch.Tensor:
    """
    Prompt + up to max_new_tokens tokens per row (B, T + n), decoded from the exit of `stage` (0-based).
    sampling: the SamplingParams fields (max_new_tokens=32, do_sample, temperature, top_k, top_p, min_p,
    repetition_penalty, no_repeat_ngram_size, logits_processor, seed, stop_tokens, streamer, max_length).
    """
    params = SamplingParams.from_kwargs(generation_config, **sampling)
    boundary = gpt.config.stage_boundary(stage)

    def next_scores(cache, ids, mask):
        h = gpt.hidden_at_exits(ids, [boundary], cache, mask, logits_to_keep=1)[boundary]
        return gpt.exit_logits(h, boundary)[:, -1]

    return decode(gpt, input_ids, attention_mask, params, next_scores)
