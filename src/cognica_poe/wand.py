"""
WAND adaptive depth: per token, stop at the first stage exit whose top-1 margin cannot be overturned by the
stages left to run.

The rule: bounds B_j = p99 over calibration tokens of max_v |s_j(v) - s_{j-1}(v)| between
consecutive exits (softcapped logits). After exit k, with margin m_k = top1 - top2 of s_k, exit if
m_k > safety * sum_{j>k} B_j. safety 1 is the empirical setting; with L-inf bounds safety 2 guarantees the
argmax at p99; a huge safety never exits early (== full greedy). With do_sample the token is drawn from the
exit stage's distribution: an approximation of the full model's, since the rule only protects the argmax.

Exactness of the cache: a token that exits at stage k has no keys/values in deeper layers yet. Before the
next step that needs a deeper stage, that stage first runs for every pending slot, batched with the new
token in one forward (its input is the stream the cache kept at the previous boundary). Nothing is ever
approximated: after a final catch-up the cache equals a full-depth prefill.

In a batch a step runs a stage while any row still needs it (the number of forward calls per step does not
depend on the batch size); each row takes its token from its own exit.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from .cache import CognicaKVCache
from .config import CognicaPoEConfig
from .model import GPT
from .sampling import SamplingParams, begin_decoding, is_real

CARD_P99_BOUNDS = (7.09, 3.03, 2.15)  # the released d24's bounds for the 1->2, 2->3, 3->4 exit transitions


def resolve_bounds(config: CognicaPoEConfig, p99_bounds: list[float] | tuple[float, ...] | None) -> list[float]:
    """The argument, else the config's calibrated bounds, else the card's defaults (4 exits only). config: the
    model's (the MLX backend's ModelArgs, too)."""
    n = config.poe_n_stages
    if p99_bounds is None:
        p99_bounds = config.wand_p99_bounds
    if p99_bounds is None:
        if n != 4:
            raise ValueError(f"this model has {n} stages and no calibrated WAND bounds: run `cognica-poe calibrate` "
                             f"or pass p99_bounds with {n - 1} values")
        p99_bounds = CARD_P99_BOUNDS
    bounds = list(p99_bounds)
    if len(bounds) != n - 1:
        raise ValueError(f"p99_bounds needs {n - 1} values (one per transition between {n} exits), got {len(bounds)}")
    if not all(is_real(b) and math.isfinite(b) and b >= 0 for b in bounds):
        raise ValueError(f"p99_bounds must be finite numbers >= 0, got {bounds}")
    return [float(b) for b in bounds]


def exit_thresholds(bounds: list[float], safety: float) -> list[float]:
    """Margin needed to exit after stage k: safety * (sum of the bounds of the transitions still ahead)."""
    if not is_real(safety) or not math.isfinite(safety) or safety < 0:
        raise ValueError(f"safety must be a finite number >= 0 (larger exits later), got {safety!r}")
    return [float(safety) * sum(bounds[k:]) for k in range(len(bounds))] + [float("-inf")]


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def catch_up(gpt: GPT, cache: CognicaKVCache, end: int, last_stage: int,
             shared: dict | None = None) -> dict[int, torch.Tensor]:
    """
    Run stages 0..last_stage for every slot in [their fill level, end): pending early-exit slots and any new
    ones, one forward per stage. Returns {stage: stream at its exit for slot end - 1} for stages that ran it.
    """
    out = {}
    for s in range(last_stage + 1):
        start = cache.stage_len(s)
        if start >= end:
            continue
        layers = cache.stage_layers[s]
        boundary = layers[-1]
        h = gpt.run_slots(cache, start, end, layers[0], boundary, [boundary], logits_to_keep=1, shared=shared)
        out[s] = h[boundary]
    return out


@dataclass
class WandResult:
    sequences: torch.Tensor  # (B, T + n) prompt + generated ids
    stages_used: list[list[int]]  # per row, the exit stage of each token it generated (rows that stop are shorter)
    cache: CognicaKVCache


@torch.no_grad()
def run_wand(gpt: GPT, input_ids: torch.Tensor, safety: float = 1.0, p99_bounds: list[float] | None = None,
             attention_mask: torch.Tensor | None = None, complete_cache: bool = False,
             generation_config: GenerationConfig | None = None, **sampling) -> WandResult:
    """
    WAND decoding with everything it knows; `complete_cache` catches every layer up at the end. Logits processors
    apply to each exit's scores before its margin test, so the rule protects the processed argmax.
    """
    params = SamplingParams.from_kwargs(generation_config, **sampling)
    bounds = resolve_bounds(gpt.config, p99_bounds)
    thresholds = exit_thresholds(bounds, safety)
    state = begin_decoding(gpt, input_ids, attention_mask, params, keep_hidden=True)
    cache, sink = state.cache, state.sink
    n_stages = gpt.config.poe_n_stages
    boundaries = gpt.config.poe_stage_boundary_layers
    B = state.input_ids.size(0)
    device = state.input_ids.device
    stages_used: list[list[int]] = [[] for _ in range(B)]

    # the prompt runs at full depth; its last position's exits decide the first token like any other step
    hidden = gpt.hidden_at_exits(state.input_ids, boundaries, cache, state.attention_mask, logits_to_keep=1)
    exits = {s: gpt.exit_logits(hidden[b], b)[:, -1] for s, b in enumerate(boundaries)}
    while True:
        chosen = torch.empty(B, gpt.config.vocab_size, device=device)
        exit_stage = torch.full((B,), -1, dtype=torch.long, device=device)
        shared = {}  # this step's stage calls share embeddings and masks
        for s in range(n_stages):
            if s not in exits:  # a deeper stage is needed: catch it up for pending slots and run it for this token
                got = catch_up(gpt, cache, cache.n_slots, s, shared)
                exits[s] = gpt.exit_logits(got[s], boundaries[s])[:, -1]
            scores = state.process(exits[s])
            open_rows = exit_stage < 0
            leave = open_rows & (top2_margin(scores) > thresholds[s])
            chosen[leave] = scores[leave]
            exit_stage[leave] = s
            if not bool((exit_stage < 0).any()):
                break
        tokens = state.choose(chosen)
        for row in range(B):
            if not sink.done[row]:
                stages_used[row].append(int(exit_stage[row]))
        sink.push_column(tokens)
        if sink.all_done:
            break
        cache.claim(tokens[:, None])
        exits = {}
    if complete_cache:
        catch_up(gpt, cache, cache.n_slots, n_stages - 1)
    return WandResult(state.output(), stages_used, cache)


def generate_wand(gpt: GPT, input_ids: torch.Tensor, safety: float = 1.0, p99_bounds: list[float] | None = None,
                  return_stages_used: bool = False, **kwargs):
    """
    Prompt + generated ids (B, T + n); with return_stages_used, (ids, stages_used): the 0-based exit stage of
    every generated token, a flat list for a batch of one (so `sum(stages_used) / len(stages_used)` is the mean
    exit), else one list per row (a row that stopped early has fewer entries). kwargs: attention_mask,
    generation_config and the SamplingParams fields, as generate_stage.
    """
    result = run_wand(gpt, input_ids, safety=safety, p99_bounds=p99_bounds, **kwargs)
    if not return_stages_used:
        return result.sequences
    used = result.stages_used
    return result.sequences, (used[0] if len(used) == 1 else used)


@torch.no_grad()
def calibrate_wand_bounds(gpt: GPT, stream: torch.Tensor, seq_len: int | None = None, batch_size: int = 8,
                          max_windows: int | None = None, quantile: float = 0.99,
                          progress: Callable[[int, int], None] | None = None) -> list[float]:
    """
    p99 over tokens of max_v |s_j(v) - s_{j-1}(v)| for each pair of consecutive exits (softcapped logits), from
    fresh-context windows of a token stream. Store the result in config.wand_p99_bounds. progress(done, total) is
    called after each batch of windows (the command line draws a bar with it; this file imports no tqdm).
    """
    seq_len = seq_len or gpt.config.sequence_len
    starts = list(range(0, len(stream) - seq_len, seq_len))[:max_windows]
    if not starts:
        raise ValueError(f"calibration needs more than {seq_len} tokens, got {len(stream)}")
    device = gpt.device
    deltas: list[list[torch.Tensor]] = [[] for _ in range(gpt.config.poe_n_stages - 1)]
    for i in range(0, len(starts), batch_size):
        x = torch.stack([stream[s:s + seq_len] for s in starts[i:i + batch_size]]).to(device)
        exits = gpt.forward_all_stages(x)
        for j in range(1, len(exits)):
            deltas[j - 1].append((exits[j] - exits[j - 1]).abs().amax(dim=-1).flatten().float().cpu())
        if progress is not None:
            progress(min(i + batch_size, len(starts)), len(starts))
    bounds = []
    for d in deltas:
        d = torch.cat(d)
        if d.numel() > 1_000_000:  # torch.quantile's input limit: a fixed-seed subsample
            d = d[torch.randperm(d.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
        bounds.append(round(float(torch.quantile(d, quantile)), 4))
    return bounds
