"""
The stage-level decoding modes on MLX, one sequence at a time, each the PyTorch mode of the same name:

- generate_stage: prefix pruning. Only the layers of stages 0..s run and hold keys; the exit of stage s decides
  (stage -1, the last, is plain full-depth decoding).
- generate_wand: per token, the first exit whose top-1 margin exceeds safety x the bounds still ahead; a deeper
  stage first catches up the slots that exited early (from the stream the cache kept), so nothing is approximated.
- generate_speculative: the exit of draft_stage drafts k tokens on the shallow layers; one pass of the deeper layers
  over the kept streams verifies them. Greedy output is token for token plain greedy; sampling uses the standard
  accept / residual rule, so it is distributed as the full model's.
- generate_parallel_composition: Log-OP, sum_s w_s * log_softmax(exit_s), over exits read from one pass.

Each returns the prompt followed by the new ids, as a list. Sampling settings and streaming are sampling.py's.
"""

from collections.abc import Callable

import mlx.core as mx

from ..compose import check_composition
from ..wand import exit_thresholds, resolve_bounds
from .model import Cache, Model
from .sampling import Sampler, begin_decoding, decode


def generate_stage(model: Model, input_ids, stage: int, max_new_tokens: int = 32, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, stop_tokens: list[int] | int | None = None,
                   streamer: Callable[[int, int], None] | None = None, max_length: int | None = None) -> list[int]:
    """Prompt + up to max_new_tokens ids decoded from the exit of `stage` (0-based), running its layers only."""
    boundary = model.stage_boundary(stage)

    def next_scores(cache: Cache, ids: mx.array) -> mx.array:
        start = cache.claim(ids)
        h = model.run(cache, start, start + ids.shape[1], 0, boundary, [boundary])[boundary]
        return model.exit_logits(h, boundary)[0, -1]

    return decode(model, input_ids, max_new_tokens, next_scores, Sampler(do_sample, temperature, top_k, top_p, seed),
                  stop_tokens, streamer, max_length)


def generate_parallel_composition(model: Model, input_ids, stages: list[int], stage_weights: list[float] | None = None,
                                  max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                                  stop_tokens: list[int] | int | None = None,
                                  streamer: Callable[[int, int], None] | None = None,
                                  max_length: int | None = None) -> list[int]:
    """Prompt + new ids decoded from the Log-OP of the chosen stage exits (one pass up to the deepest)."""
    stages, weights = check_composition(model.config, stages, stage_weights)
    boundaries = [model.stage_boundary(s) for s in stages]

    def next_scores(cache: Cache, ids: mx.array) -> mx.array:
        start = cache.claim(ids)
        hidden = model.run(cache, start, start + ids.shape[1], 0, max(boundaries), boundaries)
        logits = [model.exit_logits(hidden[b], b)[0, -1] for b in boundaries]
        return sum(w * (x - mx.logsumexp(x, axis=-1, keepdims=True)) for w, x in zip(weights, logits))

    return decode(model, input_ids, max_new_tokens, next_scores, Sampler(do_sample, temperature, top_k, top_p, seed),
                  stop_tokens, streamer, max_length)


# -----------------------------------------------------------------------------
# WAND adaptive depth

def catch_up(model: Model, cache: Cache, end: int, last_stage: int) -> dict[int, mx.array]:
    """
    Run stages 0..last_stage for every slot in [their fill level, end): slots that exited early and any new ones,
    one call per stage. Returns {stage: stream at its exit for slot end - 1} for the stages that ran.
    """
    out = {}
    for s in range(last_stage + 1):
        layers = model.stage_layers(s)
        start = min(cache.lengths[i] for i in layers)
        if start < end:
            out[s] = model.run(cache, start, end, layers[0], layers[-1], [layers[-1]])[layers[-1]]
    return out


def top2_margin(logits: mx.array) -> float:
    top = mx.topk(logits.astype(mx.float32), 2, axis=-1)
    return float((mx.max(top) - mx.min(top)).item())


def generate_wand(model: Model, input_ids, max_new_tokens: int = 32, safety: float = 1.0,
                  p99_bounds: list[float] | None = None, return_stages_used: bool = False, do_sample: bool = False,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, stop_tokens: list[int] | int | None = None,
                  streamer: Callable[[int, int], None] | None = None, max_length: int | None = None):
    """Prompt + new ids; with return_stages_used, (ids, the 0-based exit stage of every new token)."""
    thresholds = exit_thresholds(resolve_bounds(model.config, p99_bounds), float(safety))
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
    prompt, cache, sink = begin_decoding(model, input_ids, max_new_tokens, max_length, stop_tokens, streamer,
                                         keep_hidden=True)
    boundaries = model.poe_stage_boundary_layers
    used: list[int] = []
    # the prompt runs at full depth; its last position's exits decide the first token like any other step
    cache.claim(mx.array([prompt]))
    hidden = model.run(cache, 0, len(prompt), 0, boundaries[-1], boundaries)
    exits = {s: model.exit_logits(hidden[b], b)[0, -1] for s, b in enumerate(boundaries)}
    while True:
        for s in range(len(boundaries)):
            if s not in exits:  # a deeper stage is needed: catch it up for pending slots and run it for this token
                exits[s] = model.exit_logits(catch_up(model, cache, cache.n_slots, s)[s], boundaries[s])[0, -1]
            if top2_margin(exits[s]) > thresholds[s]:
                break
        token = sampler.choose(exits[s])
        used.append(s)
        sink.push(0, [token])
        if sink.all_done:
            break
        cache.claim(mx.array([[token]]))
        exits = {}
    out = prompt + sink.rows[0]
    return (out, used) if return_stages_used else out


# -----------------------------------------------------------------------------
# self-speculative decoding

def speculative_accept(p: mx.array, q: mx.array | None, drafts: list[int], sampler: Sampler) -> tuple[int, int]:
    """
    p (k+1, V): the full model's scores (greedy) or probabilities (sampling) at the verified positions; q (k, V): the
    draft probabilities (sampling only). Returns (drafts accepted, the next token).
    """
    k = len(drafts)
    if not sampler.do_sample:
        target = mx.argmax(p, axis=-1).tolist()
        n_acc = 0
        while n_acc < k and target[n_acc] == drafts[n_acc]:
            n_acc += 1
        return n_acc, target[n_acc]
    n_acc = 0
    while n_acc < k:  # accept x with probability min(1, p(x) / q(x))
        d = drafts[n_acc]
        if sampler.uniform() * q[n_acc, d].item() >= p[n_acc, d].item():
            break
        n_acc += 1
    if n_acc == k:  # every draft accepted: a bonus token from p
        return n_acc, sampler.draw(p[k])
    residual = mx.maximum(p[n_acc] - q[n_acc], 0)
    mass = float(residual.sum().item())
    return n_acc, sampler.draw(residual / mass if mass > 0 else p[n_acc])


def generate_speculative(model: Model, input_ids, max_new_tokens: int = 32, draft_stage: int = 0, k_draft: int = 3,
                         return_acceptance: bool = False, do_sample: bool = False, temperature: float = 1.0,
                         top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                         stop_tokens: list[int] | int | None = None,
                         streamer: Callable[[int, int], None] | None = None, max_length: int | None = None):
    """Prompt + new ids; with return_acceptance, (ids, drafts accepted / drafts proposed)."""
    if isinstance(k_draft, bool) or not isinstance(k_draft, int) or k_draft < 1:
        raise ValueError(f"k_draft must be an integer >= 1, got {k_draft!r}")
    n_stages = model.poe_n_stages
    draft = model.stage_boundary(draft_stage)
    if draft_stage % n_stages == n_stages - 1:
        raise ValueError(f"draft_stage {draft_stage} is the last stage: the drafter must be an earlier exit "
                         f"(0..{n_stages - 2})")
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
    prompt, cache, sink = begin_decoding(model, input_ids, max_new_tokens, max_length, stop_tokens, streamer,
                                         keep_hidden=True)
    last = model.config.n_layer - 1
    cache.claim(mx.array([prompt]))
    full = model.exit_logits(model.run(cache, 0, len(prompt), 0, last, [last])[last], last)[0, -1]
    token = sampler.choose(full)  # not forwarded yet: it takes the next slot
    sink.push(0, [token])
    accepted = drafted = 0
    while not sink.all_done:
        n = cache.n_slots
        k = max(1, min(k_draft, sink.max_new - len(sink.rows[0]) - 1))  # never draft past the budget
        drafts, q = [], []
        cur = token
        for _ in range(k):  # draft: the shallow layers only, one slot at a time
            slot = cache.claim(mx.array([[cur]]))
            logits = model.exit_logits(model.run(cache, slot, slot + 1, 0, draft, [draft])[draft], draft)[0, -1]
            cur = sampler.choose(logits)
            drafts.append(cur)
            if do_sample:
                q.append(sampler.probs(logits))
        # verify: the last draft's shallow layers, then the deep layers for all k + 1 slots from the kept stream
        slot = cache.claim(mx.array([[cur]]))
        model.run(cache, slot, slot + 1, 0, draft, [])
        h = model.run(cache, n, slot + 1, draft + 1, last, [last], keep=0)[last]
        p = model.exit_logits(h, last)[0]  # (k + 1, V)
        n_acc, token = speculative_accept(sampler.probs(p) if do_sample else p, mx.stack(q) if do_sample else None,
                                          drafts, sampler)
        cache.crop(n + 1 + n_acc)  # keep the verified token and the accepted drafts
        sink.push(0, drafts[:n_acc] + [token])
        drafted += k
        accepted += n_acc
    out = prompt + sink.rows[0]
    return (out, accepted / drafted if drafted else 0.0) if return_acceptance else out
